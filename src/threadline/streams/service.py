"""The stream API: everything the HTTP routes do with streams, on plain values.

Routes parse a request into these values and render what comes back; they never reach the
committer, the reader, the live hub or stream SQL themselves. Every protocol surface that reads
live (Durable Streams SSE and long-poll, the session realtime SSE) goes through one loop,
:meth:`StreamService.follow`, so they wake, share reads and end the same way.

    create   PUT: a stream (or a fork, through ``StreamSettings.fork_source``), with a first body
    append   POST: records, a close, idempotent producers, Stream-Seq
    read     GET: catch-up from a position
    poll     long-poll: wait for records after a position
    follow   SSE: every record from a position, as it is committed
    trim     drop records before an offset
    delete   delete (soft while forks read from it)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter, Gauge

from threadline.db import ConnectionSource
from threadline.errors import ContentTypeMismatch, EmptyAppend, StreamGone, StreamNotFound, ValidationFailed
from threadline.streams.committer import AppendOutcome, AppendRequest, GroupCommitter
from threadline.streams.errors import check_content_type
from threadline.streams.heads import (
    StreamHead,
    StreamSettings,
    create_stream,
    delete_stream,
    extend_ttl,
    load_head,
    load_head_by_id,
    trim_stream,
)
from threadline.streams.live import FrameKey, LiveHub, StreamTail, Waiter
from threadline.streams.names import is_json
from threadline.streams.offsets import Position, read_start
from threadline.streams.producers import Producer
from threadline.streams.reader import ReadResult, StreamReader
from threadline.streams.records import check_batch, split_json
from threadline.streams.targets import AppendTarget, AppendTargets
from threadline.streams.wire import TailChange

__all__ = ["Append", "Created", "FollowStep", "StreamService"]

# Distinct places of one tail whose reads and frames are shared between live readers; laggards
# past that read on their own (they are reading history, which is rarer and not the fan-out case).
_MAX_SHARED = 32

# A remembered append target that yields one of these from the commit may be stale (the row is
# gone or a new stream took the name): resolve the name again and retry once. The append was
# refused, so nothing was written.
_STALE_TARGET = (StreamNotFound, StreamGone, ContentTypeMismatch)

# "sse": follow (both SSE routes); "long_poll": poll. Per instance: a load balancer that piles
# subscribers on one instance shows here.
LiveMode = Literal["sse", "long_poll"]
LIVE_READERS = Gauge(
    "threadline_live_readers",
    "Live reads open on this instance (SSE, long-poll)",
    ["mode"],
    multiprocess_mode="livesum",  # with several workers: the instance's readers, all workers summed
)
LIVE_RECORDS = Counter(
    "threadline_live_records_delivered_total",
    "Records handed to live readers, catch-up included (one record to N readers counts N)",
    ["mode"],
)
for _mode in ("sse", "long_poll"):
    LIVE_READERS.labels(_mode)
    LIVE_RECORDS.labels(_mode)


@dataclass(frozen=True, slots=True)
class Append:
    """One append request. ``content_type`` is the request's (routes that assume JSON fill it in);
    an empty ``body`` appends nothing and is only allowed with ``close``."""

    body: bytes
    content_type: str | None
    close: bool = False
    producer: Producer | None = None
    stream_seq: str | None = None


@dataclass(frozen=True, slots=True)
class Created:
    head: StreamHead
    created: bool  # False: an identical stream existed (the PUT is idempotent)
    next_offset: int
    closed: bool


@dataclass(frozen=True, slots=True)
class FollowStep:
    """One read of a live reader: the records from ``start`` (possibly none), as the tail stood."""

    start: int
    result: ReadResult
    _tail: StreamTail
    _version: int

    @property
    def finished(self) -> bool:
        """The stream is closed and this read reached its end: nothing will follow."""
        return self.result.closed and self.result.next_offset >= self.result.tail_offset

    def frame(self, encoding: str, build: Callable[[FollowStep], bytes]) -> bytes:
        """``build(self)``, made once per tail version for every reader at this place with this
        ``encoding``: a commit's records are encoded once however many subscribers wait.
        ``encoding`` must name everything the bytes depend on besides the records."""
        key = FrameKey(encoding, self.start)
        tail = self._tail
        found = tail.frames.get(key) if tail.version == self._version else None
        if found is not None:
            return found
        frame = build(self)
        if tail.version == self._version and len(tail.frames) < _MAX_SHARED:
            tail.frames[key] = frame
        return frame


class StreamService:
    def __init__(
        self,
        pool: ConnectionSource,
        committer: GroupCommitter,
        reader: StreamReader,
        live: LiveHub,
        targets: AppendTargets,
        *,
        live_read_bytes: int | None = None,
    ) -> None:
        self._pool = pool
        # Most record bytes one live-read step reads: what a live reader holds unsent at most
        # while its socket takes the step (THREADLINE_SSE_MAX_BUFFERED_BYTES).
        self._live_read_bytes = live_read_bytes
        self._committer = committer
        self._reader = reader
        self._live = live
        self._targets = targets

    # --- lookups -----------------------------------------------------------------------------

    async def head(self, environment_id: str, name: str) -> StreamHead:
        """The stream as it is now: 404 if missing or expired, 410 if deleted."""
        async with self._pool.acquire() as conn:
            return await load_head(conn, environment_id, name)

    async def describe(self, environment_id: str, name: str, content_type: str | None) -> StreamHead:
        """An existing stream, if ``content_type`` (when given) is its type (409 otherwise): how a
        PUT confirms a stream it may not create, such as a session's channel."""
        head = await self.head(environment_id, name)
        if content_type is not None:
            check_content_type(content_type, head.content_type)
        return head

    # --- writes ------------------------------------------------------------------------------

    async def create(self, environment_id: str, name: str, settings: StreamSettings, body: bytes) -> Created:
        """Create ``name`` (or a fork), append ``body`` as its first records and close it if the
        settings say so; an identical existing stream is returned as it is."""
        async with self._pool.acquire() as conn:
            created = await create_stream(conn, environment_id, name, settings, self._reader.record_at)
        head = created.head
        if not created.created:
            return Created(head, False, head.next_offset, head.closed)
        records: list[bytes] = [created.prefix] if created.prefix is not None else []
        if body:
            records.extend(split_json(body, allow_empty_array=True) if is_json(head.content_type) else [body])
        check_batch(records)
        if not records and not settings.closed:
            return Created(head, True, head.next_offset, False)
        outcome = await self._committer.append(
            AppendRequest(head.id, records, content_type=None, close=settings.closed)
        )
        return Created(head, True, outcome.next_offset, outcome.closed)

    async def append(self, environment_id: str, name: str, append: Append) -> AppendOutcome:
        """Append to ``name`` and wait for the commit (or the refusal, raised as an ApiError).

        The name resolves through :class:`AppendTargets`, so a steady appender costs no Postgres
        lookup of its own; the committer decides everything else under the row lock."""
        cached = self._targets.get(environment_id, name)
        if cached is not None:
            try:
                return await self._append(cached, append)
            except _STALE_TARGET:
                self._targets.forget(environment_id, name)
        head = await self.head(environment_id, name)
        target = self._targets.remember(environment_id, name, head.id, head.content_type)
        return await self._append(target, append)

    async def _append(self, target: AppendTarget, append: Append) -> AppendOutcome:
        records: list[bytes] = []
        if append.body:
            if not append.content_type:
                raise ValidationFailed("an append needs a Content-Type")
            check_content_type(append.content_type, target.content_type)
            records = (
                split_json(append.body, allow_empty_array=False)
                if is_json(target.content_type)
                else [append.body]
            )
            check_batch(records)
        elif not append.close:
            raise EmptyAppend("an append needs a body (or Stream-Closed: true)")
        return await self._committer.append(
            AppendRequest(
                target.id,
                records,
                content_type=append.content_type if records else None,
                close=append.close,
                producer=append.producer,
                stream_seq=append.stream_seq,
            )
        )

    async def trim(self, environment_id: str, name: str, before: Position) -> tuple[int, int]:
        """Make records before ``before`` unreadable; returns ``(trim offset, next offset)``."""
        async with self._pool.acquire() as conn:
            head = await load_head(conn, environment_id, name)
            point = read_start(before, trim_offset=0, next_offset=head.next_offset)
            return await trim_stream(conn, head, point)

    async def delete(self, environment_id: str, name: str) -> None:
        async with self._pool.acquire() as conn:
            head = await load_head(conn, environment_id, name)
            await delete_stream(conn, head)
        self._targets.forget(environment_id, name)

    # --- reads -------------------------------------------------------------------------------

    async def open_read(self, environment_id: str, name: str, position: Position) -> tuple[StreamHead, int]:
        """The stream and the offset a read from ``position`` starts at (400 past the tail, 410
        below the trim point). A read moves a sliding TTL."""
        async with self._pool.acquire() as conn:
            head = await load_head(conn, environment_id, name)
            await extend_ttl(conn, head)
        return head, head.read_start(position)

    async def read(self, head: StreamHead, start: int) -> ReadResult:
        """Catch-up: the records from ``start``, up to the read size limit."""
        return await self._reader.read(head, start)

    async def poll(self, head: StreamHead, start: int, wait_seconds: float) -> ReadResult:
        """Long-poll: the records from ``start``, waiting up to ``wait_seconds`` for the first one.
        No records means the wait ran out or the stream is closed at ``start``."""
        async with self._watching(head, "long_poll") as (fresh, tail):
            if start >= tail.next_offset and not tail.closed:
                await tail.wait_beyond(start, asyncio.get_running_loop().time() + wait_seconds)
            if start < tail.next_offset:
                result = await self._reader.read(fresh, start, tail=tail)
                LIVE_RECORDS.labels("long_poll").inc(len(result.records))
                return result
            return ReadResult([], start, tail.next_offset, tail.closed)

    async def follow(
        self, head: StreamHead, start: int, *, idle_seconds: float, deadline: float | None = None
    ) -> AsyncIterator[FollowStep]:
        """Every record from ``start`` as it is committed, one step per read.

        A step may hold no records: the first one always comes (the reader learns where it
        stands), then one whenever ``idle_seconds`` pass without a commit (SSE heartbeats and
        cursors ride on it). Ends after the step that reaches the end of a closed stream, or at
        ``deadline`` (``loop.time()``). Readers at the same place share each read.

        The next step is read only when the caller asks for it, at most ``live_read_bytes`` of
        records each (at least one chunk): a caller that waits for its reader's socket before
        asking paces a catch-up by it, and a live reader that falls behind reads on from storage
        rather than having commits queued for it."""
        loop = asyncio.get_running_loop()
        position = start
        delivered = LIVE_RECORDS.labels("sse")
        waiter = Waiter()  # one timer for this reader's idle waits, not one per wait
        try:
            async with self._watching(head, "sse") as (fresh, tail):
                while True:
                    fresh.check_readable(position)
                    version = tail.version
                    result = tail.reads.get(position)
                    if result is None:
                        result = await self._reader.read(
                            fresh, position, tail=tail, max_bytes=self._live_read_bytes
                        )
                        if tail.version == version and len(tail.reads) < _MAX_SHARED:
                            tail.reads[position] = result
                    step = FollowStep(position, result, tail, version)
                    if result.records:
                        delivered.inc(len(result.records))
                    yield step
                    if result.records:
                        position = result.next_offset
                    if step.finished:
                        return
                    wait_until = loop.time() + idle_seconds
                    if deadline is not None:
                        if loop.time() >= deadline:
                            return
                        wait_until = min(wait_until, deadline)
                    if position >= result.tail_offset:
                        await tail.wait_beyond(position, wait_until, waiter)
        finally:
            waiter.close()

    @contextlib.asynccontextmanager
    async def _watching(
        self, head: StreamHead, mode: LiveMode
    ) -> AsyncIterator[tuple[StreamHead, StreamTail]]:
        """Register as a live reader of ``head``'s stream, then re-read the head: a commit between
        the first read and the registration would otherwise be missed until the next one."""
        readers = LIVE_READERS.labels(mode)
        readers.inc()
        try:
            with self._live.watch(head.id) as tail:
                async with self._pool.acquire() as conn:
                    fresh = await load_head_by_id(conn, head.id)
                tail.apply(TailChange(fresh.id, fresh.next_offset, fresh.closed, None))
                yield fresh, tail
        finally:
            readers.dec()
