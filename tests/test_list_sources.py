"""Where lists come from: ClickHouse (FINAL, deletes, hydration from Postgres), the Postgres
fallback, and read-your-writes with ``minLsn``. Real servers on the real stack throughout."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.clickhouse_copy import TOP, insert_v1, session_rows, v1_row
from tests.conftest import ServerThread, Tenant, assert_error, bearer, eventually, make_tenant, settings_for
from threadline.config import Settings
from threadline.db import create_pool
from threadline.embedded.stack import StackEndpoints
from threadline.replication.progress import replicated_lsn, wait_for_lsn
from threadline.sessions.clickhouse_listing import list_statement
from threadline.sessions.listing import parse_list_query

FAR_LSN = "FFFFFFFF/FFFFFFFF"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def ch_url(stack: StackEndpoints) -> Iterator[str]:
    """A server that always lists from ClickHouse and gives minLsn only a moment."""
    with ServerThread(settings_for(stack, list_source="clickhouse", min_lsn_wait_seconds=0.3)) as url:
        yield url


@pytest.fixture(scope="module")
def sources_tenant(settings: Settings, base_url: str) -> Tenant:
    return make_tenant(settings, "list-sources")


@pytest.fixture
def ch(ch_url: str, sources_tenant: Tenant) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ch_url, headers=bearer(sources_tenant.key), timeout=30) as c:
        yield c


def create(c: httpx.Client, kind: str, **body: Any) -> str:
    response = c.post("/api/v1/sessions", json={"type": kind, **body})
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


def listed(c: httpx.Client, **params: str) -> list[str]:
    response = c.get("/api/v1/sessions", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["threadline-list-source"] == "clickhouse"
    return [s["id"] for s in response.json()["data"]]


def counted(c: httpx.Client, **params: str) -> dict[str, Any]:
    response = c.get("/api/v1/sessions/count", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["threadline-list-source"] == "clickhouse"
    body: dict[str, Any] = response.json()
    return body


def test_values_are_bound_server_side_never_written_into_the_sql() -> None:
    hostile = "x') OR 1=1 --"
    query = parse_list_query(
        {"filter[tags]": [hostile], "filter[type]": [hostile], "filter[status]": ["ACTIVE"]}
    )
    statement = list_statement("env_1", query, datetime.now(UTC))
    assert hostile not in statement.sql
    assert "env_1" not in statement.sql
    assert statement.parameters["tags"] == [hostile]
    assert " FINAL " in statement.sql
    assert "_is_deleted = 0" in statement.sql


def test_two_versions_of_a_row_list_once_with_the_newest_values(
    ch: httpx.Client, settings: Settings, db: Any
) -> None:
    kind = unique("final")
    session_id = create(ch, kind)
    (row,) = session_rows(db, session_id)
    # Two inserts, two parts: only FINAL makes them one row.
    insert_v1(settings, [v1_row(row, version=TOP - 1, tags=["old"])])
    insert_v1(settings, [v1_row(row, version=TOP, tags=["new"])])
    assert listed(ch, **{"filter[type]": kind}) == [session_id]
    assert listed(ch, **{"filter[type]": kind, "filter[tags]": "old"}) == []
    assert listed(ch, **{"filter[type]": kind, "filter[tags]": "new"}) == [session_id]
    assert counted(ch, **{"filter[type]": kind})["count"] == 1


def test_a_row_whose_newest_version_is_a_delete_is_hidden(
    ch: httpx.Client, settings: Settings, db: Any
) -> None:
    kind = unique("deleted")
    session_id = create(ch, kind)
    (row,) = session_rows(db, session_id)
    insert_v1(settings, [v1_row(row, version=TOP - 1)])
    insert_v1(settings, [v1_row(row, version=TOP, deleted=True)])
    assert listed(ch, **{"filter[type]": kind}) == []
    assert counted(ch, **{"filter[type]": kind}) == {
        "count": 0,
        "byStatus": {"ACTIVE": 0, "CLOSED": 0, "EXPIRED": 0},
    }


def test_rows_postgres_no_longer_has_in_the_environment_drop_out_of_pages(
    ch: httpx.Client, settings: Settings, db: Any, base_url: str
) -> None:
    kind = unique("hydrate")
    kept = create(ch, kind)
    deleted = create(ch, kind)
    other = make_tenant(settings, unique("elsewhere"))
    with httpx.Client(base_url=base_url, headers=bearer(other.key), timeout=30) as c:
        foreign = create(c, kind)
    rows = session_rows(db, kept, deleted, foreign)
    # ClickHouse (wrongly or not yet) claims all three for this environment.
    environment_id = rows[0]["environment_id"]
    insert_v1(settings, [v1_row(r, version=TOP, environment_id=environment_id) for r in rows])
    db("execute", "DELETE FROM sessions WHERE id = $1", deleted)

    assert listed(ch, **{"filter[type]": kind}) == [kept]
    # Page by page (newest first: foreign, deleted, kept), the dropped rows leave short pages but
    # the cursors, built from ClickHouse's keys, still walk past them to the end.
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params = {"filter[type]": kind, "page[size]": "1"} | ({"page[after]": cursor} if cursor else {})
        page = ch.get("/api/v1/sessions", params=params).json()
        seen += [s["id"] for s in page["data"]]
        cursor = page["pagination"]["next"]
        if cursor is None:
            break
    assert seen == [kept]
    assert cursor is None


def test_cursors_follow_clickhouse_keys_when_postgres_has_moved_on(
    ch: httpx.Client, settings: Settings, db: Any
) -> None:
    kind = unique("lag")
    ids = [create(ch, kind) for _ in range(3)]
    rows = session_rows(db, *ids)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    insert_v1(
        settings,
        [v1_row(r, version=TOP, last_active_at=base + timedelta(seconds=i)) for i, r in enumerate(rows)],
    )
    # Postgres saw newer activity on the first one that ClickHouse has not caught up with.
    fresh = base + timedelta(days=30)
    db("execute", "UPDATE sessions SET last_active_at = $2 WHERE id = $1", ids[0], fresh)
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(5):
        params = {"filter[type]": kind, "sort": "lastActiveAt", "page[size]": "1"}
        page = ch.get("/api/v1/sessions", params=params | ({"page[after]": cursor} if cursor else {})).json()
        seen += page["data"]
        cursor = page["pagination"]["next"]
        if cursor is None:
            break
    assert [s["id"] for s in seen] == ids  # ClickHouse's order, each once, none skipped
    assert seen[0]["lastActiveAt"].startswith("2026-03-31")  # fields are Postgres's


def test_min_lsn_beyond_replication_is_503_with_retry_after(ch: httpx.Client) -> None:
    for path in ("/api/v1/sessions", "/api/v1/sessions/count"):
        response = ch.get(path, params={"minLsn": FAR_LSN})
        assert_error(response, 503, "replication_lagging")
        assert response.headers["retry-after"] == "1"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_clickhouse_falls_back_to_postgres(stack: StackEndpoints, sources_tenant: Tenant) -> None:
    url = f"http://default:@127.0.0.1:{_closed_port()}/threadline"
    settings = settings_for(stack, list_source="clickhouse", clickhouse_url=url)
    kind = unique("fallback")
    with (
        ServerThread(settings) as server,
        httpx.Client(base_url=server, headers=bearer(sources_tenant.key), timeout=30) as c,
    ):
        session_id = create(c, kind)
        for _ in range(2):  # the first request tries ClickHouse, the second is inside the back-off
            response = c.get("/api/v1/sessions", params={"filter[type]": kind, "minLsn": FAR_LSN})
            assert response.status_code == 200, response.text
            assert response.headers["threadline-list-source"] == "postgres"
            assert [s["id"] for s in response.json()["data"]] == [session_id]
        count = c.get("/api/v1/sessions/count", params={"filter[type]": kind})
        assert count.status_code == 200
        assert count.headers["threadline-list-source"] == "postgres"
        assert count.json()["count"] == 1


def test_postgres_source_never_touches_clickhouse(stack: StackEndpoints, sources_tenant: Tenant) -> None:
    with (
        ServerThread(settings_for(stack, list_source="postgres")) as server,
        httpx.Client(base_url=server, headers=bearer(sources_tenant.key), timeout=30) as c,
    ):
        response = c.get("/api/v1/sessions", params={"minLsn": FAR_LSN})
        assert response.status_code == 200
        assert response.headers["threadline-list-source"] == "postgres"


def test_wait_for_lsn_follows_the_slot(settings: Settings) -> None:
    """A test-only temporary slot stands in for the consumer's: created, advanced, gone with the
    connection, and never in the way of a real consumer."""
    slot = f"threadline_test_{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        conn = await asyncpg.connect(settings.database_url)
        try:
            assert await replicated_lsn(conn, slot=slot) is None
            assert not await wait_for_lsn(pool, "0/1", timeout=0.1, slot=slot)  # no slot yet
            await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput', true)", slot)
            start = await replicated_lsn(conn, slot=slot)
            assert start is not None
            # A committed write moves the flush position past what the slot has confirmed.
            await conn.execute("SELECT pg_logical_emit_message(true, 'threadline-test', 'x')")
            lsn = str(await conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
            assert await wait_for_lsn(pool, start, timeout=1, slot=slot)
            assert not await wait_for_lsn(pool, lsn, timeout=0.2, slot=slot)
            waiter = asyncio.create_task(wait_for_lsn(pool, lsn, timeout=30, slot=slot))
            await conn.execute("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", slot, lsn)
            assert await waiter
            assert await conn.fetchval(
                "SELECT $1::text::pg_lsn >= $2::text::pg_lsn", await replicated_lsn(conn, slot=slot), lsn
            )
            assert not await wait_for_lsn(pool, FAR_LSN, timeout=0.1, slot=slot)
        finally:
            await conn.close()  # drops the temporary slot
            await pool.close()

    asyncio.run(go())


def test_newest_first_pages_are_exact_across_creation_time_windows(
    ch: httpx.Client, sources_tenant: Tenant, db: Any
) -> None:
    """Sessions spread over 90 days: pages found inside narrowed windows (1 d, 7 d, 31 d) and
    by the final full scan must join into exactly the full order, newest and oldest first."""
    kind = unique("windows")
    now = datetime.now(UTC)
    # Written straight into Postgres (the API stamps created_at itself); the consumer mirrors
    # them. created_at is immutable, as it must be: it is ClickHouse's partition key.
    ids = db(
        "fetch",
        """INSERT INTO sessions (id, environment_id, project_id, organization_id, type, created_at,
                                 updated_at, last_active_at)
           SELECT 'session_window' || lpad(g::text, 18, '0') || $2, e.id, e.project_id, e.organization_id,
                  $2, $3::timestamptz - g * interval '3 days', $3::timestamptz, $3::timestamptz
           FROM environments e, generate_series(0, 29) AS g WHERE e.id = $1
           RETURNING id, created_at""",
        sources_tenant.environment_id,
        kind,
        now,
    )
    db(
        "execute",
        """INSERT INTO streams (environment_id, name, session_id, io, content_type)
           SELECT environment_id, 'sessions/' || id || '/' || io, id, io, 'application/json'
           FROM sessions, (VALUES ('out'), ('in')) v (io) WHERE type = $1""",
        kind,
    )
    expected = [r["id"] for r in sorted(ids, key=lambda r: (r["created_at"], r["id"]), reverse=True)]
    eventually(lambda: counted(ch, **{"filter[type]": kind})["count"] == 30)
    for sort, order in (("-createdAt", expected), ("createdAt", expected[::-1])):
        for size in ("1", "4", "11"):
            seen: list[str] = []
            cursor: str | None = None
            for _ in range(40):
                params = {"filter[type]": kind, "sort": sort, "page[size]": size}
                page = ch.get(
                    "/api/v1/sessions", params=params | ({"page[after]": cursor} if cursor else {})
                ).json()
                seen += [s["id"] for s in page["data"]]
                cursor = page["pagination"]["next"]
                if cursor is None:
                    break
            assert seen == order, (sort, size)
