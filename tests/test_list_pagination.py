"""List and count against an oracle: random filters, both sorts, both directions, every page.

The oracle is the same rows read straight from Postgres and filtered/sorted in Python, so a wrong
keyset comparison, a dropped or repeated row at a page boundary, or a filter that matches too much
shows up as a difference. Every test runs against both list sources: a server that lists from
Postgres, and one that lists from ClickHouse (holding a copy of the same rows).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.clickhouse_copy import insert_v1, v1_row, version_now
from tests.conftest import ServerThread, Tenant, bearer, make_tenant, settings_for
from threadline.embedded.stack import StackEndpoints

TYPES = ["chat", "voice", "batch"]
TAGS = ["red", "green", "blue", "gold"]
TASKS = ["agent-a", "agent-b", None]


@pytest.fixture(scope="module")
def population(base_url: str, settings: Any, db: Any) -> tuple[Tenant, list[dict[str, Any]]]:
    tenant = make_tenant(settings, "listing")
    rng = random.Random(20261123)
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=30) as c:
        for i in range(70):
            body: dict[str, Any] = {"type": rng.choice(TYPES), "tags": rng.sample(TAGS, rng.randint(0, 2))}
            if (task := rng.choice(TASKS)) is not None:
                body["taskIdentifier"] = task
            if rng.random() < 0.5:
                body["externalId"] = f"list-{i}"
            session = c.post("/api/v1/sessions", json=body).json()
            fate = rng.random()
            if fate < 0.2:
                c.post(f"/api/v1/sessions/{session['id']}/close")
            elif fate < 0.35:
                c.patch(f"/api/v1/sessions/{session['id']}", json={"expiresAt": "2000-01-01T00:00:00Z"})
    # Spread activity times (as appends would) and make some ties to exercise the id tiebreak.
    ids = db("fetch", "SELECT id FROM sessions WHERE environment_id = $1", tenant.environment_id)
    base = datetime(2026, 6, 1, tzinfo=UTC)
    for row in ids:
        moment = base + timedelta(
            seconds=rng.choice([0, 5, 10]) if rng.random() < 0.3 else rng.randint(0, 10**6)
        )
        db("execute", "UPDATE sessions SET last_active_at = $2 WHERE id = $1", row["id"], moment)
    rows = db("fetch", "SELECT * FROM sessions WHERE environment_id = $1", tenant.environment_id)
    return tenant, [dict(r) for r in rows]


@pytest.fixture(scope="module", params=["postgres", "clickhouse"])
def source(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(scope="module")
def list_url(
    stack: StackEndpoints,
    settings: Any,
    db: Any,
    source: str,
    population: tuple[Tenant, list[dict[str, Any]]],
) -> Iterator[str]:
    """A server that lists from ``source`` only; for ClickHouse, with the population copied in."""
    if source == "clickhouse":
        version = version_now(db)
        insert_v1(settings, [v1_row(row, version=version) for row in population[1]])
    with ServerThread(settings_for(stack, list_source=source)) as url:
        yield url


def status_of(row: dict[str, Any], now: datetime) -> str:
    if row["closed_at"] is not None:
        return "CLOSED"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "EXPIRED"
    return "ACTIVE"


def oracle(rows: list[dict[str, Any]], params: dict[str, str], now: datetime) -> list[str]:
    def keep(row: dict[str, Any]) -> bool:
        if "filter[type]" in params and row["type"] not in params["filter[type]"].split(","):
            return False
        if "filter[tags]" in params and not set(row["tags"]) & set(params["filter[tags]"].split(",")):
            return False
        if "filter[taskIdentifier]" in params and row["task_identifier"] not in params[
            "filter[taskIdentifier]"
        ].split(","):
            return False
        if "filter[status]" in params and status_of(row, now) not in params["filter[status]"].split(","):
            return False
        if "filter[createdAt][from]" in params:
            start = datetime.fromisoformat(params["filter[createdAt][from]"])
            if row["created_at"] < start:
                return False
        return True

    sort = params.get("sort", "-createdAt")
    column = "created_at" if sort.endswith("createdAt") else "last_active_at"
    chosen = sorted(filter(keep, rows), key=lambda r: (r[column], r["id"]), reverse=sort.startswith("-"))
    return [r["id"] for r in chosen]


def get(c: httpx.Client, path: str, params: dict[str, str], source: str) -> dict[str, Any]:
    response = c.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["threadline-list-source"] == source
    body: dict[str, Any] = response.json()
    return body


def walk(c: httpx.Client, params: dict[str, str], source: str) -> tuple[list[str], list[list[str]]]:
    """All ids page by page forwards; then the same pages walked backwards from the end."""
    pages: list[list[str]] = []
    cursor: str | None = None
    last: dict[str, Any] = {}
    while True:
        query = dict(params) | ({"page[after]": cursor} if cursor else {})
        last = get(c, "/api/v1/sessions", query, source)
        pages.append([s["id"] for s in last["data"]])
        cursor = last["pagination"]["next"]
        if cursor is None:
            break
        assert len(pages) < 200
    backwards: list[list[str]] = [pages[-1]]
    cursor = last["pagination"]["previous"]
    while cursor is not None:
        page = get(c, "/api/v1/sessions", dict(params) | {"page[before]": cursor}, source)
        backwards.insert(0, [s["id"] for s in page["data"]])
        cursor = page["pagination"]["previous"]
        assert len(backwards) < 200
    return [i for page in pages for i in page], backwards


def test_random_filters_and_cursors_match_the_oracle(
    list_url: str, source: str, population: tuple[Tenant, list[dict[str, Any]]]
) -> None:
    tenant, rows = population
    rng = random.Random(7)
    created = sorted(r["created_at"] for r in rows)
    with httpx.Client(base_url=list_url, headers=bearer(tenant.key), timeout=30) as c:
        for _ in range(30):
            params: dict[str, str] = {
                "sort": rng.choice(["-createdAt", "createdAt", "-lastActiveAt", "lastActiveAt"]),
                "page[size]": str(rng.choice([1, 3, 7, 20, 100])),
            }
            if rng.random() < 0.4:
                params["filter[type]"] = ",".join(rng.sample(TYPES, rng.randint(1, 2)))
            if rng.random() < 0.4:
                params["filter[tags]"] = ",".join(rng.sample(TAGS, rng.randint(1, 2)))
            if rng.random() < 0.3:
                params["filter[taskIdentifier]"] = rng.choice(["agent-a", "agent-b", "agent-a,agent-b"])
            if rng.random() < 0.4:
                params["filter[status]"] = ",".join(
                    rng.sample(["ACTIVE", "CLOSED", "EXPIRED"], rng.randint(1, 2))
                )
            if rng.random() < 0.3:
                params["filter[createdAt][from]"] = rng.choice(created).isoformat()
            now = datetime.now(UTC)
            expected = oracle(rows, params, now)
            forwards, backwards = walk(c, params, source)
            assert forwards == expected, params
            assert [i for page in backwards for i in page] == expected, params
            size = int(params["page[size]"])
            assert all(len(page) <= size for page in backwards)
            filters = {k: v for k, v in params.items() if k.startswith("filter")}
            count = get(c, "/api/v1/sessions/count", filters, source)
            assert count["count"] == len(expected), params
            assert sum(count["byStatus"].values()) == len(expected)
            for status in ("ACTIVE", "CLOSED", "EXPIRED"):
                assert count["byStatus"][status] == sum(
                    1 for r in rows if r["id"] in set(expected) and status_of(r, now) == status
                ), params


def test_period_filter_and_external_id_filter(
    list_url: str, source: str, population: tuple[Tenant, list[dict[str, Any]]]
) -> None:
    tenant, rows = population
    with httpx.Client(base_url=list_url, headers=bearer(tenant.key), timeout=30) as c:
        recent = get(c, "/api/v1/sessions", {"filter[createdAt][period]": "1d", "page[size]": "100"}, source)
        assert len(recent["data"]) == len(rows)
        nothing = get(
            c,
            "/api/v1/sessions",
            {"filter[createdAt][to]": "2000-01-01T00:00:00Z", "page[size]": "100"},
            source,
        )
        assert nothing["data"] == []
        assert nothing["pagination"] == {"next": None, "previous": None}
        with_external = [r for r in rows if r["external_id"]][:3]
        wanted = ",".join(r["external_id"] for r in with_external)
        found = get(c, "/api/v1/sessions", {"filter[externalId]": wanted}, source)
        assert {s["id"] for s in found["data"]} == {r["id"] for r in with_external}
        # The exact microsecond of one row's creation is inside [from, to] on both sides.
        row = rows[len(rows) // 2]
        at = row["created_at"].isoformat()
        exact = get(
            c, "/api/v1/sessions", {"filter[createdAt][from]": at, "filter[createdAt][to]": at}, source
        )
        assert [s["id"] for s in exact["data"]] == [
            r["id"] for r in rows if r["created_at"] == row["created_at"]
        ]
