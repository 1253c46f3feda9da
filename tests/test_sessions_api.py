"""Sessions REST API against the real stack: every route's happy path and documented errors."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import Tenant, assert_error, bearer

LSN = re.compile(r"^[0-9A-F]+/[0-9A-F]+$")


def unique(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("type", "chat")
    response = client.post("/api/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def test_create_returns_the_full_session_with_an_lsn(client: httpx.Client) -> None:
    external_id = unique("ext")
    response = client.post(
        "/api/v1/sessions",
        json={
            "type": "chat",
            "externalId": f"  {external_id}  ",
            "taskIdentifier": "support-agent",
            "tags": ["a", "b", "a"],
            "metadata": {"user": {"id": 7}},
            "expiresAt": "2099-01-01T00:00:00Z",
        },
    )
    assert response.status_code == 201, response.text
    assert LSN.match(response.headers["threadline-lsn"])
    session = response.json()
    assert session["id"].startswith("session_")
    assert len(session["id"]) == len("session_") + 26
    assert session["externalId"] == external_id  # trimmed
    assert session["tags"] == ["a", "b"]
    assert session["metadata"] == {"user": {"id": 7}}
    assert session["taskIdentifier"] == "support-agent"
    assert session["status"] == "ACTIVE"
    assert session["expiresAt"] == "2099-01-01T00:00:00.000Z"
    assert session["closedAt"] is None
    assert session["closedReason"] is None
    assert session["lastActiveAt"] == session["createdAt"]
    for io in ("out", "in"):
        assert session["channels"][io] == {
            "records": 0,
            "bytes": 0,
            "tailOffset": "0000000000000000_0000000000000000",
            "closed": False,
            "firstRecordAt": None,
            "lastRecordAt": None,
        }


def test_create_is_idempotent_on_external_id(client: httpx.Client) -> None:
    external_id = unique("idem")
    first = client.post("/api/v1/sessions", json={"type": "chat", "externalId": external_id})
    second = client.post("/api/v1/sessions", json={"type": "other", "externalId": external_id})
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["type"] == "chat"  # the existing session, unchanged


def test_concurrent_creates_with_one_external_id_make_one_session(client: httpx.Client, db: Any) -> None:
    external_id = unique("race")

    def post(_: int) -> httpx.Response:
        return client.post("/api/v1/sessions", json={"type": "chat", "externalId": external_id})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(16)))
    assert sorted(r.status_code for r in responses).count(201) == 1
    assert all(r.status_code in (200, 201) for r in responses)
    assert len({r.json()["id"] for r in responses}) == 1
    assert db("fetchval", "SELECT count(*) FROM sessions WHERE external_id = $1", external_id) == 1
    session_id = responses[0].json()["id"]
    assert db("fetchval", "SELECT count(*) FROM streams WHERE session_id = $1", session_id) == 2


def test_create_with_the_external_id_of_a_closed_session_is_409(client: httpx.Client) -> None:
    external_id = unique("closed")
    session = create(client, externalId=external_id)
    client.post(f"/api/v1/sessions/{session['id']}/close", json={})
    response = client.post("/api/v1/sessions", json={"type": "chat", "externalId": external_id})
    error = assert_error(response, 409, "session_closed")
    assert error["details"] == {"sessionId": session["id"]}


def test_create_rejects_invalid_bodies_and_changes_nothing(client: httpx.Client, db: Any) -> None:
    before = db("fetchval", "SELECT count(*) FROM sessions")
    cases: list[tuple[Any, str]] = [
        ({}, "type"),
        ({"type": ""}, "type"),
        ({"type": "x" * 65}, "type"),
        ({"type": "chat", "externalID": "typo"}, "externalID"),
        ({"type": "chat", "externalId": "session_abc"}, "externalId"),
        ({"type": "chat", "externalId": "   "}, "externalId"),
        ({"type": "chat", "externalId": "x" * 257}, "externalId"),
        ({"type": "chat", "tags": [f"t{i}" for i in range(11)]}, "tags"),
        ({"type": "chat", "tags": ["x" * 129]}, "tags.0"),
        ({"type": "chat", "tags": [""]}, "tags.0"),
        ({"type": "chat", "metadata": [1, 2]}, "metadata"),
        ({"type": "chat", "expiresAt": "2099-01-01T00:00:00"}, "expiresAt"),
        ({"type": "chat", "expiresAt": "tomorrow"}, "expiresAt"),
        ({"type": 5}, "type"),
    ]
    for body, field in cases:
        error = assert_error(client.post("/api/v1/sessions", json=body), 400, "validation_error")
        assert field in [d["field"] for d in error["details"]], (body, error)
    for raw in (b"{not json", b"[1]", b"", b'"text"'):
        assert_error(
            client.post("/api/v1/sessions", content=raw, headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        )
    assert db("fetchval", "SELECT count(*) FROM sessions") == before


def test_create_body_over_32_kib_is_413(client: httpx.Client) -> None:
    body = {"type": "chat", "metadata": {"blob": "x" * (33 * 1024)}}
    assert_error(client.post("/api/v1/sessions", json=body), 413, "payload_too_large")
    # Also when the client does not declare a length (chunked upload).
    chunks = iter([b'{"type": "chat", "metadata": {"blob": "', b"y" * (40 * 1024), b'"}}'])
    assert_error(
        client.post("/api/v1/sessions", content=chunks, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )


def test_get_by_id_and_by_external_id(client: httpx.Client) -> None:
    external_id = unique("get")
    session = create(client, externalId=external_id)
    by_id = client.get(f"/api/v1/sessions/{session['id']}")
    by_external = client.get(f"/api/v1/sessions/{external_id}")
    assert by_id.status_code == by_external.status_code == 200
    assert by_id.json() == by_external.json() == session


def test_get_unknown_session_is_404(client: httpx.Client) -> None:
    assert_error(client.get("/api/v1/sessions/session_00000000000000000000000000"), 404, "session_not_found")
    assert_error(client.get(f"/api/v1/sessions/{unique('nope')}"), 404, "session_not_found")


def test_another_environments_session_is_404_everywhere(
    client: httpx.Client, base_url: str, other_tenant: Tenant
) -> None:
    external_id = unique("mine")
    session = create(client, externalId=external_id)
    with httpx.Client(base_url=base_url, headers=bearer(other_tenant.key)) as other:
        for ref in (session["id"], external_id):
            assert_error(other.get(f"/api/v1/sessions/{ref}"), 404)
            assert_error(other.patch(f"/api/v1/sessions/{ref}", json={"tags": ["x"]}), 404)
            assert_error(other.post(f"/api/v1/sessions/{ref}/close", json={}), 404)
            assert_error(other.post(f"/api/v1/sessions/{ref}/tokens", json={}), 404)
        listed = other.get("/api/v1/sessions", params={"filter[externalId]": external_id}).json()
        assert listed["data"] == []
    assert client.get(f"/api/v1/sessions/{session['id']}").json()["status"] == "ACTIVE"


def test_patch_updates_only_given_fields(client: httpx.Client) -> None:
    session = create(client, tags=["a"], metadata={"k": 1}, externalId=unique("p"))
    new_external = unique("renamed")
    response = client.patch(
        f"/api/v1/sessions/{session['id']}",
        json={"tags": ["b", "c"], "externalId": new_external},
    )
    assert response.status_code == 200, response.text
    assert LSN.match(response.headers["threadline-lsn"])
    patched = response.json()
    assert patched["tags"] == ["b", "c"]
    assert patched["externalId"] == new_external
    assert patched["metadata"] == {"k": 1}
    assert patched["updatedAt"] > session["updatedAt"]
    assert client.get(f"/api/v1/sessions/{new_external}").json()["id"] == session["id"]
    # Clearing the externalId and replacing metadata; patching by the old name no longer works.
    cleared = client.patch(
        f"/api/v1/sessions/{new_external}", json={"externalId": None, "metadata": {}}
    ).json()
    assert cleared["externalId"] is None
    assert cleared["metadata"] == {}
    assert_error(client.get(f"/api/v1/sessions/{new_external}"), 404)


def test_patch_expires_at_in_the_past_makes_the_session_expired(client: httpx.Client) -> None:
    session = create(client)
    patched = client.patch(f"/api/v1/sessions/{session['id']}", json={"expiresAt": "2000-01-01T00:00:00Z"})
    assert patched.json()["status"] == "EXPIRED"
    revived = client.patch(f"/api/v1/sessions/{session['id']}", json={"expiresAt": None})
    assert revived.json()["status"] == "ACTIVE"


def test_patch_errors(client: httpx.Client) -> None:
    taken = unique("taken")
    create(client, externalId=taken)
    session = create(client)
    path = f"/api/v1/sessions/{session['id']}"
    assert_error(client.patch(path, json={"externalId": taken}), 409, "external_id_conflict")
    assert_error(client.patch(path, json={}), 400, "validation_error")
    assert_error(client.patch(path, json={"tags": None}), 400, "validation_error")
    assert_error(client.patch(path, json={"type": "other"}), 400, "validation_error")
    assert_error(client.patch(path, json={"externalId": "session_x"}), 400, "validation_error")
    assert_error(client.patch("/api/v1/sessions/session_00000000000000000000000000", json={"tags": []}), 404)
    client.post(f"{path}/close", json={})
    assert_error(client.patch(path, json={"tags": ["late"]}), 409, "session_closed")
    assert client.get(path).json()["tags"] == []


def test_close_is_terminal_and_idempotent(client: httpx.Client) -> None:
    session = create(client)
    path = f"/api/v1/sessions/{session['id']}"
    first = client.post(f"{path}/close", json={"reason": "done"})
    assert first.status_code == 200, first.text
    assert LSN.match(first.headers["threadline-lsn"])
    closed = first.json()
    assert closed["status"] == "CLOSED"
    assert closed["closedReason"] == "done"
    assert closed["closedAt"] is not None
    assert closed["channels"]["out"]["closed"]
    assert closed["channels"]["in"]["closed"]
    again = client.post(f"{path}/close", json={"reason": "something else"})
    assert again.status_code == 200
    assert again.json() == closed


def test_close_without_a_body_and_by_external_id(client: httpx.Client) -> None:
    external_id = unique("c")
    create(client, externalId=external_id)
    response = client.post(f"/api/v1/sessions/{external_id}/close")
    assert response.status_code == 200
    assert response.json()["closedReason"] is None
    assert_error(client.post(f"/api/v1/sessions/{external_id}/close", json={"reason": "x" * 257}), 400)
    assert_error(client.post("/api/v1/sessions/session_00000000000000000000000000/close"), 404)


def test_concurrent_closes_agree_on_one_close(client: httpx.Client, db: Any) -> None:
    session = create(client)

    def close(i: int) -> httpx.Response:
        return client.post(f"/api/v1/sessions/{session['id']}/close", json={"reason": f"r{i}"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(close, range(16)))
    assert {r.status_code for r in responses} == {200}
    bodies = [r.json() for r in responses]
    assert len({(b["closedAt"], b["closedReason"]) for b in bodies}) == 1
    closed_at = db("fetch", "SELECT DISTINCT closed_at FROM streams WHERE session_id = $1", session["id"])
    assert len(closed_at) == 1
    assert closed_at[0]["closed_at"] is not None


def test_count_with_filters(client: httpx.Client) -> None:
    kind = unique("count")
    a = create(client, type=kind, tags=["x"])
    create(client, type=kind, tags=["y"])
    c = create(client, type=kind)
    client.post(f"/api/v1/sessions/{a['id']}/close")
    patched = client.patch(f"/api/v1/sessions/{c['id']}", json={"expiresAt": "2001-01-01T00:00:00Z"})
    # Counts may come from ClickHouse: minLsn makes them include the writes above.
    lsn = patched.headers["threadline-lsn"]
    response = client.get("/api/v1/sessions/count", params={"filter[type]": kind, "minLsn": lsn})
    assert response.status_code == 200
    assert response.json() == {"count": 3, "byStatus": {"ACTIVE": 1, "CLOSED": 1, "EXPIRED": 1}}
    tagged = client.get(
        "/api/v1/sessions/count", params={"filter[type]": kind, "filter[tags]": "x,y", "minLsn": lsn}
    ).json()
    assert tagged["count"] == 2
    active = client.get(
        "/api/v1/sessions/count", params={"filter[type]": kind, "filter[status]": "ACTIVE", "minLsn": lsn}
    ).json()
    assert active["count"] == 1
    for status in ("ACTIVE", "CLOSED", "EXPIRED"):
        # Each status alone, as list and count (CLOSED alone binds no time parameter).
        params = {"filter[type]": kind, "filter[status]": status, "minLsn": lsn}
        listed = client.get("/api/v1/sessions", params=params)
        assert listed.status_code == 200, listed.text
        assert [s["status"] for s in listed.json()["data"]] == [status]
        assert client.get("/api/v1/sessions/count", params=params).json()["count"] == 1
    assert_error(client.get("/api/v1/sessions/count", params={"filter[nope]": "1"}), 400, "unknown_parameter")
    assert_error(client.get("/api/v1/sessions/count", params={"page[size]": "5"}), 400, "unknown_parameter")


def test_list_pages_and_headers(client: httpx.Client) -> None:
    kind = unique("list")
    created = [client.post("/api/v1/sessions", json={"type": kind}) for _ in range(5)]
    ids = [response.json()["id"] for response in created]
    lsn = created[-1].headers["threadline-lsn"]
    first = client.get("/api/v1/sessions", params={"filter[type]": kind, "page[size]": 2, "minLsn": lsn})
    assert first.status_code == 200
    assert first.headers["threadline-list-source"] in ("clickhouse", "postgres")
    page = first.json()
    assert [s["id"] for s in page["data"]] == ids[::-1][:2]
    assert page["pagination"]["previous"] is None
    assert page["pagination"]["next"]
    second = client.get(
        "/api/v1/sessions",
        params={"filter[type]": kind, "page[size]": 2, "page[after]": page["pagination"]["next"]},
    ).json()
    assert [s["id"] for s in second["data"]] == ids[::-1][2:4]
    back = client.get(
        "/api/v1/sessions",
        params={"filter[type]": kind, "page[size]": 2, "page[before]": second["pagination"]["previous"]},
    ).json()
    assert [s["id"] for s in back["data"]] == ids[::-1][:2]


def test_list_rejects_bad_queries(client: httpx.Client) -> None:
    cursor = client.get("/api/v1/sessions", params={"page[size]": 1}).json()["pagination"]["next"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"filter[tag]": "x"}, "unknown_parameter"),
        ({"limit": "5"}, "unknown_parameter"),
        ({"page[size]": "0"}, "validation_error"),
        ({"page[size]": "101"}, "validation_error"),
        ({"page[size]": "ten"}, "validation_error"),
        ({"page[after]": "a", "page[before]": "b"}, "validation_error"),
        ({"page[after]": "not-a-cursor"}, "invalid_cursor"),
        ({"page[after]": cursor, "sort": "lastActiveAt"}, "invalid_cursor"),
        ({"sort": "name"}, "validation_error"),
        ({"filter[status]": "RUNNING"}, "validation_error"),
        ({"filter[createdAt][period]": "7 days"}, "validation_error"),
        (
            {"filter[createdAt][period]": "7d", "filter[createdAt][from]": "2026-01-01T00:00:00Z"},
            "validation_error",
        ),
        ({"filter[createdAt][from]": "2026-01-01T00:00:00"}, "validation_error"),
        ({"minLsn": "latest"}, "validation_error"),
    ]
    for params, code in bad:
        assert_error(client.get("/api/v1/sessions", params=params), 400, code)
    assert_error(client.get("/api/v1/sessions?filter[type]=a&filter[type]=b"), 400, "validation_error")


def test_list_accepts_min_lsn_from_a_write(client: httpx.Client) -> None:
    kind = unique("lsn")
    created = client.post("/api/v1/sessions", json={"type": kind})
    listed = client.get(
        "/api/v1/sessions", params={"filter[type]": kind, "minLsn": created.headers["threadline-lsn"]}
    )
    assert [s["id"] for s in listed.json()["data"]] == [created.json()["id"]]
