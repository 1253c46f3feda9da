"""Group commit: concurrent appends to any number of streams share one object PUT and one
Postgres transaction.

Object PUTs are the scarce resource on the append path (SPEC §8), so appends queue here and a
flush takes everything queued: it lays the records out as one object (grouped by stream, in
arrival order), PUTs it, and then, in one transaction, locks the streams' rows in id order,
decides every append against the locked heads (closed? content type? producer sequence?),
assigns offsets in commit order, inserts the chunk index rows, moves the heads, and NOTIFYs the
change. Only after COMMIT are the appends acknowledged: an acknowledged record is in S3 and
indexed. A crash before COMMIT leaves an object nothing points at, which the compactor deletes;
an append rejected at decision time leaves unreferenced bytes in an otherwise used object.

While one flush is in flight the next one fills up, so batches grow with load and latency stays
one PUT plus one transaction when idle. Up to ``max_inflight`` flushes overlap their PUTs, but
their transactions run strictly in flush order, so the order appends were queued in is the
order they commit in (a producer pipelining its sequence numbers relies on that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
from prometheus_client import Counter, Histogram

from threadline.db import POSTGRES_UNAVAILABLE, discarding_on_failure
from threadline.errors import (
    ApiError,
    DatabaseUnavailable,
    OutcomeUnknown,
    SessionExpired,
    ShuttingDown,
    StorageUnavailable,
    StreamGone,
    StreamNotFound,
    StreamSeqConflict,
)
from threadline.storage.objects import ObjectStore, ObjectStoreUnavailable
from threadline.streams.cache import ChunkCache, ChunkKey
from threadline.streams.errors import check_content_type, stream_closed
from threadline.streams.live import LiveHub
from threadline.streams.producers import Producer, ProducerState, decide
from threadline.streams.records import encode_blob
from threadline.streams.wire import NOTIFY_CHANNEL, ChunkRef, TailChange, encode_notifications

__all__ = ["ActivitySink", "AppendOutcome", "AppendRequest", "GroupCommitter"]

logger = logging.getLogger(__name__)

# A flush commits within _MAX_PUT_TO_COMMIT_SECONDS of its PUT plus its bounded statements, or
# fails: that bound is what lets the orphan sweep delete old objects no row knows
# (THREADLINE_ORPHAN_MIN_AGE_SECONDS must stay well above it).
_MAX_PUT_TO_COMMIT_SECONDS = 60.0
_OUTCOME_POLL_SECONDS = 0.05
# A flush that failed on these left nothing committed (an unknown outcome is resolved first).
_COMMIT_FAILED: tuple[type[BaseException], ...] = (*POSTGRES_UNAVAILABLE, asyncpg.PostgresError)


class _Stalled(Exception):
    pass


class _CommitUnconfirmed(Exception):
    """COMMIT was sent and neither its reply nor Postgres (asked again) told how it ended."""

    def __init__(self, xid: str) -> None:
        super().__init__(f"transaction {xid}: outcome unknown")
        self.xid = xid


class ActivitySink(Protocol):
    """Told which sessions' channels took records in a commit (``lastActiveAt`` is the sessions
    package's business; streams only report it)."""

    def touch(self, session_id: str) -> None: ...


