"""List and count queries against ClickHouse ``sessions_v1`` (SPEC §3 lists, §5 replication).

The contract is the Postgres path's (``repository.list_sessions`` / ``count_sessions``): the same
filters, status rules, keyset order and cursors. ClickHouse only chooses *which* sessions make a
page; the page itself is hydrated from Postgres by id (``repository.hydrate_sessions``).

- ``FINAL`` collapses the replicated versions of a row to the newest one, and the newest being a
  delete hides the row; ``_is_deleted = 0`` is also checked explicitly so the query does not depend
  on the server's FINAL-hides-deletes behaviour. WHERE applies after FINAL, so a filter never sees
  an old version of a row.
- Every value is a server-side parameter (``{name:Type}``); nothing from a request is formatted
  into the SQL text.
- Timestamps travel as Int64 microseconds (``fromUnixTimestamp64Micro`` in,
  ``toUnixTimestamp64Micro`` out). clickhouse-connect formats a ``datetime`` parameter to whole
  seconds, and cursors must round-trip ``DateTime64(6)`` keys exactly or pages would skip or repeat
  sessions created in the same second.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from threadline.sessions.fields import (
    STATUSES,
    ClickHouseParams,
    SessionFilters,
    filter_conditions,
    status_counts,
    to_micros,
)
from threadline.sessions.listing import ListQuery, PageWindow, keyset_scan, page_window
from threadline.storage.clickhouse import AsyncClient, clickhouse_errors

__all__ = [
    "SortedId",
    "Statement",
    "count_sessions",
    "count_statement",
    "list_session_ids",
    "list_statement",
]

TABLE = "sessions_v1"
# Creation-time windows tried, in order, for createdAt pages before scanning everything.
CREATED_AT_WINDOWS = (timedelta(days=1), timedelta(days=7), timedelta(days=31))


@dataclass(frozen=True, slots=True)
class Statement:
    """SQL with ``{name:Type}`` placeholders and the values bound to them server-side."""

    sql: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SortedId:
    """A session id with its sort key as ClickHouse had it when it chose the page."""

    id: str
    key_us: int


def _where(environment_id: str, filters: SessionFilters, sql: ClickHouseParams) -> list[str]:
    """WHERE conditions from the filter definitions in ``sessions.fields``, as Postgres gets them.

    Tags match with ``hasAny``; an unset task_identifier is '' and never matches a filter value.
    """
    env = sql.bind("env", "String", environment_id)
    return [f"environment_id = {env}", "_is_deleted = 0", *filter_conditions(filters, sql)]


def list_statement(
    environment_id: str,
    query: ListQuery,
    now: datetime,
    *,
    created_from_us: int | None = None,
    created_to_us: int | None = None,
) -> Statement:
    """One keyset page (plus one row) of ``(session_id, sort key in µs)`` in scan order.

    ``created_from_us`` / ``created_to_us`` narrow the scan to a creation-time window (see
    :func:`list_session_ids`)."""
    sql = ClickHouseParams(now)
    where = _where(environment_id, query.filters, sql)
    if created_from_us is not None:
        where.append(f"created_at >= {sql.timestamp_us('window_from', created_from_us)}")
    if created_to_us is not None:
        where.append(f"created_at <= {sql.timestamp_us('window_to', created_to_us)}")
    column = "created_at" if query.sort == "createdAt" else "last_active_at"
    scan = keyset_scan(query)
    if scan.start is not None:
        # `key >= k AND (key > k OR id > i)` (for ascending) is the tuple comparison written so that
        # the primary key (environment_id, created_at, session_id) can prune on the plain range.
        key = sql.timestamp_us("cursor_key", scan.start.key_us)
        key_id = sql.bind("cursor_id", "String", scan.start.id)
        op = scan.comparison
        where.append(f"{column} {op}= {key} AND ({column} {op} {key} OR session_id {op} {key_id})")
    limit = sql.bind("limit", "UInt32", scan.limit)
    return Statement(
        f"SELECT session_id, toUnixTimestamp64Micro({column}) AS key_us FROM {TABLE} FINAL"
        f" WHERE {' AND '.join(where)}"
        f" ORDER BY {column} {scan.direction}, session_id {scan.direction} LIMIT {limit}",
        sql.params,
    )


def count_statement(environment_id: str, filters: SessionFilters, now: datetime) -> Statement:
    """The total and one count per status (columns named after the statuses), in one pass."""
    sql = ClickHouseParams(now)
    where = _where(environment_id, filters, sql)
    counts = ", ".join(status_counts(sql))
    return Statement(
        f"SELECT count() AS total, {counts} FROM {TABLE} FINAL WHERE {' AND '.join(where)}", sql.params
    )


async def list_session_ids(
    client: AsyncClient, environment_id: str, query: ListQuery, *, now: datetime | None = None
) -> PageWindow[SortedId]:
    """The ids of one page in the order asked for, with cursors built from ClickHouse's sort keys.

    Raises ClickHouseUnavailable / ClickHouseError (the caller falls back to Postgres).
    """
    now = now or datetime.now(UTC)
    scan = keyset_scan(query)
    if query.sort == "createdAt":
        # FINAL merges every row it reads, so reading a whole environment costs ~100 ms per
        # million sessions, while a page usually lies within days of where the scan starts. Try
        # growing creation-time windows from the scan's start in its direction; a window that
        # yields a full page is exact: everything outside it sorts after every row found.
        descending = scan.direction == "DESC"
        if scan.start is not None:
            anchor_us: int | None = scan.start.key_us
        elif descending:
            anchor_us = to_micros(now)
        else:
            anchor_us = await _oldest_created_us(client, environment_id)
        for window in CREATED_AT_WINDOWS:
            if anchor_us is None:
                break
            span = int(window.total_seconds() * 1_000_000)
            statement = list_statement(
                environment_id,
                query,
                now,
                created_from_us=anchor_us - span if descending else None,
                created_to_us=None if descending else anchor_us + span,
            )
            rows = await _sorted_ids(client, statement)
            if len(rows) >= scan.limit:
                return page_window(query, rows, key=lambda row: (row.key_us, row.id))
    rows = await _sorted_ids(client, list_statement(environment_id, query, now))
    return page_window(query, rows, key=lambda row: (row.key_us, row.id))


async def _oldest_created_us(client: AsyncClient, environment_id: str) -> int | None:
    """The earliest creation time of any row version in the environment (no FINAL needed: a lower
    bound is all a window needs), or None when it has none."""
    with clickhouse_errors("listing sessions"):
        result = await client.query(
            f"SELECT count(), toUnixTimestamp64Micro(min(created_at)) FROM {TABLE} WHERE environment_id = {{env:String}}",
            parameters={"env": environment_id},
        )
    count, oldest = result.result_rows[0]
    return int(oldest) if count else None


async def _sorted_ids(client: AsyncClient, statement: Statement) -> list[SortedId]:
    with clickhouse_errors("listing sessions"):
        result = await client.query(statement.sql, parameters=statement.parameters)
    return [SortedId(id=str(row[0]), key_us=int(row[1])) for row in result.result_rows]


async def count_sessions(
    client: AsyncClient, environment_id: str, filters: SessionFilters, *, now: datetime | None = None
) -> dict[str, Any]:
    """``{count, byStatus}`` exactly as ``repository.count_sessions`` answers it."""
    statement = count_statement(environment_id, filters, now or datetime.now(UTC))
    with clickhouse_errors("counting sessions"):
        result = await client.query(statement.sql, parameters=statement.parameters)
        total, *by_status = (int(value) for value in result.result_rows[0])
    return {"count": total, "byStatus": dict(zip(STATUSES, by_status, strict=True))}
