"""Stream rows in Postgres: create, look up (with the fork chain), delete, TTL.

A head is read without locks: it is a snapshot for routing a request and for headers. Decisions
that must not race (appends, close) are taken under the row lock in the committer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from threadline.db import Conn
from threadline.errors import (
    ContentTypeMismatch,
    ForkSourceDeleted,
    ForkSourceNotFound,
    InvalidForkOffset,
    OffsetOutOfRange,
    OffsetTrimmed,
    StreamDeleted,
    StreamExists,
    StreamGone,
    StreamNotFound,
)
from threadline.streams.names import DEFAULT_CONTENT_TYPE, media_type
from threadline.streams.offsets import Position, read_start

__all__ = [
    "Created",
    "StreamHead",
    "StreamSettings",
    "create_stream",
    "delete_stream",
    "extend_ttl",
    "load_head",
    "load_head_by_id",
    "lock_name",
    "retire",
    "trim_stream",
]

_UNBOUNDED = 1 << 62

_HEAD_SQL = """
WITH RECURSIVE chain AS (
    SELECT s.*, 0 AS depth FROM streams s WHERE {where}
    UNION ALL
    SELECT s.*, chain.depth + 1 FROM streams s JOIN chain ON s.id = chain.fork_source_id
)
SELECT id, environment_id, name, session_id, io, content_type, next_offset, trim_offset, records, bytes,
       closed_at, ttl_seconds, expires_at, fork_source_id, fork_offset, fork_sub_offset, deleted_at, created_at,
       last_record_at, depth,
       EXISTS (SELECT 1 FROM streams f WHERE f.fork_source_id = chain.id AND f.deleted_at IS NULL) AS has_forks
FROM chain ORDER BY depth
"""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What a PUT declares; a second PUT must declare the same to get 200 instead of 409.

    ``content_type`` None means "not given": a fork inherits its source's, anything else gets
    the protocol's default. A fork without TTL or expiry inherits its source's.
    """

    content_type: str | None
    ttl_seconds: int | None = None
    expires_at: datetime | None = None
    closed: bool = False
    fork_source: str | None = None
    fork_offset: int | None = None  # None: the source's tail
    fork_sub_offset: int = 0


@dataclass(frozen=True, slots=True)
class StreamHead:
    id: int
    environment_id: str
    name: str
    session_id: str | None
    io: str | None
    content_type: str
    next_offset: int
    trim_offset: int
    records: int
    bytes: int
    closed: bool
    ttl_seconds: int | None
    expires_at: datetime | None
    fork_source_id: int | None
    fork_offset: int
    fork_sub_offset: int
    deleted: bool
    has_forks: bool
    created_at: datetime
    last_record_at: datetime | None
    # (stream id, low, high): which stream holds offsets [low, high), ascending.
    lineage: tuple[tuple[int, int, int], ...]

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))

    def check_readable(self, offset: int) -> None:
        """Reads below the trim point are the protocol's "gone" (410)."""
        if offset < self.trim_offset:
            raise OffsetTrimmed(f"records before offset {self.trim_offset} were trimmed")

    def read_start(self, position: Position) -> int:
        """Where a read from ``position`` starts: 400 past the tail, 410 below the trim point."""
        start = read_start(position, trim_offset=self.trim_offset, next_offset=self.next_offset)
        self.check_readable(start)
        return start


def _head(rows: list[asyncpg.Record]) -> StreamHead:
    row = rows[0]
    parts: list[tuple[int, int, int]] = []
    high = _UNBOUNDED
    for link in rows:
        low = link["fork_offset"] if link["fork_source_id"] is not None else 0
        parts.append((link["id"], low, high))
        high = low
    return StreamHead(
        id=row["id"],
        environment_id=row["environment_id"],
        name=row["name"],
        session_id=row["session_id"],
        io=row["io"],
        content_type=row["content_type"],
        next_offset=row["next_offset"],
        trim_offset=row["trim_offset"],
        records=row["records"],
        bytes=row["bytes"],
        closed=row["closed_at"] is not None,
        ttl_seconds=row["ttl_seconds"],
        expires_at=row["expires_at"],
        fork_source_id=row["fork_source_id"],
        fork_offset=row["fork_offset"],
        fork_sub_offset=row["fork_sub_offset"],
        deleted=row["deleted_at"] is not None,
        has_forks=row["has_forks"],
        created_at=row["created_at"],
        last_record_at=row["last_record_at"],
        lineage=tuple(reversed(parts)),
    )


async def find_head(conn: Conn, environment_id: str, name: str) -> StreamHead | None:
    """The stream called ``name``: the live one, else the most recent soft-deleted one."""
    rows = await conn.fetch(
        _HEAD_SQL.format(
            where="""s.id = (SELECT id FROM streams WHERE environment_id = $1 AND name = $2
                              ORDER BY deleted_at IS NOT NULL, id DESC LIMIT 1)"""
        ),
        environment_id,
        name,
    )
    return _head(rows) if rows else None


