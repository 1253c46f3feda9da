"""Session rows in Postgres: every query the sessions API runs.

Writes are single statements (data-modifying CTEs) so that a session and its two channel heads
appear, change and close atomically without holding a transaction open across round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from threadline.auth.principal import Environment
from threadline.db import Conn
from threadline.errors import Conflict, NotFound
from threadline.ids import new_id
from threadline.sessions.listing import (
    ListQuery,
    SessionFilters,
    from_micros,
    keyset_scan,
    page_window,
    to_micros,
)
from threadline.sessions.models import FRIENDLY_ID_PREFIX, ChannelView, CreateSessionBody, SessionView
from threadline.streams.live import NOTIFY_CHANNEL
from threadline.streams.names import SESSION_CHANNEL_CONTENT_TYPE

__all__ = [
    "Page",
    "close_session",
    "count_sessions",
    "create_session",
    "current_lsn",
    "get_session",
    "hydrate_sessions",
    "list_sessions",
    "patch_session",
]


_CHANNEL_COLUMNS = ("next_offset", "records", "bytes", "closed_at", "first_record_at", "last_record_at")
_SELECT = f"""
SELECT s.id, s.environment_id, s.external_id, s.type, s.task_identifier, s.tags, s.metadata,
       s.closed_at, s.closed_reason, s.expires_at, s.created_at, s.updated_at, s.last_active_at,
       {", ".join(f"o.{c} AS out_{c}" for c in _CHANNEL_COLUMNS)},
       {", ".join(f"i.{c} AS in_{c}" for c in _CHANNEL_COLUMNS)}
