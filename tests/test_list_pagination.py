"""List and count against an oracle: random filters, both sorts, both directions, every page.

The oracle is the same rows read straight from Postgres and filtered/sorted in Python, so a wrong
keyset comparison, a dropped or repeated row at a page boundary, or a filter that matches too much
shows up as a difference.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant, bearer, make_tenant

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


def walk(c: httpx.Client, params: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """All ids page by page forwards; then the same pages walked backwards from the end."""
    pages: list[list[str]] = []
    cursor: str | None = None
    last: dict[str, Any] = {}
    while True:
        query = dict(params) | ({"page[after]": cursor} if cursor else {})
        response = c.get("/api/v1/sessions", params=query)
        assert response.status_code == 200, response.text
        last = response.json()
        pages.append([s["id"] for s in last["data"]])
        cursor = last["pagination"]["next"]
        if cursor is None:
            break
        assert len(pages) < 200
    backwards: list[list[str]] = [pages[-1]]
    cursor = last["pagination"]["previous"]
    while cursor is not None:
        page = c.get("/api/v1/sessions", params=dict(params) | {"page[before]": cursor}).json()
        backwards.insert(0, [s["id"] for s in page["data"]])
        cursor = page["pagination"]["previous"]
        assert len(backwards) < 200
    return [i for page in pages for i in page], backwards


def test_random_filters_and_cursors_match_the_oracle(
    base_url: str, population: tuple[Tenant, list[dict[str, Any]]]
) -> None:
    tenant, rows = population
    rng = random.Random(7)
    created = sorted(r["created_at"] for r in rows)
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=30) as c:
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
            forwards, backwards = walk(c, params)
            assert forwards == expected, params
            assert [i for page in backwards for i in page] == expected, params
            size = int(params["page[size]"])
            assert all(len(page) <= size for page in backwards)
            count = c.get(
                "/api/v1/sessions/count", params={k: v for k, v in params.items() if k.startswith("filter")}
            ).json()
            assert count["count"] == len(expected), params
            assert sum(count["byStatus"].values()) == len(expected)


def test_period_filter_and_external_id_filter(
    base_url: str, population: tuple[Tenant, list[dict[str, Any]]]
) -> None:
    tenant, rows = population
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key)) as c:
        recent = c.get(
            "/api/v1/sessions", params={"filter[createdAt][period]": "1d", "page[size]": 100}
        ).json()
        assert len(recent["data"]) == len(rows)
        nothing = c.get(
            "/api/v1/sessions", params={"filter[createdAt][to]": "2000-01-01T00:00:00Z", "page[size]": 100}
        ).json()
        assert nothing["data"] == []
        assert nothing["pagination"] == {"next": None, "previous": None}
        with_external = [r for r in rows if r["external_id"]][:3]
        wanted = ",".join(r["external_id"] for r in with_external)
        found = c.get("/api/v1/sessions", params={"filter[externalId]": wanted}).json()
        assert {s["id"] for s in found["data"]} == {r["id"] for r in with_external}
