"""A session's channels: the two streams (``out`` and ``in``) every session owns.

The sessions package decides *when* channels are created, forked and closed; this module is the
only code outside the stream engine that writes their rows, and it runs inside the caller's
transaction so a session and its channels appear and close atomically. A close publishes the
same tail change an append's close does, so live readers on every instance end at once.

A forked session's channels are stream forks of its parent's (``fork_source_id``/``fork_offset``,
as a Durable Streams fork PUT makes them): they read the parent's records below the fork point
through the reader's lineage, and no record bytes are copied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from threadline.db import Conn
from threadline.errors import ChannelNotFound, InvalidForkOffset
from threadline.streams.names import SESSION_CHANNEL_CONTENT_TYPE, session_channel_name
from threadline.streams.offsets import Position, format_offset
from threadline.streams.wire import NOTIFY_CHANNEL, TailChange, encode_notifications

__all__ = [
    "CHANNELS",
    "ForkSource",
    "LockedChannels",
    "close_channels",
    "create_channels",
    "fork_channels",
    "lock_channels",
    "lock_fork_sources",
]

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
    await _insert_channels(conn, environment_id, session_id, {io: (None, 0, 0) for io in CHANNELS})


async def _insert_channels(
    conn: Conn, environment_id: str, session_id: str, starts: Mapping[str, tuple[int | None, int, int]]
) -> None:
    """Insert the session's channels; ``starts`` is, by io, ``(fork source stream id or None,
    fork offset (also the first offset), trim offset)``."""
    await conn.execute(
        """INSERT INTO streams (environment_id, name, session_id, io, content_type,
                                fork_source_id, fork_offset, next_offset, trim_offset)
           SELECT $1, v.name, $2, v.io, $3, v.source_id, v.fork_offset, v.fork_offset, v.trim_offset
           FROM unnest($4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[])
                AS v (io, name, source_id, fork_offset, trim_offset)""",
        environment_id,
        session_id,
        SESSION_CHANNEL_CONTENT_TYPE,
        list(CHANNELS),
        [session_channel_name(session_id, io) for io in CHANNELS],
        [starts[io][0] for io in CHANNELS],
        [starts[io][1] for io in CHANNELS],
        [starts[io][2] for io in CHANNELS],
    )


@dataclass(frozen=True, slots=True)
class ForkSource:
    """A parent's channel as a fork sees it, share-locked until the transaction ends."""

    io: str
    stream_id: int
    trim_offset: int
    next_offset: int

    def fork_point(self, position: Position, field: str) -> int:
        """Where a fork at ``position`` starts: ``start`` is the first kept record, ``now`` the
        tail; an offset must lie within ``[trim offset, tail]`` (400 ``invalid_fork_offset``)."""
        if position == "start":
            return self.trim_offset
        if position == "now":
            return self.next_offset
        if not self.trim_offset <= position <= self.next_offset:
            raise InvalidForkOffset(
                f"{field} is not within the parent's {self.io} channel",
                details={
                    "channel": self.io,
                    "offset": format_offset(position),
                    "trimOffset": format_offset(self.trim_offset),
                    "tailOffset": format_offset(self.next_offset),
                },
            )
        return position


async def lock_fork_sources(conn: Conn, session_id: str) -> dict[str, ForkSource]:
    """The session's channels, by io, locked ``FOR SHARE`` in id order (the committer's order)
    until the transaction ends.

    While the lock is held no append, trim or close commits on them, so the tail and trim point a
    fork is checked against stay true until the fork's rows commit, and a trim that follows sees
    the fork and keeps the chunks it reads (``heads.trim_stream``). Concurrent forks share it.
    """
    rows = await conn.fetch(
        """SELECT id, io, trim_offset, next_offset FROM streams
           WHERE session_id = $1 AND deleted_at IS NULL ORDER BY id FOR SHARE""",
        session_id,
    )
    sources = {
        row["io"]: ForkSource(row["io"], row["id"], row["trim_offset"], row["next_offset"]) for row in rows
    }
    missing = [io for io in CHANNELS if io not in sources]
    if missing:
        raise ChannelNotFound(f"session {session_id} has no {' or '.join(missing)} channel")
    return sources


async def fork_channels(
    conn: Conn,
    environment_id: str,
    session_id: str,
    sources: Mapping[str, ForkSource],
    fork_offsets: Mapping[str, int],
) -> None:
    """Insert ``session_id``'s channels as open forks of ``sources`` at ``fork_offsets`` (from
    :meth:`ForkSource.fork_point`). A fork starts at its source's trim point: what the source
    trimmed is gone for the fork too. Stats (records, bytes) start at zero: they count appends."""
    await _insert_channels(
        conn,
        environment_id,
        session_id,
        {io: (sources[io].stream_id, fork_offsets[io], sources[io].trim_offset) for io in CHANNELS},
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
