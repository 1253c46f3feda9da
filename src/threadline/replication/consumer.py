"""The leader-locked consumer that mirrors Postgres ``sessions`` into ClickHouse ``sessions_v1``.

Every server instance runs one; exactly one leads. Leadership is a Postgres advisory lock held
on the consumer's own connection, and every read and confirm of the slot happens on that same
connection, so a leader that dies (or loses its connection) stops confirming at once and its lock
is released for a standby.

Reading the slot: neither asyncpg nor psycopg 3 speaks the streaming replication protocol, so the
consumer polls ``pg_logical_slot_peek_binary_changes`` — peek, not get: nothing is consumed until
ClickHouse has committed the rows — and then confirms with ``pg_replication_slot_advance``. A
failed ClickHouse insert keeps the batch and retries with backoff; the slot holds the WAL, so the
lag grows and nothing is lost.

Versions: a row's ``_version`` is its transaction's commit LSN. Backfilled rows carry the slot's
confirmed position at backfill time, which is above every commit they reflect and below every
commit the slot will still deliver, so ReplacingMergeTree keeps the right row in every order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from threadline.config import sql_dir
from threadline.replication import PUBLICATION, SLOT
from threadline.replication.pgoutput import (
    Begin,
    Change,
    Commit,
    Relation,
    Truncate,
    decode_message,
    format_lsn,
    parse_lsn,
    row_values,
)
from threadline.replication.progress import slot_status
from threadline.sessions.fields import SESSIONS_V1_COLUMNS
from threadline.storage.clickhouse import (
    AsyncClient,
    ClickHouseError,
    ClickHouseUnavailable,
    apply_clickhouse_schema,
    clickhouse_errors,
    connect_clickhouse,
)

__all__ = ["ReplicationConsumer", "SessionRow"]

logger = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every Threadline process.
LEADER_LOCK_KEY = 0x7468_7264_6C6E_0002
_POSTGRES_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds

# The sessions_v1 columns in schema order, from the one definition in sessions.fields.
COLUMNS = [column.name for column in SESSIONS_V1_COLUMNS]

# With several workers (threadline.workers) /metrics aggregates every live worker: these gauges
# report the largest value among them, so the instance reads as leader while any worker leads.
LEADER = Gauge(
    "threadline_replication_leader",
    "1 while this instance leads the sessions mirror",
    multiprocess_mode="livemax",
)
LAG_BYTES = Gauge(
    "threadline_replication_lag_bytes",
    "WAL bytes between the flush position and the confirmed one",
    multiprocess_mode="livemax",
)
LAG_SECONDS = Gauge(
    "threadline_replication_lag_seconds",
    "Age of the oldest commit not yet in ClickHouse",
    multiprocess_mode="livemax",
)
BATCHES = Counter("threadline_replication_batches_total", "Batches written to ClickHouse")
ROWS = Counter("threadline_replication_rows_total", "Session rows written to ClickHouse (after coalescing)")
BATCH_ROWS = Histogram(
    "threadline_replication_batch_rows", "Rows per ClickHouse batch", buckets=(1, 10, 100, 1000, 5000, 20000)
)
FLUSH_SECONDS = Histogram(
    "threadline_replication_flush_duration_seconds",
    "ClickHouse insert time per batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
FLUSH_FAILURES = Counter("threadline_replication_flush_failures_total", "Failed ClickHouse inserts (retried)")
BACKFILLED = Counter("threadline_replication_backfilled_rows_total", "Sessions copied by backfills")
RETAINED_WAL_BYTES = Gauge(
    "threadline_replication_retained_wal_bytes",
    "WAL Postgres keeps for the slot (leader's last reading)",
    multiprocess_mode="livemax",
)
SAFE_WAL_BYTES = Gauge(
    "threadline_replication_safe_wal_bytes",
    "WAL Postgres may still write before it invalidates the slot (leader's last reading; "
    "NaN while unknown or max_slot_wal_keep_size is unlimited)",
    # Most recent, not largest: every worker starts at NaN and only the leader updates it, and
    # max() over NaN depends on the order it meets the values in.
    multiprocess_mode="livemostrecent",
)
# NaN, not 0, until read: 0 would mean "invalidation is imminent" to a dashboard or an alert.
SAFE_WAL_BYTES.set(math.nan)
SLOT_RECREATED = Counter(
    "threadline_replication_slot_recreated_total", "Slots found invalidated by Postgres and recreated"
)
_RETAINED_WAL_INTERVAL = 5.0


@dataclass(slots=True)
class SessionRow:
    """One version of a session as it goes to ClickHouse."""

    values: dict[str, Any]
    version: int
    deleted: bool

    @property
    def session_id(self) -> str:
        return str(self.values["id"])

    def as_clickhouse(self) -> list[Any]:
        """The row's ``sessions_v1`` values, in :data:`COLUMNS` order."""
        return [column.value(self) for column in SESSIONS_V1_COLUMNS]


