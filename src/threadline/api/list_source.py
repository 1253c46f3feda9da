"""Where session lists and counts are read from (SPEC §3): ClickHouse, with Postgres as fallback.

ClickHouse picks the page's ids, Postgres hydrates them. ClickHouse is used when
``THREADLINE_LIST_SOURCE`` allows it (``auto`` also needs the mirror to be ready: a replication slot
whose backfill has finished; before that ClickHouse holds only part of the sessions) and when it answers; otherwise, or when it fails mid-
request, the same query runs on Postgres. Failures back ClickHouse off for a few seconds, so a
down ClickHouse costs one failed attempt per few seconds, not one per request.

``minLsn`` only waits when ClickHouse serves: Postgres holds every acknowledged write already.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from threadline.api.state import AppState
from threadline.db import Conn
from threadline.errors import ServiceUnavailable
from threadline.replication.progress import mirror_ready, wait_for_lsn
from threadline.sessions import clickhouse_listing, repository
from threadline.sessions.listing import CountQuery, ListQuery
from threadline.storage.clickhouse import (
    AsyncClient,
    ClickHouseError,
    ClickHouseUnavailable,
    connect_clickhouse,
)

__all__ = ["ListSource", "connect_if_missing", "count_sessions", "list_sessions"]

ListSource = Literal["clickhouse", "postgres"]
T = TypeVar("T")

RETRY_SECONDS = 3.0  # after ClickHouse failed, serve from Postgres this long before trying again
MIRROR_CACHE_SECONDS = 3.0  # how long "the ClickHouse mirror is ready (or not)" is believed
QUERY_TIMEOUT_SECONDS = 10.0  # a ClickHouse query slower than this falls back to Postgres
CONNECT_TIMEOUT_SECONDS = 2.0

logger = logging.getLogger(__name__)


async def connect_if_missing(state: AppState) -> AsyncClient:
    """The app's ClickHouse client, connecting first if it has none (e.g. ClickHouse was down at
    start). Serialised so concurrent requests do not each open, and leak, a client.

    Raises ClickHouseUnavailable.
    """
    async with state.lists.connect_lock:
        if state.clickhouse is None:
            state.clickhouse = await connect_clickhouse(
                state.settings.clickhouse_url, connect_timeout=CONNECT_TIMEOUT_SECONDS
            )
        client: AsyncClient = state.clickhouse
        return client


async def _mirror_ready(state: AppState) -> bool:
    lists = state.lists
    now = time.monotonic()
    if lists.mirror_checked_at is None or now - lists.mirror_checked_at >= MIRROR_CACHE_SECONDS:
        async with state.pool.acquire() as conn:
            lists.mirror_ready = await mirror_ready(conn)
        lists.mirror_checked_at = now
    return lists.mirror_ready


def _back_off(state: AppState, exc: BaseException) -> None:
    state.lists.clickhouse_retry_at = time.monotonic() + RETRY_SECONDS
    logger.warning(
        "clickhouse unavailable for lists; serving them from postgres",
        extra={"error": str(exc) or type(exc).__name__, "retry_in_seconds": RETRY_SECONDS},
    )


async def _clickhouse(state: AppState) -> AsyncClient | None:
    """The client to list with, or None when lists should come from Postgres."""
    mode = state.settings.list_source
    if mode == "postgres" or time.monotonic() < state.lists.clickhouse_retry_at:
        return None
    if mode == "auto" and not await _mirror_ready(state):
        return None
    try:
        return await connect_if_missing(state)
    except ClickHouseUnavailable as exc:
        _back_off(state, exc)
        return None


async def _wait_for_replication(state: AppState, lsn: str | None) -> None:
    if lsn is None:
        return
    timeout = state.settings.min_lsn_wait_seconds
    if not await wait_for_lsn(state.pool, lsn, timeout=timeout):
        raise ServiceUnavailable(
            f"replication to ClickHouse has not reached minLsn {lsn} within {timeout:g}s; retry shortly",
            code="replication_lagging",
            details={"minLsn": lsn},
            retry_after=1,
        )


def _failed(state: AppState, exc: Exception) -> None:
    if isinstance(exc, ClickHouseError):  # it answered but refused: a bug or schema problem, no back-off
        logger.warning("clickhouse refused a list query; serving it from postgres", extra={"error": str(exc)})
    else:
        _back_off(state, exc)


async def _served(
    state: AppState,
    min_lsn: str | None,
    from_clickhouse: Callable[[AsyncClient], Awaitable[T]],
    from_postgres: Callable[[Conn], Awaitable[T]],
) -> tuple[T, ListSource]:
    """Run a read on ClickHouse when it should and can serve it, else on Postgres."""
    client = await _clickhouse(state)
    if client is not None:
        await _wait_for_replication(state, min_lsn)
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_SECONDS):
                return await from_clickhouse(client), "clickhouse"
        except (ClickHouseUnavailable, ClickHouseError, TimeoutError) as exc:
            _failed(state, exc)
    async with state.pool.acquire() as conn:
        return await from_postgres(conn), "postgres"


async def list_sessions(
    state: AppState, environment_id: str, query: ListQuery
) -> tuple[repository.Page, ListSource]:
    """One page and where its ids came from; raises ServiceUnavailable if minLsn is not reached."""

    async def from_clickhouse(client: AsyncClient) -> repository.Page:
        window = await clickhouse_listing.list_session_ids(client, environment_id, query)
        async with state.pool.acquire() as conn:
            sessions = await repository.hydrate_sessions(
                conn, environment_id, [item.id for item in window.items]
            )
        # Cursors keep ClickHouse's keys: if Postgres has a newer lastActiveAt (replication lag),
        # paging must still continue from where ClickHouse's order put the row.
        return repository.Page(sessions, window.next, window.previous)

    return await _served(
        state,
        query.min_lsn,
        from_clickhouse,
        lambda conn: repository.list_sessions(conn, environment_id, query),
    )


async def count_sessions(
    state: AppState, environment_id: str, query: CountQuery
) -> tuple[dict[str, Any], ListSource]:
    """``{count, byStatus}`` and where it was counted; raises ServiceUnavailable like a list."""
    return await _served(
        state,
        query.min_lsn,
        lambda client: clickhouse_listing.count_sessions(client, environment_id, query.filters),
        lambda conn: repository.count_sessions(conn, environment_id, query.filters),
    )