FROM sessions s
JOIN streams o ON o.session_id = s.id AND o.io = 'out'
JOIN streams i ON i.session_id = s.id AND i.io = 'in'
"""


def _channel(row: asyncpg.Record, io: str) -> ChannelView:
    return ChannelView(
        records=row[f"{io}_records"],
        bytes=row[f"{io}_bytes"],
        tail_offset=row[f"{io}_next_offset"],
        closed=row[f"{io}_closed_at"] is not None,
        first_record_at=row[f"{io}_first_record_at"],
        last_record_at=row[f"{io}_last_record_at"],
    )


def _view(row: asyncpg.Record) -> SessionView:
    return SessionView(
        id=row["id"],
        environment_id=row["environment_id"],
        external_id=row["external_id"],
        type=row["type"],
        task_identifier=row["task_identifier"],
        tags=list(row["tags"]),
        metadata=row["metadata"],
        closed_at=row["closed_at"],
        closed_reason=row["closed_reason"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_active_at=row["last_active_at"],
        channels={"out": _channel(row, "out"), "in": _channel(row, "in")},
    )


def _ref_column(ref: str) -> str:
    return "id" if ref.startswith(FRIENDLY_ID_PREFIX) else "external_id"


async def current_lsn(conn: Conn) -> str:
    """A WAL position at or after every commit this connection has made (for Threadline-Lsn).

    The flush position, not the write position: the replication consumer can always confirm
    up to the flush position once it has seen every commit before it, so a reader waiting for
    this LSN is never left waiting on WAL that holds no commit.
    """
    return str(await conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))


async def get_session(conn: Conn, environment_id: str, ref: str) -> SessionView:
    row = await conn.fetchrow(
        f"{_SELECT} WHERE s.environment_id = $1 AND s.{_ref_column(ref)} = $2", environment_id, ref
    )
    if row is None:
        raise NotFound(f"session {ref!r} not found", code="session_not_found")
    return _view(row)


async def create_session(
    conn: Conn, environment: Environment, body: CreateSessionBody
) -> tuple[SessionView, bool]:
    """Create a session; with an externalId that already exists, return that one instead.

    Returns ``(session, created)``. ON CONFLICT makes concurrent creates with the same externalId
    agree on one row without a pre-check race.
    """
    session_id = new_id("session")
    inserted = await conn.fetchval(
        """WITH s AS (
               INSERT INTO sessions (id, environment_id, project_id, organization_id, external_id, type,
                                     task_identifier, tags, metadata, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
               ON CONFLICT (environment_id, external_id) DO NOTHING
               RETURNING id
           ), c AS (
               INSERT INTO streams (environment_id, name, session_id, io, content_type)
               SELECT $2, 'sessions/' || s.id || '/' || v.io, s.id, v.io, $11
               FROM s CROSS JOIN (VALUES ('out'), ('in')) AS v (io)
           )
           SELECT id FROM s""",
        session_id,
        environment.id,
        environment.project_id,
        environment.organization_id,
        body.externalId,
        body.type,
        body.taskIdentifier,
        body.tags,
        body.metadata,
        body.expiresAt,
        SESSION_CHANNEL_CONTENT_TYPE,
    )
    if inserted is not None:
        return await get_session(conn, environment.id, session_id), True
    assert body.externalId is not None  # only an externalId can conflict
    existing = await get_session(conn, environment.id, body.externalId)
    if existing.closed_at is not None:
        raise Conflict(
            f"session with externalId {body.externalId!r} exists and is closed",
            code="session_closed",
            details={"sessionId": existing.id},
        )
    return existing, False


async def patch_session(conn: Conn, environment_id: str, ref: str, changes: dict[str, Any]) -> SessionView:
    """Apply ``changes`` (column -> value) to an open session."""
    assignments = [f"{column} = ${index}" for index, column in enumerate(changes, start=3)]
    try:
        updated = await conn.fetchval(
            f"""UPDATE sessions SET {", ".join(assignments)}, updated_at = now()
                WHERE environment_id = $1 AND {_ref_column(ref)} = $2 AND closed_at IS NULL
                RETURNING id""",
            environment_id,
            ref,
            *changes.values(),
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(
            f"another session already has externalId {changes.get('external_id')!r}",
            code="external_id_conflict",
        ) from None
    if updated is None:
        existing = await get_session(conn, environment_id, ref)  # 404 when missing
        raise Conflict(f"session {existing.id} is closed", code="session_closed")
    return await get_session(conn, environment_id, updated)


async def close_session(
    conn: Conn, environment_id: str, ref: str, reason: str | None
) -> tuple[SessionView, bool]:
    """Close a session and both channels. Returns ``(session, closed_now)``.

    Concurrent closes serialise on the row lock: the loser's UPDATE re-checks ``closed_at IS NULL``,
    matches nothing, and returns the winner's close unchanged.
    """
    async with conn.transaction():
        # Lock the channels first, in id order, as the group committer does: a close and an
        # append then serialise on the stream rows, and no append commits after the close.
        await conn.execute(
            f"""SELECT st.id FROM streams st JOIN sessions s ON s.id = st.session_id
                WHERE s.environment_id = $1 AND s.{_ref_column(ref)} = $2
                ORDER BY st.id FOR UPDATE OF st""",
            environment_id,
            ref,
        )
        closed = await conn.fetchval(
            f"""WITH s AS (
                    UPDATE sessions SET closed_at = now(), closed_reason = $3, updated_at = now(),
                        last_active_at = greatest(last_active_at, (
                            SELECT max(st.last_record_at) FROM streams st WHERE st.session_id = sessions.id))
                    WHERE environment_id = $1 AND {_ref_column(ref)} = $2 AND closed_at IS NULL
                    RETURNING id, closed_at
                ), c AS (
                    UPDATE streams SET closed_at = s.closed_at FROM s
                    WHERE streams.session_id = s.id AND streams.closed_at IS NULL
                    RETURNING streams.id, streams.next_offset
                )
                SELECT s.id, (SELECT pg_notify('{NOTIFY_CHANNEL}', string_agg(c.id || ',' || c.next_offset || ',1', ';'))
                              FROM c)
                FROM s""",
            environment_id,
            ref,
            reason,
        )
    session = await get_session(conn, environment_id, closed or ref)
    return session, closed is not None


def _filter_sql(environment_id: str, filters: SessionFilters, now: datetime, args: list[Any]) -> list[str]:
    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = [f"s.environment_id = {arg(environment_id)}"]
    if filters.types:
        where.append(f"s.type = ANY({arg(list(filters.types))}::text[])")
    if filters.tags:
        where.append(f"s.tags && {arg(list(filters.tags))}::text[]")
    if filters.task_identifiers:
        where.append(f"s.task_identifier = ANY({arg(list(filters.task_identifiers))}::text[])")
    if filters.external_ids:
        where.append(f"s.external_id = ANY({arg(list(filters.external_ids))}::text[])")
    if filters.statuses:
        # Only bind `now` when a condition uses it: an unused parameter has no type and
        # Postgres refuses the statement (filter[status]=CLOSED alone).
        now_arg = arg(now) if {"ACTIVE", "EXPIRED"} & set(filters.statuses) else ""
        conditions = {
            "CLOSED": "s.closed_at IS NOT NULL",
            "EXPIRED": f"(s.closed_at IS NULL AND s.expires_at <= {now_arg})",
            "ACTIVE": f"(s.closed_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > {now_arg}))",
        }
        where.append("(" + " OR ".join(conditions[status] for status in filters.statuses) + ")")
    if filters.created_from is not None:
        where.append(f"s.created_at >= {arg(filters.created_from)}")
    if filters.created_to is not None:
        where.append(f"s.created_at <= {arg(filters.created_to)}")
    return where


@dataclass(frozen=True, slots=True)
class Page:
    sessions: list[SessionView]
    next: str | None
    previous: str | None


async def list_sessions(
    conn: Conn, environment_id: str, query: ListQuery, *, now: datetime | None = None
) -> Page:
    """Keyset pagination on ``(sort key, id)``: stable under concurrent inserts, O(page) at any depth."""
    now = now or datetime.now(UTC)
    args: list[Any] = []
    where = _filter_sql(environment_id, query.filters, now, args)
    sort_column = "created_at" if query.sort == "createdAt" else "last_active_at"
    scan = keyset_scan(query)
    if scan.start is not None:
        args.extend([from_micros(scan.start.key_us), scan.start.id])
        where.append(f"(s.{sort_column}, s.id) {scan.comparison} (${len(args) - 1}, ${len(args)})")
    args.append(scan.limit)
    rows = await conn.fetch(
        f"""{_SELECT} WHERE {" AND ".join(where)}
            ORDER BY s.{sort_column} {scan.direction}, s.id {scan.direction} LIMIT ${len(args)}""",
        *args,
    )
    window = page_window(query, rows, key=lambda row: (to_micros(row[sort_column]), row["id"]))
    return Page([_view(row) for row in window.items], window.next, window.previous)


async def hydrate_sessions(conn: Conn, environment_id: str, ids: Sequence[str]) -> list[SessionView]:
    """The sessions ``ids`` from Postgres, in the order given (a ClickHouse page's order).

    A list page's rows come from ClickHouse, which lags Postgres: every field is read fresh here,
    and an id Postgres no longer has in this environment (deleted, not yet replicated as deleted;
    or never in it) drops out of the page instead of appearing with stale data.
    """
    if not ids:
        return []
    rows = await conn.fetch(
        f"{_SELECT} WHERE s.environment_id = $1 AND s.id = ANY($2::text[])", environment_id, list(ids)
    )
    by_id = {row["id"]: row for row in rows}
    return [_view(by_id[session_id]) for session_id in ids if session_id in by_id]


async def count_sessions(
    conn: Conn, environment_id: str, filters: SessionFilters, *, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    args: list[Any] = []
    where = _filter_sql(environment_id, filters, now, args)
    args.append(now)
    now_arg = f"${len(args)}"
    row = await conn.fetchrow(
        f"""SELECT count(*) AS total,
                   count(*) FILTER (WHERE s.closed_at IS NOT NULL) AS closed,
                   count(*) FILTER (WHERE s.closed_at IS NULL AND s.expires_at <= {now_arg}) AS expired
            FROM sessions s WHERE {" AND ".join(where)}""",
        *args,
    )
    assert row is not None
    total, closed, expired = row["total"], row["closed"], row["expired"]
    return {
        "count": total,
        "byStatus": {"ACTIVE": total - closed - expired, "CLOSED": closed, "EXPIRED": expired},
    }