async def load_head(conn: Conn, environment_id: str, name: str) -> StreamHead:
    """The readable/writable stream ``name``: 404 if missing or expired, 410 if soft-deleted."""
    head = await find_head(conn, environment_id, name)
    if head is None or head.expired():
        raise StreamNotFound(f"stream {name!r} not found")
    if head.deleted:
        raise StreamGone(f"stream {name!r} was deleted")
    return head


async def load_head_by_id(conn: Conn, stream_id: int) -> StreamHead:
    rows = await conn.fetch(_HEAD_SQL.format(where="s.id = $1"), stream_id)
    if not rows:
        raise StreamNotFound("stream not found")
    return _head(rows)


def _same_settings(head: StreamHead, settings: StreamSettings, source: StreamHead | None) -> bool:
    if settings.content_type is not None and media_type(head.content_type) != media_type(
        settings.content_type
    ):
        return False
    if settings.ttl_seconds is not None or settings.expires_at is not None or source is None:
        if head.ttl_seconds != settings.ttl_seconds:
            return False
        if settings.ttl_seconds is None and head.expires_at != settings.expires_at:
            return False
    if settings.closed != head.closed:
        return False
    if source is None:
        return head.fork_source_id is None
    if head.fork_source_id != source.id or head.fork_sub_offset != settings.fork_sub_offset:
        return False
    if settings.fork_offset is None:
        return True
    # A JSON fork at a sub-offset starts that many messages after the requested offset.
    shift = settings.fork_sub_offset if media_type(head.content_type) == "application/json" else 0
    return head.fork_offset == settings.fork_offset + shift


@dataclass(frozen=True, slots=True)
class Created:
    head: StreamHead
    created: bool
    # Bytes-mode fork at a sub-offset: the prefix of the source record to append as the fork's
    # first record (the fork point falls inside that record).
    prefix: bytes | None = None