@dataclass(slots=True)
class _Batch:
    rows: dict[str, SessionRow]
    end_lsn: int | None = None  # confirm up to here once stored
    first_commit_time: float | None = None  # Unix seconds


def _commit_time(postgres_us: int) -> float:
    return (postgres_us + _POSTGRES_EPOCH_US) / 1_000_000


def decode_batch(messages: Iterable[bytes], relation_name: str = "sessions") -> _Batch:
    """Turn peeked messages into the newest row per session, for whole transactions only."""
    relations: dict[int, Relation] = {}
    batch = _Batch(rows={})
    pending: dict[str, SessionRow] = {}
    version: int | None = None
    commit_time: float | None = None
    for data in messages:
        message = decode_message(data)
        if isinstance(message, Relation):
            relations[message.relation_id] = message
        elif isinstance(message, Begin):
            version, pending = message.final_lsn, {}
            commit_time = _commit_time(message.commit_time_us)
        elif isinstance(message, Change):
            relation = relations[message.relation_id]
            if relation.name != relation_name or version is None:
                continue
            old = row_values(relation, message.old) if message.old is not None else None
            if message.kind == "delete":
                assert old is not None
                row = SessionRow(old, version, deleted=True)
            else:
                assert message.new is not None
                row = SessionRow(row_values(relation, message.new, fallback=old), version, deleted=False)
            pending[row.session_id] = row
        elif isinstance(message, Commit):
            for session_id, row in pending.items():
                current = batch.rows.get(session_id)
                if current is None or current.version <= row.version:
                    batch.rows[session_id] = row
            pending = {}
            batch.end_lsn = message.end_lsn
            if batch.first_commit_time is None:
                batch.first_commit_time = commit_time
        elif isinstance(message, Truncate):
            raise RuntimeError(
                "the sessions table was truncated; the ClickHouse mirror cannot follow a TRUNCATE. "
                "Drop the replication slot and restart to backfill from scratch."
            )
    return batch


