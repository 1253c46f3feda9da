"""Session rows in Postgres: every query the sessions API runs.

Create, fork and close run in one transaction with the channel rows (``streams.channels`` writes
those), so a session and its two channels appear and close atomically; reads join the channel
heads for their stats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from threadline.auth.principal import Environment
from threadline.db import Conn
from threadline.errors import ExternalIdConflict, SessionClosed, SessionNotFound
from threadline.ids import new_id
from threadline.sessions.fields import (
    STATUSES,
    PostgresParams,
    SessionFilters,
    filter_conditions,
    status_counts,
    to_micros,
)
from threadline.sessions.listing import ListQuery, from_micros, keyset_scan, page_window
from threadline.sessions.models import (
    FRIENDLY_ID_PREFIX,
    ChannelView,
    CreateSessionBody,
    ForkedFrom,
    ForkSessionBody,
    SessionView,
)
from threadline.streams import channels
from threadline.streams.offsets import Position, parse_offset

__all__ = [
    "Page",
    "close_session",
    "count_sessions",
    "create_session",
    "current_lsn",
    "fork_session",
    "get_session",
    "get_session_by_id",
    "hydrate_sessions",
    "list_sessions",
    "patch_session",
]


_CHANNEL_COLUMNS = ("next_offset", "records", "bytes", "closed_at", "first_record_at", "last_record_at")
_SELECT = f"""
SELECT s.id, s.environment_id, s.external_id, s.type, s.task_identifier, s.tags, s.metadata,
       s.closed_at, s.closed_reason, s.expires_at, s.created_at, s.updated_at, s.last_active_at,
       s.forked_from, s.fork_out_offset, s.fork_in_offset, s.root_id,
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
        forked_from=(
            ForkedFrom(row["forked_from"], row["fork_out_offset"], row["fork_in_offset"])
            if row["forked_from"] is not None
            else None
        ),
        stored_root_id=row["root_id"],
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


async def get_session_by_id(conn: Conn, session_id: str) -> SessionView:
    row = await conn.fetchrow(f"{_SELECT} WHERE s.id = $1", session_id)
    if row is None:
        raise SessionNotFound(f"session {session_id!r} not found")
    return _view(row)


async def get_session(conn: Conn, environment_id: str, ref: str) -> SessionView:
    if "\x00" in ref:  # no session has one (Postgres text cannot hold NUL), and it cannot be a query value
        raise SessionNotFound(f"session {ref!r} not found")
    row = await conn.fetchrow(
        f"{_SELECT} WHERE s.environment_id = $1 AND s.{_ref_column(ref)} = $2", environment_id, ref
    )
    if row is None:
        raise SessionNotFound(f"session {ref!r} not found")
    return _view(row)


async def create_session(
    conn: Conn, environment: Environment, body: CreateSessionBody
) -> tuple[SessionView, bool]:
    """Create a session and its channels; with an externalId that already exists, return that
    one instead.

    Returns ``(session, created)``. ON CONFLICT makes concurrent creates with the same externalId
    agree on one row without a pre-check race.
    """
    async with conn.transaction():
        inserted = await _insert_session(
            conn,
            environment,
            _NewSession(
                external_id=body.externalId,
                type=body.type,
                task_identifier=body.taskIdentifier,
                tags=body.tags,
                metadata=body.metadata,
                expires_at=body.expiresAt,
            ),
        )
        if inserted is not None:
            await channels.create_channels(conn, environment.id, inserted)
    if inserted is not None:
        return await get_session(conn, environment.id, inserted), True
    assert body.externalId is not None  # only an externalId can conflict
    existing = await get_session(conn, environment.id, body.externalId)
    if existing.closed_at is not None:
        raise SessionClosed(
            f"session with externalId {body.externalId!r} exists and is closed",
            details={"sessionId": existing.id},
        )
    return existing, False


@dataclass(frozen=True, slots=True)
class _NewSession:
    """A session row as created (a root) or forked (with its lineage)."""

    external_id: str | None
    type: str
    task_identifier: str | None
    tags: list[str]
    metadata: dict[str, Any]
    expires_at: datetime | None = None
    forked_from: str | None = None
    fork_out_offset: int | None = None
    fork_in_offset: int | None = None
    root_id: str | None = None


async def _insert_session(conn: Conn, environment: Environment, new: _NewSession) -> str | None:
    """Insert the row; None when the externalId is taken (ON CONFLICT: concurrent creates with the
    same externalId agree on one row without a pre-check race)."""
    inserted: str | None = await conn.fetchval(
        """INSERT INTO sessions (id, environment_id, project_id, organization_id, external_id, type,
                                 task_identifier, tags, metadata, expires_at, forked_from,
                                 fork_out_offset, fork_in_offset, root_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           ON CONFLICT (environment_id, external_id) DO NOTHING
           RETURNING id""",
        new_id("session"),
        environment.id,
        environment.project_id,
        environment.organization_id,
        new.external_id,
        new.type,
        new.task_identifier,
        new.tags,
        new.metadata,
        new.expires_at,
        new.forked_from,
        new.fork_out_offset,
        new.fork_in_offset,
        new.root_id,
    )
    return inserted


def _fork_position(text: str | None, field: str) -> Position:
    return "now" if text is None else parse_offset(text, name=field)