async def lock_name(conn: Conn, environment_id: str, name: str) -> None:
    """Hold the name's advisory lock until the transaction ends: creators and the janitor take it."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 7))", environment_id, name
    )


async def create_stream(
    conn: Conn,
    environment_id: str,
    name: str,
    settings: StreamSettings,
    read_record: Callable[[StreamHead, int], Awaitable[tuple[bytes, int, int]]],
) -> Created:
    """Create ``name`` or find the identical existing one.

    An expired stream of the same name is retired first, so the name can be reused; a live one
    with different settings, or a deleted one that forks still read from, is a 409.
    ``read_record(source, offset)`` returns ``(record, blob_start, blob_count)`` for sub-offsets.
    """
    async with conn.transaction():
        # Serialise creators of one name (the partial unique index alone would fail the loser).
        await lock_name(conn, environment_id, name)
        existing = await find_head(conn, environment_id, name)
        source: StreamHead | None = None
        if settings.fork_source is not None:
            source = await find_head(conn, environment_id, settings.fork_source)
            if source is not None:
                # Hold the source row until this fork commits: a trim (which updates that row)
                # then waits, and counts this fork among those whose history it must keep; and a
                # trim that got there first is seen by reading the source again under the lock.
                await conn.execute("SELECT 1 FROM streams WHERE id = $1 FOR SHARE", source.id)
                source = await load_head_by_id(conn, source.id)
            if source is None or source.expired():
                raise ForkSourceNotFound(f"fork source {settings.fork_source!r} not found")
            if source.deleted:
                raise ForkSourceDeleted(f"fork source {settings.fork_source!r} was deleted")
        if existing is not None and existing.deleted:
            raise StreamDeleted(f"stream {name!r} was deleted and forks still read from it")
        if existing is not None and not existing.expired():
            if _same_settings(existing, settings, source):
                return Created(existing, False)
            raise StreamExists(f"stream {name!r} exists with different settings")
        if existing is not None:
            await retire(conn, existing)
        content_type = settings.content_type
        ttl_seconds, expires_at = settings.ttl_seconds, settings.expires_at
        fork_offset = 0
        prefix: bytes | None = None
        if source is not None:
            if content_type is None:
                content_type = source.content_type
            elif media_type(content_type) != media_type(source.content_type):
                raise ContentTypeMismatch("a fork's content type must be its source's")
            if ttl_seconds is None and expires_at is None:
                ttl_seconds, expires_at = source.ttl_seconds, source.expires_at
            fork_offset = source.next_offset if settings.fork_offset is None else settings.fork_offset
            if fork_offset < source.trim_offset or fork_offset > source.next_offset:
                raise InvalidForkOffset("Stream-Fork-Offset is not within the source stream")
            if settings.fork_sub_offset:
                if fork_offset >= source.next_offset:
                    raise InvalidForkOffset(
                        "Stream-Fork-Sub-Offset needs a record at Stream-Fork-Offset",
                    )
                record, blob_start, blob_count = await read_record(source, fork_offset)
                if media_type(content_type) == "application/json":
                    # JSON: the sub-offset counts messages of the append that starts at the offset.
                    if blob_start != fork_offset or settings.fork_sub_offset > blob_count:
                        raise InvalidForkOffset(
                            "Stream-Fork-Sub-Offset is beyond the messages of that append",
                        )
                    fork_offset += settings.fork_sub_offset
                else:
                    if settings.fork_sub_offset > len(record):
                        raise InvalidForkOffset(
                            "Stream-Fork-Sub-Offset is beyond the end of that record",
                        )
                    prefix = record[: settings.fork_sub_offset]
        if content_type is None:
            content_type = DEFAULT_CONTENT_TYPE
        if ttl_seconds is not None:
            expires_at = datetime.now(UTC) + timedelta(seconds=ttl_seconds)
        stream_id = await conn.fetchval(
            """INSERT INTO streams (environment_id, name, content_type, ttl_seconds, expires_at,
                                    fork_source_id, fork_offset, fork_sub_offset, next_offset, trim_offset)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $9) RETURNING id""",
            environment_id,
            name,
            content_type,
            ttl_seconds,
            expires_at,
            source.id if source else None,
            fork_offset,
            settings.fork_sub_offset,
            # What the source trimmed is gone for the fork too.
            source.trim_offset if source else 0,
        )
        return Created(await load_head_by_id(conn, stream_id), True, prefix)


async def retire(conn: Conn, head: StreamHead) -> None:
    """An expired stream gives up its name: deleted now, or marked deleted while forks read it."""
    await conn.execute("UPDATE streams SET deleted_at = coalesce(deleted_at, now()) WHERE id = $1", head.id)
    await _purge(conn, head.id)


async def delete_stream(conn: Conn, head: StreamHead) -> None:
    """Delete a stream and its index; a stream that live forks read from is only marked deleted."""
    async with conn.transaction():
        forks = await conn.fetchval(
            "SELECT count(*) FROM streams WHERE fork_source_id = $1 AND deleted_at IS NULL", head.id
        )
        await conn.execute(
            "UPDATE streams SET deleted_at = coalesce(deleted_at, now()) WHERE id = $1", head.id
        )
        # With forks it stays soft-deleted: the name is taken (re-create is 409) until the last
        # fork goes, and _purge then removes it.
        if not forks:
            await _purge(conn, head.id)


async def _purge(conn: Conn, stream_id: int) -> None:
    """Remove a deleted stream with no forks, and deleted sources left without forks."""
    current: int | None = stream_id
    while current is not None:
        row = await conn.fetchrow(
            """SELECT s.fork_source_id, s.deleted_at IS NOT NULL AS deleted,
                      EXISTS (SELECT 1 FROM streams f WHERE f.fork_source_id = s.id) AS referenced
               FROM streams s WHERE s.id = $1""",
            current,
        )
        if row is None or not row["deleted"] or row["referenced"]:
            return
        await conn.execute("DELETE FROM streams WHERE id = $1", current)
        current = row["fork_source_id"]


async def extend_ttl(conn: Conn, head: StreamHead) -> None:
    """Sliding TTL: a read moves the expiry (throttled: skip if it would move by under 1%)."""
    if head.ttl_seconds is None:
        return
    await conn.execute(
        """UPDATE streams SET expires_at = now() + ttl_seconds * interval '1 second'
           WHERE id = $1 AND expires_at < now() + ttl_seconds * interval '0.99 second'""",
        head.id,
    )


async def trim_stream(conn: Conn, head: StreamHead, before: int) -> tuple[int, int]:
    """Make records before ``before`` unreadable (410) and drop their index rows, whose objects the
    collector then deletes. Trimming never moves back. Returns ``(trim offset, next offset)``.

    Chunks that forks still read (below a fork's fork point) stay: a fork's history is its own.
    Only whole chunks go; a chunk that straddles the trim point stays until a later trim passes it.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            """UPDATE streams SET trim_offset = greatest(trim_offset, $2)
               WHERE id = $1 AND deleted_at IS NULL AND $2 <= next_offset
               RETURNING trim_offset, next_offset""",
            head.id,
            before,
        )
        if row is None:
            raise OffsetOutOfRange("the trim point is beyond the end of the stream")
        # A fork reads every offset below its fork point from here: keep those chunks.
        kept_for_forks = await conn.fetchval(
            "SELECT coalesce(max(fork_offset), 0) FROM streams WHERE fork_source_id = $1", head.id
        )
        await conn.execute(
            """DELETE FROM stream_chunks
               WHERE stream_id = $1 AND end_offset <= $2 AND start_offset >= $3""",
            head.id,
            row["trim_offset"],
            kept_for_forks,
        )
    return row["trim_offset"], row["next_offset"]
