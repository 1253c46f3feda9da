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
from datetime import UTC, datetime
from typing import Any

from threadline.sessions.listing import (
    ListQuery,
    PageWindow,
    SessionFilters,
    keyset_scan,
    page_window,
    to_micros,
)
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


def _timestamp(name: str) -> str:
    return f"fromUnixTimestamp64Micro({{{name}:Int64}}, 'UTC')"


def _where(environment_id: str, filters: SessionFilters, now: datetime) -> tuple[list[str], dict[str, Any]]:
    """WHERE conditions mirroring ``repository._filter_sql``, and their parameters."""
    where = ["environment_id = {env:String}", "_is_deleted = 0"]
    params: dict[str, Any] = {"env": environment_id}
    if filters.types:
        where.append("has({types:Array(String)}, type)")
        params["types"] = list(filters.types)
    if filters.tags:
        where.append("hasAny(tags, {tags:Array(String)})")
        params["tags"] = list(filters.tags)
    if filters.task_identifiers:  # '' (unset) never matches: filter values are never empty
        where.append("has({tasks:Array(String)}, task_identifier)")
        params["tasks"] = list(filters.task_identifiers)
    if filters.external_ids:
        where.append("has({external_ids:Array(String)}, external_id)")
        params["external_ids"] = list(filters.external_ids)
    if filters.statuses:
        now_sql = _timestamp("now_us")
        params["now_us"] = to_micros(now)
        conditions = {
            "CLOSED": "closed_at IS NOT NULL",
            "EXPIRED": f"(closed_at IS NULL AND expires_at <= {now_sql})",
            "ACTIVE": f"(closed_at IS NULL AND (expires_at IS NULL OR expires_at > {now_sql}))",
        }
        where.append("(" + " OR ".join(conditions[status] for status in filters.statuses) + ")")
    if filters.created_from is not None:
        where.append(f"created_at >= {_timestamp('created_from_us')}")
        params["created_from_us"] = to_micros(filters.created_from)
    if filters.created_to is not None:
        where.append(f"created_at <= {_timestamp('created_to_us')}")
        params["created_to_us"] = to_micros(filters.created_to)
    return where, params


def list_statement(environment_id: str, query: ListQuery, now: datetime) -> Statement:
    """One keyset page (plus one row) of ``(session_id, sort key in µs)`` in scan order."""
    where, params = _where(environment_id, query.filters, now)
    column = "created_at" if query.sort == "createdAt" else "last_active_at"
    scan = keyset_scan(query)
    if scan.start is not None:
        # `key >= k AND (key > k OR id > i)` (for ascending) is the tuple comparison written so that
        # the primary key (environment_id, created_at, session_id) can prune on the plain range.
        key = _timestamp("cursor_key_us")
        op = scan.comparison
        where.append(
            f"{column} {op}= {key} AND ({column} {op} {key} OR session_id {op} {{cursor_id:String}})"
        )
        params["cursor_key_us"] = scan.start.key_us
        params["cursor_id"] = scan.start.id
    params["limit"] = scan.limit
    sql = (
        f"SELECT session_id, toUnixTimestamp64Micro({column}) AS key_us FROM {TABLE} FINAL"
        f" WHERE {' AND '.join(where)}"
        f" ORDER BY {column} {scan.direction}, session_id {scan.direction} LIMIT {{limit:UInt32}}"
    )
    return Statement(sql, params)


def count_statement(environment_id: str, filters: SessionFilters, now: datetime) -> Statement:
    """Total and per-status counts in one pass; ACTIVE is what is neither CLOSED nor EXPIRED."""
    where, params = _where(environment_id, filters, now)
    params["count_now_us"] = to_micros(now)
    now_sql = _timestamp("count_now_us")
    sql = (
        "SELECT count() AS total, countIf(closed_at IS NOT NULL) AS closed,"
        f" countIf(closed_at IS NULL AND expires_at IS NOT NULL AND expires_at <= {now_sql}) AS expired"
        f" FROM {TABLE} FINAL WHERE {' AND '.join(where)}"
    )
    return Statement(sql, params)


async def list_session_ids(
    client: AsyncClient, environment_id: str, query: ListQuery, *, now: datetime | None = None
) -> PageWindow[SortedId]:
    """The ids of one page in the order asked for, with cursors built from ClickHouse's sort keys.

    Raises ClickHouseUnavailable / ClickHouseError (the caller falls back to Postgres).
    """
    statement = list_statement(environment_id, query, now or datetime.now(UTC))
    with clickhouse_errors("listing sessions"):
        result = await client.query(statement.sql, parameters=statement.parameters)
        rows = [SortedId(id=str(row[0]), key_us=int(row[1])) for row in result.result_rows]
    return page_window(query, rows, key=lambda row: (row.key_us, row.id))


async def count_sessions(
    client: AsyncClient, environment_id: str, filters: SessionFilters, *, now: datetime | None = None
) -> dict[str, Any]:
    """``{count, byStatus}`` exactly as ``repository.count_sessions`` answers it."""
    statement = count_statement(environment_id, filters, now or datetime.now(UTC))
    with clickhouse_errors("counting sessions"):
        result = await client.query(statement.sql, parameters=statement.parameters)
        total, closed, expired = (int(value) for value in result.result_rows[0])
    return {
        "count": total,
        "byStatus": {"ACTIVE": total - closed - expired, "CLOSED": closed, "EXPIRED": expired},
    }