FLUSHES = Counter("threadline_stream_flushes_total", "Group commits (one object PUT + one transaction each)")
FLUSH_FAILURES = Counter("threadline_stream_flush_failures_total", "Group commits that failed", ["stage"])
APPENDS = Counter("threadline_stream_appends_total", "Append requests decided", ["result"])
RECORDS = Counter("threadline_stream_records_total", "Records appended")
FLUSH_APPENDS = Histogram(
    "threadline_stream_flush_appends",
    "Append requests per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
FLUSH_SECONDS = Histogram(
    "threadline_stream_flush_seconds",
    "Group commit duration by stage",
    ["stage"],
    buckets=(0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0),
)


@dataclass(eq=False, slots=True)
class AppendRequest:
    stream_id: int
    records: Sequence[bytes]
    content_type: str | None = None  # the request's; None skips the match (close-only, empty body)
    close: bool = False
    producer: Producer | None = None
    stream_seq: str | None = None


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    start_offset: int  # offset of the first record appended (== next_offset when none)
    next_offset: int  # Stream-Next-Offset after this append
    appended: int
    closed: bool  # the stream is closed after this append
    duplicate: bool = False  # a producer retry of an append already acknowledged
    producer_epoch: int | None = None
    producer_seq: int | None = None  # for a duplicate: the highest sequence accepted


@dataclass(eq=False, slots=True)
class _Pending:
    request: AppendRequest
    future: asyncio.Future[AppendOutcome]
    size: int
    blob_start: int = 0
    blob_length: int = 0


@dataclass(slots=True)
class _Head:
    """One locked stream row, as the flush's decisions change it."""

    next_offset: int
    content_type: str
    closed: bool
    deleted: bool
    expired: bool
    session_expired: bool
    last_stream_seq: str | None
    session_id: str | None
    records: int = 0
    bytes: int = 0
    close_now: bool = False
    stream_seq_changed: bool = False
    chunks: list[ChunkRef] = field(default_factory=list)


class GroupCommitter:
    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        objects: ObjectStore,
        live: LiveHub,
        cache: ChunkCache,
        activity: ActivitySink,
        *,
        max_flush_bytes: int = 16 * 1024 * 1024,
        max_inflight: int = 2,
        statement_timeout: float = 20.0,
        outcome_wait: float = 5.0,
    ) -> None:
        self._pool = pool
        self._objects = objects
        self._live = live
        self._cache = cache
        self._activity = activity
        self._max_flush_bytes = max_flush_bytes
        self._statement_timeout = statement_timeout
        self._outcome_wait = outcome_wait
        self._slots = asyncio.Semaphore(max_inflight)
        self._queue: list[_Pending] = []
        self._queued = asyncio.Event()
        self._previous_done: asyncio.Event | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closing = False

    async def append(self, request: AppendRequest) -> AppendOutcome:
        """Queue ``request`` and wait for its commit (or its rejection, raised as an ApiError).

        A caller that goes away (client disconnect) does not withdraw the append: once queued it
        is decided like any other, so the outcome never depends on when a client hung up.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down")
        future: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()
        size = sum(len(record) for record in request.records)
        self._queue.append(_Pending(request, future, size))
        self._queued.set()
        return await asyncio.shield(future)

    async def run(self) -> None:
        try:
            while True:
                await self._queued.wait()
                self._queued.clear()
                while self._queue:
                    await self._slots.acquire()
                    batch = self._take()
                    done = asyncio.Event()
                    previous, self._previous_done = self._previous_done, done
                    task = asyncio.create_task(self._flush(batch, previous, done), name="threadline-flush")
                    self._flushes.add(task)
                    task.add_done_callback(self._flushes.discard)
        finally:
            self._closing = True

    async def drain(self, grace_seconds: float) -> None:
        """Stop taking appends and wait for queued and in-flight ones (graceful shutdown)."""
        self._closing = True
        deadline = time.monotonic() + grace_seconds
        while (self._queue or self._flushes) and time.monotonic() < deadline:  # noqa: ASYNC110 (shutdown only)
            await asyncio.sleep(0.01)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown("server is shutting down"))

    def _take(self) -> list[_Pending]:
        taken = 0
        size = 0
        for pending in self._queue:
            if taken and size + pending.size > self._max_flush_bytes:
                break
            taken += 1
            size += pending.size
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch

    async def _flush(
        self, batch: list[_Pending], previous: asyncio.Event | None, done: asyncio.Event
    ) -> None:
        started = time.perf_counter()
        try:
            body = self._layout(batch)
            key = None
            if body:
                key = f"batches/{time.time_ns():x}-{secrets.token_hex(6)}"
                try:
                    await self._objects.put_new(key, body)
                except ObjectStoreUnavailable as exc:
                    FLUSH_FAILURES.labels("object_put").inc()
                    self._fail(
                        batch,
                        StorageUnavailable(f"object storage unavailable: {exc}"),
                    )
                    return
            put_done = time.perf_counter()
            FLUSH_SECONDS.labels("object_put").observe(put_done - started)
            if previous is not None:
                await previous.wait()  # transactions commit in flush order
            with self._live.committing(key):
                try:
                    changes = await self._commit(batch, key, body, put_done)
                except _Stalled:
                    FLUSH_FAILURES.labels("stalled").inc()
                    self._fail(batch, DatabaseUnavailable("commit stalled; retry"))
                    return
                except _CommitUnconfirmed as exc:
                    FLUSH_FAILURES.labels("outcome_unknown").inc()
                    logger.warning(
                        "group commit outcome unknown", extra={"xid": exc.xid, "appends": len(batch)}
                    )
                    self._fail(
                        batch,
                        OutcomeUnknown(
                            f"the database did not confirm whether this append committed within "
                            f"{self._outcome_wait:g}s: it may be stored. Retry with the same "
                            "Producer-Id/Epoch/Seq (a duplicate is recognised, never stored twice), "
                            "or read the stream before retrying without producer headers."
                        ),
                    )
                    return
                except _COMMIT_FAILED as exc:
                    FLUSH_FAILURES.labels("postgres").inc()
                    logger.warning("group commit failed", extra={"error": str(exc), "appends": len(batch)})
                    self._fail(batch, DatabaseUnavailable("database unavailable"))
                    return
                # The appenders were acknowledged in _commit; their responses are scheduled
                # ahead of the subscribers woken here.
                self._live.on_commit(changes)
            FLUSH_SECONDS.labels("commit").observe(time.perf_counter() - put_done)
            FLUSHES.inc()
            FLUSH_APPENDS.observe(len(batch))
            if key is not None and not any(change.chunk is not None for change in changes):
                # Every append in it was refused, so no row points at the object: drop it now
                # rather than leave it to the orphan sweep.
                with contextlib.suppress(ObjectStoreUnavailable):
                    await self._objects.delete([key])
        except Exception as exc:  # never leave an appender waiting
            logger.exception("group commit crashed")
            self._fail(batch, exc)
        finally:
            if previous is not None and not previous.is_set():
                await previous.wait()
            done.set()
            self._slots.release()

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    @staticmethod
    def _layout(batch: list[_Pending]) -> bytes:
        """One object: each stream's blobs together, in arrival order, so accepted appends of a
        stream are adjacent and usually index as one chunk."""
        by_stream: dict[int, list[_Pending]] = {}
        for pending in batch:
            if pending.request.records:
                by_stream.setdefault(pending.request.stream_id, []).append(pending)
        parts: list[bytes] = []
        position = 0
        for pendings in by_stream.values():
            for pending in pendings:
                blob = encode_blob(pending.request.records)
                pending.blob_start = position
                pending.blob_length = len(blob)
                position += len(blob)
                parts.append(blob)
        return b"".join(parts)

    async def _commit(
        self, batch: list[_Pending], key: str | None, body: bytes, put_done: float
    ) -> list[TailChange]:
        stream_ids = sorted({pending.request.stream_id for pending in batch})
        producer_keys = sorted(
            {(p.request.stream_id, p.request.producer.id) for p in batch if p.request.producer is not None}
        )
        async with discarding_on_failure(self._pool, acquire_timeout=self._statement_timeout) as conn:
            if time.perf_counter() - put_done > _MAX_PUT_TO_COMMIT_SECONDS:
                # The orphan sweep deletes objects no row knows once they are old enough; an
                # object must never gain its rows after that, so a stalled flush gives up.
                raise _Stalled
            await conn.execute("BEGIN", timeout=self._statement_timeout)
            rows = await conn.fetch(
                """SELECT pg_current_xact_id()::text AS xid,
                          s.id, s.content_type, s.next_offset, s.last_stream_seq, s.session_id,
                          s.closed_at IS NOT NULL AS closed, s.deleted_at IS NOT NULL AS deleted,
                          coalesce(s.expires_at <= now(), false) AS expired,
                          coalesce(ss.expires_at <= now(), false) AS session_expired
                   FROM streams s LEFT JOIN sessions ss ON ss.id = s.session_id
                   WHERE s.id = ANY($1::bigint[]) ORDER BY s.id FOR UPDATE OF s""",
                stream_ids,
                timeout=self._statement_timeout,
            )
            heads = {
                row["id"]: _Head(
                    next_offset=row["next_offset"],
                    content_type=row["content_type"],
                    closed=row["closed"],
                    deleted=row["deleted"],
                    expired=row["expired"],
                    session_expired=row["session_expired"],
                    last_stream_seq=row["last_stream_seq"],
                    session_id=row["session_id"],
                )
                for row in rows
            }
            producers: dict[tuple[int, str], ProducerState] = {}
            if producer_keys:
                for row in await conn.fetch(
                    """SELECT p.stream_id, p.producer_id, p.epoch, p.last_seq, p.last_next_offset
                       FROM stream_producers p
                       JOIN unnest($1::bigint[], $2::text[]) AS k (stream_id, producer_id)
                         ON p.stream_id = k.stream_id AND p.producer_id = k.producer_id""",
                    [k[0] for k in producer_keys],
                    [k[1] for k in producer_keys],
                    timeout=self._statement_timeout,
                ):
                    producers[(row["stream_id"], row["producer_id"])] = ProducerState(
                        row["epoch"], row["last_seq"], row["last_next_offset"]
                    )
            changed_producers: set[tuple[int, str]] = set()
            outcomes: list[tuple[_Pending, AppendOutcome | ApiError]] = []
            for pending in batch:
                head = heads.get(pending.request.stream_id)
                try:
                    outcome = self._decide(pending, head, key or "", producers, changed_producers)
                except ApiError as exc:
                    outcomes.append((pending, exc))
                else:
                    outcomes.append((pending, outcome))
            changes = self._changes(heads)
            await self._write(conn, key, len(body), heads, producers, changed_producers, changes)
            # Cached before COMMIT: this transaction's NOTIFY may reach the listener (and wake
            # every subscriber) before COMMIT's reply reaches us, and they must find the bytes.
            self._cache_chunks(key, body, changes)
            await self._commit_or_learn_outcome(conn, rows[0]["xid"] if rows else None)
        for head in heads.values():
            if head.records and head.session_id is not None:
                self._activity.touch(head.session_id)
        for pending, result in outcomes:
            if pending.future.done():
                continue
            if isinstance(result, ApiError):
                APPENDS.labels(result.code).inc()
                pending.future.set_exception(result)
            else:
                APPENDS.labels("duplicate" if result.duplicate else "ok").inc()
                RECORDS.inc(result.appended)
                pending.future.set_result(result)
        return changes

    async def _commit_or_learn_outcome(self, conn: Any, xid: str | None) -> None:
        """COMMIT, and when its reply is lost (timeout, connection dropped) ask Postgres how the
        transaction ended instead of guessing: an append answered "failed" must have left nothing,
        and one that committed must be acknowledged. Raises the COMMIT's error when it aborted,
        _CommitUnconfirmed when Postgres cannot tell within the outcome wait."""
        try:
            await conn.execute("COMMIT", timeout=self._statement_timeout)
            return
        except asyncpg.PostgresError:
            raise  # Postgres answered: the transaction aborted
        except POSTGRES_UNAVAILABLE as exc:
            # The connection's protocol state is unknown now: never reuse it. (asyncpg may have
            # closed it and handed it back to the pool already.)
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
            if xid is None:
                raise  # nothing was written in it
            committed = await self._transaction_committed(xid)
            if committed is None:
                raise _CommitUnconfirmed(xid) from exc
            if not committed:
                raise
            logger.info("group commit confirmed after its reply was lost", extra={"xid": xid})

    async def _transaction_committed(self, xid: str) -> bool | None:
        """How transaction ``xid`` ended, asked on another connection until the outcome wait runs
        out: True committed, False aborted, None unknown (Postgres unreachable, or still
        committing)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._outcome_wait
        last_error: BaseException | None = None
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with discarding_on_failure(self._pool, acquire_timeout=remaining) as conn:
                    status = await conn.fetchval(
                        "SELECT pg_xact_status($1::text::xid8)",
                        xid,
                        timeout=max(deadline - loop.time(), 0.01),
                    )
            except POSTGRES_UNAVAILABLE as exc:
                status, last_error = None, exc
            if status == "committed":
                return True
            if status == "aborted":
                return False
            await asyncio.sleep(min(_OUTCOME_POLL_SECONDS, max(deadline - loop.time(), 0)))
        logger.warning(
            "could not learn a transaction's outcome",
            extra={"xid": xid, "error": repr(last_error) if last_error else "still in progress"},
        )
        return None

    def _cache_chunks(self, key: str | None, body: bytes, changes: list[TailChange]) -> None:
        if key is None:
            return
        for change in changes:
            if change.chunk is not None:
                start, length = change.chunk.byte_start, change.chunk.byte_length
                self._cache.put(ChunkKey(key, start, length), body[start : start + length])

    @staticmethod
    def _decide(
        pending: _Pending,
        head: _Head | None,
        key: str,
        producers: dict[tuple[int, str], ProducerState],
        changed_producers: set[tuple[int, str]],
    ) -> AppendOutcome:
        request = pending.request
        if head is None or head.expired:
            raise StreamNotFound("stream not found")
        if head.deleted:
            raise StreamGone()
        producer = request.producer
        state = producers.get((request.stream_id, producer.id)) if producer is not None else None
        if producer is not None and decide(state, producer) == "duplicate":
            assert state is not None
            return AppendOutcome(
                start_offset=state.last_next_offset,
                next_offset=state.last_next_offset,
                appended=0,
                closed=head.closed,
                duplicate=True,
                producer_epoch=state.epoch,
                producer_seq=state.last_seq,
            )
        if head.closed:
            if not request.records and request.close:
                return AppendOutcome(head.next_offset, head.next_offset, 0, closed=True)
            raise stream_closed(head.next_offset)
        if head.session_expired:
            raise SessionExpired("the session has expired; its channels take no appends")
        if request.records and request.content_type is not None:
            check_content_type(request.content_type, head.content_type)
        if request.stream_seq is not None:
            if head.last_stream_seq is not None and request.stream_seq <= head.last_stream_seq:
                raise StreamSeqConflict(
                    f"Stream-Seq {request.stream_seq!r} is not after {head.last_stream_seq!r}",
                )
            head.last_stream_seq = request.stream_seq
            head.stream_seq_changed = True
        start = head.next_offset
        count = len(request.records)
        if count:
            chunk = ChunkRef(start, start + count, key, pending.blob_start, pending.blob_length)
            last = head.chunks[-1] if head.chunks else None
            if (
                last is not None
                and last.end == start
                and last.byte_start + last.byte_length == pending.blob_start
            ):
                head.chunks[-1] = ChunkRef(
                    last.start, chunk.end, key, last.byte_start, last.byte_length + pending.blob_length
                )
            else:
                head.chunks.append(chunk)
            head.next_offset += count
            head.records += count
            head.bytes += pending.size
        if request.close:
            head.closed = True
            head.close_now = True
        if producer is not None:
            producers[(request.stream_id, producer.id)] = ProducerState(
                producer.epoch, producer.seq, head.next_offset
            )
            changed_producers.add((request.stream_id, producer.id))
        return AppendOutcome(
            start,
            head.next_offset,
            count,
            closed=head.closed,
            producer_epoch=producer.epoch if producer else None,
            producer_seq=producer.seq if producer else None,
        )

    @staticmethod
    def _changes(heads: dict[int, _Head]) -> list[TailChange]:
        changes: list[TailChange] = []
        for stream_id, head in heads.items():
            for index, chunk in enumerate(head.chunks):
                last = index == len(head.chunks) - 1
                changes.append(TailChange(stream_id, chunk.end, head.closed and last, chunk))
            if head.close_now and not head.chunks:
                changes.append(TailChange(stream_id, head.next_offset, True, None))
        return changes

    async def _write(
        self,
        conn: Any,
        key: str | None,
        size: int,
        heads: dict[int, _Head],
        producers: dict[tuple[int, str], ProducerState],
        changed_producers: set[tuple[int, str]],
        changes: list[TailChange],
    ) -> None:
        chunk_rows = [(stream_id, chunk) for stream_id, head in heads.items() for chunk in head.chunks]
        moved = {
            stream_id: head
            for stream_id, head in heads.items()
            if head.records or head.close_now or head.stream_seq_changed
        }
        if not moved and not changed_producers:
            return
        producer_items = [(k, producers[k]) for k in sorted(changed_producers)]
        await conn.execute(
            """WITH obj AS (
                   INSERT INTO stream_objects (key, size, kind)
                   SELECT $1::text, $2::bigint, 'batch' WHERE $1::text IS NOT NULL AND cardinality($3::bigint[]) > 0
                   RETURNING id
               ), chunks AS (
                   INSERT INTO stream_chunks (stream_id, start_offset, end_offset, object_id, byte_start, byte_length)
                   SELECT c.stream_id, c.start_offset, c.end_offset, obj.id, c.byte_start, c.byte_length
                   FROM obj, unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::int[])
                        AS c (stream_id, start_offset, end_offset, byte_start, byte_length)
               ), heads AS (
                   UPDATE streams s SET
                       next_offset = u.next_offset,
                       records = s.records + u.records,
                       bytes = s.bytes + u.bytes,
                       first_record_at = CASE WHEN u.records > 0 THEN coalesce(s.first_record_at, now())
                                              ELSE s.first_record_at END,
                       last_record_at = CASE WHEN u.records > 0 THEN now() ELSE s.last_record_at END,
                       closed_at = CASE WHEN u.close_now THEN coalesce(s.closed_at, now()) ELSE s.closed_at END,
                       last_stream_seq = coalesce(u.stream_seq, s.last_stream_seq),
                       expires_at = CASE WHEN s.ttl_seconds IS NOT NULL
                                         THEN now() + s.ttl_seconds * interval '1 second'
                                         ELSE s.expires_at END
                   FROM unnest($8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bool[], $13::text[])
                        AS u (id, next_offset, records, bytes, close_now, stream_seq)
                   WHERE s.id = u.id
               ), producers AS (
                   INSERT INTO stream_producers (stream_id, producer_id, epoch, last_seq, last_next_offset)
                   SELECT * FROM unnest($14::bigint[], $15::text[], $16::bigint[], $17::bigint[], $18::bigint[])
                   ON CONFLICT (stream_id, producer_id) DO UPDATE
                   SET epoch = excluded.epoch, last_seq = excluded.last_seq,
                       last_next_offset = excluded.last_next_offset, updated_at = now()
               )
               SELECT pg_notify($20, p) FROM unnest($19::text[]) AS p""",
            key,
            size,
            [stream_id for stream_id, _ in chunk_rows],
            [chunk.start for _, chunk in chunk_rows],
            [chunk.end for _, chunk in chunk_rows],
            [chunk.byte_start for _, chunk in chunk_rows],
            [chunk.byte_length for _, chunk in chunk_rows],
            list(moved),
            [head.next_offset for head in moved.values()],
            [head.records for head in moved.values()],
            [head.bytes for head in moved.values()],
            [head.close_now for head in moved.values()],
            [head.last_stream_seq if head.stream_seq_changed else None for head in moved.values()],
            [k[0] for k, _ in producer_items],
            [k[1] for k, _ in producer_items],
            [state.epoch for _, state in producer_items],
            [state.last_seq for _, state in producer_items],
            [state.last_next_offset for _, state in producer_items],
            encode_notifications(changes),
            NOTIFY_CHANNEL,
            timeout=self._statement_timeout,
        )
