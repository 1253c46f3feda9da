"""A session's channels: the two streams (``out`` and ``in``) every session owns.

The sessions package decides *when* channels are created and closed; this module is the only
code outside the stream engine that writes their rows, and it runs inside the caller's
transaction so a session and its channels appear and close atomically. A close publishes the
same tail change an append's close does, so live readers on every instance end at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from threadline.db import Conn
from threadline.streams.names import SESSION_CHANNEL_CONTENT_TYPE, session_channel_name
from threadline.streams.wire import NOTIFY_CHANNEL, TailChange, encode_notifications

__all__ = ["CHANNELS", "LockedChannels", "close_channels", "create_channels", "lock_channels"]

CHANNELS = ("out", "in")


@dataclass(frozen=True, slots=True)
class LockedChannels:
    """A session's channel rows, locked until the transaction ends."""

    heads: Sequence[tuple[int, int, bool]]  # (stream id, next offset, closed)
    last_record_at: datetime | None  # newest record on either channel

    @property
    def open(self) -> list[tuple[int, int]]:
        return [(stream_id, next_offset) for stream_id, next_offset, closed in self.heads if not closed]


async def create_channels(conn: Conn, environment_id: str, session_id: str) -> None:
    """Insert the session's channel streams (empty, open, JSON mode)."""
    await conn.execute(
        """INSERT INTO streams (environment_id, name, session_id, io, content_type)
           SELECT $1, v.name, $2, v.io, $3 FROM unnest($4::text[], $5::text[]) AS v (io, name)""",
        environment_id,
        session_id,
        SESSION_CHANNEL_CONTENT_TYPE,
        list(CHANNELS),
        [session_channel_name(session_id, io) for io in CHANNELS],
    )


async def lock_channels(conn: Conn, session_id: str) -> LockedChannels:
    """Lock the session's channel rows in id order, as the group committer does, so a close and
    an append serialise on them and no append commits after the close."""
    rows = await conn.fetch(
        """SELECT id, next_offset, closed_at IS NOT NULL AS closed, last_record_at FROM streams
           WHERE session_id = $1 ORDER BY id FOR UPDATE""",
        session_id,
    )
    times = [row["last_record_at"] for row in rows if row["last_record_at"] is not None]
    return LockedChannels(
        heads=[(row["id"], row["next_offset"], row["closed"]) for row in rows],
        last_record_at=max(times) if times else None,
    )


async def close_channels(conn: Conn, locked: LockedChannels, closed_at: datetime) -> None:
    """Close the locked channels that are still open and wake their live readers (the NOTIFY
    is delivered at COMMIT)."""
    open_heads = locked.open
    if not open_heads:
        return
    changes = [TailChange(stream_id, next_offset, True, None) for stream_id, next_offset in open_heads]
    await conn.execute(
        """WITH closed AS (
               UPDATE streams SET closed_at = $2 WHERE id = ANY($1::bigint[]) AND closed_at IS NULL
           )
           SELECT pg_notify($3, p) FROM unnest($4::text[]) AS p""",
        [stream_id for stream_id, _ in open_heads],
        closed_at,
        NOTIFY_CHANNEL,
        encode_notifications(changes),
    )