class ReplicationConsumer:
    def __init__(
        self,
        database_url: str,
        clickhouse_url: str,
        *,
        batch_rows: int = 5000,
        poll_interval: float = 0.1,
        lock_retry_interval: float = 1.0,
        max_backoff: float = 10.0,
    ) -> None:
        self._database_url = database_url
        self._clickhouse_url = clickhouse_url
        self._batch_rows = batch_rows
        self._poll_interval = poll_interval
        self._lock_retry_interval = lock_retry_interval
        self._max_backoff = max_backoff
        self.is_leader = False
        self.confirmed_lsn: int | None = None
        self.lag_seconds = 0.0  # age of the oldest commit not yet in ClickHouse (leader only)
        self._retained_reported_at = 0.0

    async def run(self) -> None:
        """Lead or stand by, forever; any failure drops leadership and starts over."""
        failures = 0
        while True:
            try:
                await self._run_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures)
                logger.warning(
                    "replication consumer restarting",
                    extra={"error": repr(exc)[:500], "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        return float(min(self._max_backoff, 0.1 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0))

    async def _run_once(self) -> None:
        conn = await asyncpg.connect(
            self._database_url,
            server_settings={
                "TimeZone": "UTC",
                "DateStyle": "ISO",
                "application_name": "threadline-replication",
            },
        )
        clickhouse: AsyncClient | None = None
        try:
            await self._wait_for_leadership(conn)
            self.is_leader = True
            LEADER.set(1)
            logger.info("replication leader elected", extra={"slot": SLOT})
            clickhouse = await connect_clickhouse(self._clickhouse_url)
            await self._prepare(conn, clickhouse)
            await self._consume(conn, clickhouse)
        finally:
            self.is_leader = False
            LEADER.set(0)
            if clickhouse is not None:
                await clickhouse.close()
            # Closing the connection releases the advisory lock for a standby.
            await asyncio.shield(conn.close(timeout=5))

    async def _wait_for_leadership(self, conn: asyncpg.Connection[Any]) -> None:
        """Stand by until this connection holds the leader lock (polled: Postgres has no
        blocking try-lock that also notices our own shutdown)."""
        while True:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK_KEY):
                return
            await asyncio.sleep(self._lock_retry_interval)

    async def _prepare(self, conn: asyncpg.Connection[Any], clickhouse: AsyncClient) -> None:
        """Schema, publication, slot and (when needed) a backfill, in an order that survives crashes."""
        await apply_clickhouse_schema(clickhouse, sql_dir("clickhouse_schema"))  # idempotent
        if not await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", PUBLICATION):
            await conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE sessions")
        status = await slot_status(conn)
        if status is not None and status.lost:
            # Postgres invalidated the slot (it held more WAL than max_slot_wal_keep_size while
            # nobody confirmed it): the changes in between are gone. Start over with a new slot
            # and a full copy; lists come from Postgres until that copy is done.
            logger.warning(
                "replication slot was invalidated; recreating it and copying again", extra={"slot": SLOT}
            )
            SLOT_RECREATED.inc()
            await conn.execute("SELECT pg_drop_replication_slot($1)", SLOT)
            status = None
        if status is None:
            # Forget any earlier backfill first: if we die after creating the slot, the next
            # leader must copy again, not trust rows from a slot that no longer exists.
            await conn.execute(
                """INSERT INTO replication_state (slot_name) VALUES ($1)
                   ON CONFLICT (slot_name) DO UPDATE SET backfilled_at = NULL, backfill_lsn = NULL,
                                                         updated_at = now()""",
                SLOT,
            )
            await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", SLOT)
            logger.info("replication slot created", extra={"slot": SLOT})
        confirmed = parse_lsn(
            await conn.fetchval(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", SLOT
            )
        )
        self.confirmed_lsn = confirmed
        backfilled = await conn.fetchval(
            "SELECT backfilled_at IS NOT NULL FROM replication_state WHERE slot_name = $1", SLOT
        )
        with clickhouse_errors("reading the backfill marker"):
            result = await clickhouse.query(
                "SELECT count() FROM replication_state FINAL WHERE slot = {slot:String}",
                parameters={"slot": SLOT},
            )
        marker_present = bool(result.result_rows[0][0])
        if not backfilled or not marker_present:
            await self._backfill(conn, clickhouse, confirmed)

    async def _backfill(self, conn: asyncpg.Connection[Any], clickhouse: AsyncClient, version: int) -> None:
        started = time.perf_counter()
        copied = 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            batch: list[SessionRow] = []
            async for record in conn.cursor("SELECT * FROM sessions", prefetch=2000):
                batch.append(SessionRow(dict(record), version, deleted=False))
                if len(batch) >= self._batch_rows:
                    await self._insert(clickhouse, batch)
                    copied += len(batch)
                    batch = []
            if batch:
                await self._insert(clickhouse, batch)
                copied += len(batch)
            # A copy after a lost slot (or a reset) must also hide sessions deleted meanwhile:
            # their deletes were in the WAL that is gone. Same snapshot, same version.
            tombstones = await self._tombstones(conn, clickhouse, version)
        with clickhouse_errors("writing the backfill marker"):
            await clickhouse.insert(
                "replication_state",
                [[SLOT, version, datetime.now(UTC)]],
                column_names=["slot", "backfill_lsn", "backfilled_at"],
            )
        await conn.execute(
            """UPDATE replication_state SET backfilled_at = now(), backfill_lsn = $2::text::pg_lsn, updated_at = now()
               WHERE slot_name = $1""",
            SLOT,
            format_lsn(version),
        )
        BACKFILLED.inc(copied)
        logger.info(
            "replication backfill done",
            extra={
                "rows": copied,
                "tombstones": tombstones,
                "seconds": round(time.perf_counter() - started, 3),
                "version": format_lsn(version),
            },
        )

    async def _tombstones(self, conn: asyncpg.Connection[Any], clickhouse: AsyncClient, version: int) -> int:
        """Mark deleted every session ClickHouse shows that the backfill snapshot does not have.
        Runs inside the backfill's snapshot; returns how many it marked."""
        marked = 0
        after = ""
        while True:
            with clickhouse_errors("listing mirrored sessions"):
                result = await clickhouse.query(
                    f"SELECT {', '.join(COLUMNS)} FROM sessions_v1 FINAL"
                    " WHERE _is_deleted = 0 AND session_id > {after:String}"
                    " ORDER BY session_id LIMIT {limit:UInt32}",
                    parameters={"after": after, "limit": self._batch_rows},
                )
            rows = [dict(zip(COLUMNS, row, strict=True)) for row in result.result_rows]
            if not rows:
                return marked
            after = str(rows[-1]["session_id"])
            present = {
                record["id"]
                for record in await conn.fetch(
                    "SELECT id FROM sessions WHERE id = ANY($1::text[])", [row["session_id"] for row in rows]
                )
            }
            gone = [row for row in rows if row["session_id"] not in present]
            if gone:
                for row in gone:
                    row["_version"], row["_is_deleted"] = version, 1
                with clickhouse_errors("marking deleted sessions"):
                    await clickhouse.insert(
                        "sessions_v1",
                        [[row[column] for column in COLUMNS] for row in gone],
                        column_names=COLUMNS,
                    )
                marked += len(gone)

    async def _report_retained_wal(self, conn: asyncpg.Connection[Any]) -> None:
        """The WAL the slot makes Postgres keep: what fills the disk if nobody confirms it."""
        now = time.monotonic()
        if now - self._retained_reported_at < _RETAINED_WAL_INTERVAL:
            return
        self._retained_reported_at = now
        status = await slot_status(conn)
        if status is not None and status.retained_wal_bytes is not None:
            RETAINED_WAL_BYTES.set(status.retained_wal_bytes)
        if status is not None:
            SAFE_WAL_BYTES.set(math.nan if status.safe_wal_bytes is None else status.safe_wal_bytes)

    async def _consume(self, conn: asyncpg.Connection[Any], clickhouse: AsyncClient) -> None:
        while True:
            await self._report_retained_wal(conn)
            flush_before = parse_lsn(await conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
            try:
                records = await conn.fetch(
                    """SELECT data FROM pg_logical_slot_peek_binary_changes(
                           $1, NULL, $2, 'proto_version', '1', 'publication_names', $3)""",
                    SLOT,
                    self._batch_rows,
                    PUBLICATION,
                )
            except asyncpg.ObjectInUseError:
                # A dead leader's backend may still hold the slot for a moment.
                await asyncio.sleep(self._poll_interval)
                continue
            batch = decode_batch(record["data"] for record in records)
            if batch.end_lsn is None:
                # Nothing committed since we last looked: every commit up to flush_before is
                # confirmed, so readers waiting on an LSN (minLsn) are not left hanging.
                if self.confirmed_lsn is None or flush_before > self.confirmed_lsn:
                    await self._confirm(conn, flush_before)
                LAG_BYTES.set(0)
                self._set_lag(0.0)
                await asyncio.sleep(self._poll_interval)
                continue
            LAG_BYTES.set(max(0, flush_before - (self.confirmed_lsn or 0)))
            await self._store(clickhouse, batch)
            await self._confirm(conn, batch.end_lsn)
            if batch.first_commit_time is not None:
                self._set_lag(time.time() - batch.first_commit_time)

    async def _store(self, clickhouse: AsyncClient, batch: _Batch) -> None:
        """Insert until ClickHouse takes it; the batch is never dropped."""
        attempt = 0
        rows = list(batch.rows.values())
        while True:
            try:
                if rows:
                    await self._insert(clickhouse, rows)
                return
            except (ClickHouseUnavailable, ClickHouseError) as exc:
                attempt += 1
                FLUSH_FAILURES.inc()
                if batch.first_commit_time is not None:
                    self._set_lag(time.time() - batch.first_commit_time)
                delay = self._backoff(attempt)
                logger.warning(
                    "clickhouse insert failed; retrying",
                    extra={
                        "error": str(exc)[:300],
                        "rows": len(rows),
                        "attempt": attempt,
                        "retry_in_s": round(delay, 2),
                    },
                )
                await asyncio.sleep(delay)

    async def _insert(self, clickhouse: AsyncClient, rows: list[SessionRow]) -> None:
        started = time.perf_counter()
        with clickhouse_errors("inserting sessions"):
            await clickhouse.insert(
                "sessions_v1", [row.as_clickhouse() for row in rows], column_names=COLUMNS
            )
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        BATCHES.inc()
        ROWS.inc(len(rows))
        BATCH_ROWS.observe(len(rows))

    def _set_lag(self, seconds: float) -> None:
        self.lag_seconds = max(0.0, seconds)
        LAG_SECONDS.set(self.lag_seconds)

    async def _confirm(self, conn: asyncpg.Connection[Any], lsn: int) -> None:
        await conn.execute("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", SLOT, format_lsn(lsn))
        self.confirmed_lsn = lsn
