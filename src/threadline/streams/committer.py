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

In the steady state the transaction is one statement (one round trip): when this committer
knows the heads of every stream in the flush (it committed them last; :class:`KnownHeads`), it
decides against those and sends ``threadline_guarded_flush`` (pg_migrations/0007), which writes
only if the heads and producer states still hold the values the decisions relied on. If another
worker or instance moved a head, or an append would be refused or is a producer duplicate, the
flush falls back to lock-and-decide above. Either way the appends are acknowledged only after
the PUT and the commit.

While one flush is in flight the next one fills up, so batches grow with load and latency stays
one PUT plus one commit when idle. Up to ``max_inflight`` flushes are in flight at once: their
PUTs overlap, and flushes with no stream in common commit concurrently, each on its own pooled
connection; a flush that shares a stream with an earlier one commits after it, so per stream the
order appends were queued in is the order they commit in (a producer pipelining its sequence
numbers relies on that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from prometheus_client import Counter, Histogram

from threadline.db import POSTGRES_UNAVAILABLE, Conn, discarding_on_failure
from threadline.errors import (
    ApiError,
    DatabaseUnavailable,
    OutcomeUnknown,
    ShuttingDown,
    StorageUnavailable,
)
from threadline.storage.objects import ObjectStore, ObjectStoreUnavailable
from threadline.streams.cache import ChunkCache, ChunkKey
from threadline.streams.flush_plan import (
    AppendOutcome,
    AppendRequest,
    Decided,
    FlushWrite,
    Head,
    KnownHeads,
    ProducerKey,
    decide_append,
    tail_changes,
)
from threadline.streams.live import LiveHub
from threadline.streams.producers import ProducerState
from threadline.streams.records import encode_blob
from threadline.streams.wire import TailChange

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


# Prepared once per connection by asyncpg's statement cache; the argument lists are
# flush_plan's guard arrays followed by FlushWrite.args.
_GUARDED_FLUSH = "SELECT threadline_guarded_flush({})".format(", ".join(f"${n}" for n in range(1, 29)))
_FLUSH_WRITE = "SELECT threadline_flush_write({})".format(", ".join(f"${n}" for n in range(1, 21)))


class ActivitySink(Protocol):
    """Told which sessions' channels took records in a commit (``lastActiveAt`` is the sessions
    package's business; streams only report it)."""

    def touch(self, session_id: str) -> None: ...


FLUSHES = Counter("threadline_stream_flushes_total", "Group commits (one object PUT + one transaction each)")
FLUSH_FAILURES = Counter("threadline_stream_flush_failures_total", "Group commits that failed", ["stage"])
APPENDS = Counter("threadline_stream_appends_total", "Append requests decided", ["result"])
RECORDS = Counter("threadline_stream_records_total", "Records appended")
FLUSH_PATHS = Counter(
    "threadline_stream_flush_paths_total",
    "How group commits were decided: guarded (one statement against remembered heads), "
    "guard_failed (a head or producer moved elsewhere: fell back), undecided (by the remembered "
    "heads an append is refused or a duplicate: fell back to decide that under lock), locked "
    "(lock-and-decide, fallbacks included)",
    ["path"],
)
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


_UNPLACED = Decided(0, 0, 0)  # an append with no records has no bytes in the object


@dataclass(eq=False, slots=True)
class _Pending:
    request: AppendRequest
    future: asyncio.Future[AppendOutcome]
    size: int
    placed: Decided = _UNPLACED


@dataclass(slots=True)
class _Decisions:
    """A flush decided against ``heads``: each append's outcome, and what to write."""

    heads: dict[int, Head]
    producers: dict[ProducerKey, ProducerState]
    outcomes: list[tuple[_Pending, AppendOutcome | ApiError]]
    changes: list[TailChange]
    write: FlushWrite


@dataclass(eq=False, slots=True)
class _InFlight:
    streams: frozenset[int]
    done: asyncio.Event


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
        self._inflight: list[_InFlight] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._known = KnownHeads()
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
                    streams = frozenset(pending.request.stream_id for pending in batch)
                    # Per stream, flushes commit in the order they were taken: wait for every
                    # earlier flush still in flight that shares a stream with this one.
                    earlier = [f.done for f in self._inflight if not f.streams.isdisjoint(streams)]
                    this = _InFlight(streams, asyncio.Event())
                    self._inflight.append(this)
                    task = asyncio.create_task(self._flush(batch, earlier, this), name="threadline-flush")
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

    async def _flush(self, batch: list[_Pending], earlier: list[asyncio.Event], this: _InFlight) -> None:
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
            for event in earlier:
                await event.wait()  # per stream, transactions commit in flush order
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
            for event in earlier:
                if not event.is_set():
                    await event.wait()
            this.done.set()
            self._inflight.remove(this)
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
                pending.placed = Decided(position, len(blob), pending.size)
                position += len(blob)
                parts.append(blob)
        return b"".join(parts)

    async def _commit(
        self, batch: list[_Pending], key: str | None, body: bytes, put_done: float
    ) -> list[TailChange]:
        stream_ids = sorted({pending.request.stream_id for pending in batch})
        try:
            if key is not None:
                decided = await self._commit_guarded(batch, stream_ids, key, body, put_done)
                if decided is not None:
                    FLUSH_PATHS.labels("guarded").inc()
                    return self._acknowledge(decided)
            FLUSH_PATHS.labels("locked").inc()
            decided = await self._commit_locked(batch, stream_ids, key, body, put_done)
            self._known.forget(set(stream_ids) - decided.heads.keys())
            return self._acknowledge(decided)
        except BaseException:
            # Whatever this committer remembered of these heads may be wrong now.
            self._known.forget(stream_ids)
            raise

    def _decide(
        self,
        batch: list[_Pending],
        heads: dict[int, Head],
        key: str | None,
        size: int,
        producers: dict[ProducerKey, ProducerState],
    ) -> _Decisions:
        changed_producers: set[ProducerKey] = set()
        outcomes: list[tuple[_Pending, AppendOutcome | ApiError]] = []
        for pending in batch:
            head = heads.get(pending.request.stream_id)
            try:
                outcome = decide_append(
                    pending.request, pending.placed, head, key or "", producers, changed_producers
                )
            except ApiError as exc:
                outcomes.append((pending, exc))
            else:
                outcomes.append((pending, outcome))
        changes = tail_changes(heads)
        write = FlushWrite.build(key, size, heads, producers, changed_producers, changes)
        return _Decisions(heads, producers, outcomes, changes, write)

    async def _commit_guarded(
        self, batch: list[_Pending], stream_ids: list[int], key: str, body: bytes, put_done: float
    ) -> _Decisions | None:
        """The steady state: decide against the heads this committer remembers and commit in one
        guarded statement. None when that cannot be done (a head unknown, an append this path
        does not decide: a refusal or a producer duplicate, whose answer must come from the
        locked heads) or the guard found a head or producer moved: nothing was written then."""
        heads = self._known.heads_for(stream_ids)
        if heads is None:
            return None
        producer_keys = sorted(
            {(p.request.stream_id, p.request.producer.id) for p in batch if p.request.producer is not None}
        )
        expected_producers = self._known.producer_states(producer_keys)
        expected_heads = [
            (stream_id, heads[stream_id].next_offset, heads[stream_id].last_stream_seq)
            for stream_id in stream_ids
        ]
        producers = {k: state for k, state in expected_producers.items() if state is not None}
        decided = self._decide(batch, heads, key, len(body), producers)
        if any(isinstance(result, ApiError) or result.duplicate for _, result in decided.outcomes):
            FLUSH_PATHS.labels("undecided").inc()
            return None
        guard = (
            [stream_id for stream_id, _, _ in expected_heads],
            [offset for _, offset, _ in expected_heads],
            [seq for _, _, seq in expected_heads],
            [k[0] for k in producer_keys],
            [k[1] for k in producer_keys],
            [s.epoch if (s := expected_producers[k]) else None for k in producer_keys],
            [s.last_seq if (s := expected_producers[k]) else None for k in producer_keys],
            [s.last_next_offset if (s := expected_producers[k]) else None for k in producer_keys],
        )
        async with discarding_on_failure(self._pool, acquire_timeout=self._statement_timeout) as conn:
            if time.perf_counter() - put_done > _MAX_PUT_TO_COMMIT_SECONDS:
                raise _Stalled
            # Cached before the statement: its NOTIFY may wake subscribers before its reply.
            self._cache_chunks(key, body, decided.changes)
            backend = conn.get_server_pid()
            try:
                committed = await conn.fetchval(
                    _GUARDED_FLUSH, *guard, *decided.write.args, timeout=self._statement_timeout
                )
            except asyncpg.PostgresError:
                raise  # Postgres answered: the statement's transaction aborted
            except POSTGRES_UNAVAILABLE as exc:
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                stored = await self._object_committed(key, backend)
                if stored is None:
                    raise _CommitUnconfirmed(f"guarded flush of {key} (backend {backend})") from exc
                if not stored:
                    raise
                logger.info("guarded flush confirmed after its reply was lost", extra={"key": key})
                committed = True
        if not committed:
            FLUSH_PATHS.labels("guard_failed").inc()
            return None
        return decided

    async def _commit_locked(
        self, batch: list[_Pending], stream_ids: list[int], key: str | None, body: bytes, put_done: float
    ) -> _Decisions:
        """Lock the heads, decide against them, write, COMMIT: exact whatever others did."""
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
                row["id"]: Head(
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
            producers: dict[ProducerKey, ProducerState] = {}
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
            decided = self._decide(batch, heads, key, len(body), producers)
            if not decided.write.empty:
                await conn.execute(_FLUSH_WRITE, *decided.write.args, timeout=self._statement_timeout)
            # Cached before COMMIT: this transaction's NOTIFY may reach the listener (and wake
            # every subscriber) before COMMIT's reply reaches us, and they must find the bytes.
            self._cache_chunks(key, body, decided.changes)
            await self._commit_or_learn_outcome(conn, rows[0]["xid"] if rows else None)
        return decided

    def _acknowledge(self, decided: _Decisions) -> list[TailChange]:
        """After the commit: remember the heads as this commit left them (exact at commit, on
        either path), and answer the appenders."""
        self._known.remember(decided.heads, decided.producers)
        for head in decided.heads.values():
            if head.records and head.session_id is not None:
                self._activity.touch(head.session_id)
        for pending, result in decided.outcomes:
            if pending.future.done():
                continue
            if isinstance(result, ApiError):
                APPENDS.labels(result.code).inc()
                pending.future.set_exception(result)
            else:
                APPENDS.labels("duplicate" if result.duplicate else "ok").inc()
                RECORDS.inc(result.appended)
                pending.future.set_result(result)
        return decided.changes

    async def _object_committed(self, key: str, backend: int) -> bool | None:
        """Whether the one-statement flush that wrote ``key`` committed, when its reply was lost:
        True once its object row is visible, False once the backend that ran it has exited
        without it (a statement's transaction ends with its backend at the latest), None if
        neither is known within the outcome wait. The backend is asked about first, the row
        after, in separate statements: a row committed just before the backend exited is then
        always seen."""

        async def ask(conn: Conn, bound: float) -> bool | None:
            running = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", backend, timeout=bound
            )
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM stream_objects WHERE key = $1)", key, timeout=bound
            ):
                return True
            return None if running else False

        return await self._learn_outcome(ask, {"key": key, "backend": str(backend)})

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
        """How transaction ``xid`` ended: True committed, False aborted, None unknown (Postgres
        unreachable, or still committing)."""

        async def ask(conn: Conn, bound: float) -> bool | None:
            status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", xid, timeout=bound)
            return {"committed": True, "aborted": False}.get(status)

        return await self._learn_outcome(ask, {"xid": xid})

    async def _learn_outcome(
        self, ask: Callable[[Conn, float], Awaitable[bool | None]], context: dict[str, str]
    ) -> bool | None:
        """Ask Postgres, on other connections, how a commit whose reply was lost ended, until it
        says or the outcome wait runs out (then None: unknown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._outcome_wait
        last_error: BaseException | None = None
        while (remaining := deadline - loop.time()) > 0:
            answer: bool | None = None
            try:
                async with discarding_on_failure(self._pool, acquire_timeout=remaining) as conn:
                    answer = await ask(conn, max(deadline - loop.time(), 0.01))
            except POSTGRES_UNAVAILABLE as exc:
                last_error = exc
            if answer is not None:
                return answer
            await asyncio.sleep(min(_OUTCOME_POLL_SECONDS, max(deadline - loop.time(), 0)))
        logger.warning(
            "could not learn a commit's outcome",
            extra={**context, "error": repr(last_error) if last_error else "still in progress"},
        )
        return None

    def _cache_chunks(self, key: str | None, body: bytes, changes: list[TailChange]) -> None:
        if key is None:
            return
        for change in changes:
            if change.chunk is not None:
                start, length = change.chunk.byte_start, change.chunk.byte_length
                self._cache.put(ChunkKey(key, start, length), body[start : start + length])
