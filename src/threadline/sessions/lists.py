"""Where session lists and counts are read from (SPEC §3): ClickHouse, with Postgres as fallback.

ClickHouse picks the page's ids, Postgres hydrates them. ClickHouse is used when
``THREADLINE_LIST_SOURCE`` allows it (``auto`` also needs the mirror to be ready: a replication
slot whose backfill has finished; before that ClickHouse holds only part of the sessions) and
when it answers; otherwise, or when it fails mid-request, the same query runs on Postgres.
Failures back ClickHouse off for a few seconds, so a down ClickHouse costs one failed attempt per
few seconds, not one per request.

``minLsn`` only waits when ClickHouse serves: Postgres holds every acknowledged write already.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from prometheus_client import Histogram

from threadline.config import Settings
from threadline.db import Conn, ConnectionSource
from threadline.errors import ReplicationLagging
from threadline.metrics import count_dependency_error
from threadline.replication.progress import mirror_ready, wait_for_lsn
from threadline.sessions import clickhouse_listing, repository
from threadline.sessions.listing import CountQuery, ListQuery
from threadline.storage.clickhouse import (
    AsyncClient,
    ClickHouseError,
    ClickHouseUnavailable,
    connect_clickhouse,
    ping_clickhouse,
)

__all__ = ["ListSource", "SessionLists"]

ListSource = Literal["clickhouse", "postgres"]
T = TypeVar("T")

RETRY_SECONDS = 3.0  # after ClickHouse failed, serve from Postgres this long before trying again
MIRROR_CACHE_SECONDS = 3.0  # how long "the ClickHouse mirror is ready (or not)" is believed
QUERY_TIMEOUT_SECONDS = 10.0  # a ClickHouse query slower than this falls back to Postgres
CONNECT_TIMEOUT_SECONDS = 2.0

logger = logging.getLogger(__name__)

# Which store answered and how fast, per query kind: a list that silently moved to the Postgres
# fallback (ClickHouse down, mirror not ready) is visible as a change of source, not an error.
QUERY_SECONDS = Histogram(
    "threadline_session_list_duration_seconds",
    "Session list and count queries by kind and the store that served them (minLsn waits included)",
    ["kind", "source"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class SessionLists:
    """Lists and counts for one server instance, and the ClickHouse client they use.

    What it remembers between requests (``time.monotonic()`` times) keeps a down ClickHouse, or
    a deployment without replication, from costing every list a failed connect or an extra
    Postgres query.
    """

    def __init__(self, settings: Settings, pool: ConnectionSource, clickhouse: AsyncClient | None) -> None:
        self._settings = settings
        self._pool = pool
        self._client = clickhouse  # None while unreachable
        self._connect_lock = asyncio.Lock()
        self._retry_at = 0.0  # no ClickHouse (connect or query) before this
        self._mirror_checked_at: float | None = None
        self._mirror_ready = False

    async def clickhouse(self) -> AsyncClient:
        """The ClickHouse client, connecting first if there is none (e.g. ClickHouse was down at
        start). Serialised so concurrent requests do not each open, and leak, a client.

        Raises ClickHouseUnavailable.
        """
        async with self._connect_lock:
            if self._client is None:
                self._client = await connect_clickhouse(
                    self._settings.clickhouse_url, connect_timeout=CONNECT_TIMEOUT_SECONDS
                )
            return self._client

    async def ping(self) -> None:
        """Raise unless ClickHouse answers (``/readyz``)."""
        await ping_clickhouse(await self.clickhouse())

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def list(self, environment_id: str, query: ListQuery) -> tuple[repository.Page, ListSource]:
        """One page and where its ids came from; raises ServiceUnavailable if minLsn is not reached."""

        async def from_clickhouse(client: AsyncClient) -> repository.Page:
            window = await clickhouse_listing.list_session_ids(client, environment_id, query)
            async with self._pool.acquire() as conn:
                sessions = await repository.hydrate_sessions(
                    conn, environment_id, [item.id for item in window.items]
                )
            # Cursors keep ClickHouse's keys: if Postgres has a newer lastActiveAt (replication
            # lag), paging must still continue from where ClickHouse's order put the row.
            return repository.Page(sessions, window.next, window.previous)

        return await self._served(
            "list",
            query.min_lsn,
            from_clickhouse,
            lambda conn: repository.list_sessions(conn, environment_id, query),
        )

    async def count(self, environment_id: str, query: CountQuery) -> tuple[dict[str, Any], ListSource]:
        """``{count, byStatus}`` and where it was counted; raises ServiceUnavailable like a list."""
        return await self._served(
            "count",
            query.min_lsn,
            lambda client: clickhouse_listing.count_sessions(client, environment_id, query.filters),
            lambda conn: repository.count_sessions(conn, environment_id, query.filters),
        )

    async def _served(
        self,
        kind: Literal["list", "count"],
        min_lsn: str | None,
        from_clickhouse: Callable[[AsyncClient], Awaitable[T]],
        from_postgres: Callable[[Conn], Awaitable[T]],
    ) -> tuple[T, ListSource]:
        """Run a read on ClickHouse when it should and can serve it, else on Postgres."""
        started = time.perf_counter()
        client = await self._usable_clickhouse()
        if client is not None:
            await self._wait_for_replication(min_lsn)
            try:
                async with asyncio.timeout(self._clickhouse_bound()):
                    result = await from_clickhouse(client)
                QUERY_SECONDS.labels(kind, "clickhouse").observe(time.perf_counter() - started)
                return result, "clickhouse"
            except (ClickHouseUnavailable, ClickHouseError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):  # cut short here, so clickhouse_errors did not see it
                    count_dependency_error("clickhouse")
                self._failed(exc)
        async with self._pool.acquire() as conn:
            result = await from_postgres(conn)
        QUERY_SECONDS.labels(kind, "postgres").observe(time.perf_counter() - started)
        return result, "postgres"

    async def _usable_clickhouse(self) -> AsyncClient | None:
        """The client to list with, or None when lists should come from Postgres."""
        mode = self._settings.list_source
        if mode == "postgres" or time.monotonic() < self._retry_at:
            return None
        if mode == "auto" and not await self._mirror_is_ready():
            return None
        try:
            # A stalled sidecar accepts the connection and never answers: bound the connect too.
            async with asyncio.timeout(self._clickhouse_bound()):
                return await self.clickhouse()
        except (ClickHouseUnavailable, TimeoutError) as exc:
            self._back_off(exc)
            return None

    def _clickhouse_bound(self) -> float:
        """How long ClickHouse may take before the read falls back to Postgres: within the
        dependency bound, so a stalled ClickHouse still leaves time for the Postgres answer."""
        return min(QUERY_TIMEOUT_SECONDS, self._settings.dependency_timeout_seconds)

    async def _mirror_is_ready(self) -> bool:
        now = time.monotonic()
        if self._mirror_checked_at is None or now - self._mirror_checked_at >= MIRROR_CACHE_SECONDS:
            async with self._pool.acquire() as conn:
                self._mirror_ready = await mirror_ready(conn)
            self._mirror_checked_at = now
        return self._mirror_ready

    async def _wait_for_replication(self, lsn: str | None) -> None:
        if lsn is None:
            return
        timeout = self._settings.min_lsn_wait_seconds
        if not await wait_for_lsn(self._pool, lsn, timeout=timeout):
            raise ReplicationLagging(
                f"replication to ClickHouse has not reached minLsn {lsn} within {timeout:g}s; retry shortly",
                details={"minLsn": lsn},
                retry_after=1,
            )

    def _back_off(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        logger.warning(
            "clickhouse unavailable for lists; serving them from postgres",
            extra={"error": str(exc) or type(exc).__name__, "retry_in_seconds": RETRY_SECONDS},
        )

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ClickHouseError):  # it answered but refused: a bug or schema problem
            logger.warning(
                "clickhouse refused a list query; serving it from postgres", extra={"error": str(exc)}
            )
        else:
            self._back_off(exc)