async def fork_session(
    conn: Conn, environment: Environment, parent: SessionView, body: ForkSessionBody
) -> tuple[SessionView, bool]:
    """Create a session whose channels are forks of ``parent``'s at the body's offsets (default:
    the tails), in one transaction: if the channel forks cannot be made, no session is.

    Absent ``type``/``tags``/``metadata`` are the parent's, and so is ``taskIdentifier``; the fork
    has no expiry and is open even when the parent is closed. With an ``externalId`` that already
    names a fork of ``parent`` at the offsets asked for (when given), that fork is returned
    (``created`` False), so a retried fork does not make a second one; any other session with it
    is a 409 ``external_id_conflict``. (Offsets given as ``now``/``-1`` match any.)
    """
    positions = {
        "out": _fork_position(body.outOffset, "outOffset"),
        "in": _fork_position(body.inOffset, "inOffset"),
    }
    async with conn.transaction():
        sources = await channels.lock_fork_sources(conn, parent.id)
        offsets = {io: sources[io].fork_point(positions[io], f"{io}Offset") for io in channels.CHANNELS}
        inserted = await _insert_session(
            conn,
            environment,
            _NewSession(
                external_id=body.externalId,
                type=body.type if body.type is not None else parent.type,
                task_identifier=parent.task_identifier,
                tags=body.tags if body.tags is not None else parent.tags,
                metadata=body.metadata if body.metadata is not None else parent.metadata,
                forked_from=parent.id,
                fork_out_offset=offsets["out"],
                fork_in_offset=offsets["in"],
                root_id=parent.root_id,
            ),
        )
        if inserted is not None:
            await channels.fork_channels(conn, environment.id, inserted, sources, offsets)
    if inserted is not None:
        return await get_session_by_id(conn, inserted), True
    assert body.externalId is not None  # only an externalId can conflict
    existing = await get_session(conn, environment.id, body.externalId)
    lineage = existing.forked_from
    at = {"out": lineage.out_offset, "in": lineage.in_offset} if lineage is not None else {}
    same = (
        lineage is not None
        and lineage.session == parent.id
        and all(at[io] == positions[io] for io in channels.CHANNELS if isinstance(positions[io], int))
    )
    if not same:
        raise ExternalIdConflict(
            f"another session already has externalId {body.externalId!r}",
            details={"sessionId": existing.id},
        )
    if existing.closed_at is not None:
        raise SessionClosed(
            f"session with externalId {body.externalId!r} exists and is closed",
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
        raise ExternalIdConflict(
            f"another session already has externalId {changes.get('external_id')!r}",
        ) from None
    if updated is None:
        existing = await get_session(conn, environment_id, ref)  # 404 when missing
        raise SessionClosed(f"session {existing.id} is closed")
    return await get_session(conn, environment_id, updated)


async def close_session(conn: Conn, session_id: str, reason: str | None) -> tuple[SessionView, bool]:
    """Close a session and both channels. Returns ``(session, closed_now)``.

    Concurrent closes serialise on the channel row locks: the loser's UPDATE re-checks
    ``closed_at IS NULL``, matches nothing, and returns the winner's close unchanged.
    ``lastActiveAt`` takes in the channels' last record time, so it is exact once closed.
    """
    async with conn.transaction():
        locked = await channels.lock_channels(conn, session_id)
        closed_at = await conn.fetchval(
            """UPDATE sessions SET closed_at = now(), closed_reason = $2, updated_at = now(),
                   last_active_at = greatest(last_active_at, $3::timestamptz)
               WHERE id = $1 AND closed_at IS NULL
               RETURNING closed_at""",
            session_id,
            reason,
            locked.last_record_at,
        )
        if closed_at is not None:
            await channels.close_channels(conn, locked, closed_at)
    session = await get_session_by_id(conn, session_id)
    return session, closed_at is not None


def _filter_sql(environment_id: str, filters: SessionFilters, sql: PostgresParams) -> list[str]:
    """The WHERE conditions of a list or count, from the filter definitions in ``sessions.fields``."""
    return [f"s.environment_id = {sql.bind(environment_id)}", *filter_conditions(filters, sql)]


@dataclass(frozen=True, slots=True)
class Page:
    sessions: list[SessionView]
    next: str | None
    previous: str | None


async def list_sessions(
    conn: Conn, environment_id: str, query: ListQuery, *, now: datetime | None = None
) -> Page:
    """Keyset pagination on ``(sort key, id)``: stable under concurrent inserts, O(page) at any depth."""
    sql = PostgresParams(now or datetime.now(UTC))
    where = _filter_sql(environment_id, query.filters, sql)
    sort_column = "created_at" if query.sort == "createdAt" else "last_active_at"
    scan = keyset_scan(query)
    if scan.start is not None:
        key, key_id = sql.bind(from_micros(scan.start.key_us)), sql.bind(scan.start.id)
        where.append(f"(s.{sort_column}, s.id) {scan.comparison} ({key}, {key_id})")
    limit = sql.bind(scan.limit)
    rows = await conn.fetch(
        f"""{_SELECT} WHERE {" AND ".join(where)}
            ORDER BY s.{sort_column} {scan.direction}, s.id {scan.direction} LIMIT {limit}""",
        *sql.args,
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
    """``{count, byStatus}``: the total and one count per status, in one pass."""
    sql = PostgresParams(now or datetime.now(UTC))
    where = _filter_sql(environment_id, filters, sql)
    counts = ", ".join(status_counts(sql))
    row = await conn.fetchrow(
        f"SELECT count(*) AS total, {counts} FROM sessions s WHERE {' AND '.join(where)}", *sql.args
    )
    assert row is not None
    return {"count": row["total"], "byStatus": {status: row[status.lower()] for status in STATUSES}}
