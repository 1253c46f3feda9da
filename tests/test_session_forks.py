"""Session forks (issue 18): ``POST /api/v1/sessions/{session}/fork`` against the live stack.

A fork's ``out`` and ``in`` are stream forks of the parent's, so every read path (Durable
Streams GET, the realtime SSE route) serves the parent's prefix, then the fork's own appends; the
lineage fields are listed and counted from ClickHouse and from the Postgres fallback alike.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import ServerThread, Tenant, assert_error, bearer, eventually, settings_for
from tests.test_auth import make_jwt
from threadline.embedded.stack import StackEndpoints

JSON = {"Content-Type": "application/json"}


def _offset(position: int) -> str:
    return f"0000000000000000_{position:016d}"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/api/v1/sessions", json={"type": "chat", **body})
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


def _fork(client: httpx.Client, parent: str, status: int = 201, **body: Any) -> dict[str, Any]:
    response = client.post(f"/api/v1/sessions/{parent}/fork", json=body)
    assert response.status_code == status, response.text
    assert response.headers["threadline-lsn"]
    session: dict[str, Any] = response.json()
    return session


def _append(client: httpx.Client, session: str, io: str, *values: Any) -> None:
    for value in values:
        response = client.post(f"/v1/stream/sessions/{session}/{io}", headers=JSON, content=json.dumps(value))
        assert response.status_code == 204, response.text


def _read(client: httpx.Client, session: str, io: str, offset: str = "-1") -> list[Any]:
    response = client.get(f"/v1/stream/sessions/{session}/{io}", params={"offset": offset})
    assert response.status_code == 200, response.text
    values: list[Any] = response.json()
    return values


def _sse(client: httpx.Client, session: str, io: str, offset: str = "-1") -> list[tuple[str, Any]]:
    """Every record of the realtime SSE route from ``offset`` (a catch-up: the server ends it)."""
    url = f"/realtime/v1/sessions/{session}/{io}"
    with connect_sse(
        client, "GET", url, params={"offset": offset}, headers={"Timeout-Seconds": "1"}
    ) as source:
        assert source.response.status_code == 200, source.response.read()
        return [(e.id, json.loads(e.data)) for e in source.iter_sse() if e.event == "message" and e.data]


# --- reading a fork ----------------------------------------------------------------------------


def test_a_fork_reads_the_parents_prefix_then_its_own_appends(client: httpx.Client) -> None:
    parent = _create(client, tags=["p"], metadata={"m": 1})
    _append(client, parent["id"], "out", "o0", "o1", "o2", "o3", "o4")
    _append(client, parent["id"], "in", "i0", "i1", "i2")

    fork = _fork(
        client,
        parent["id"],
        outOffset=_offset(3),
        inOffset=_offset(1),
        type="branch",
        tags=["f"],
        metadata={"m": 2},
    )
    assert fork["id"] != parent["id"]
    assert (fork["type"], fork["tags"], fork["metadata"]) == ("branch", ["f"], {"m": 2})
    assert fork["status"] == "ACTIVE"
    assert fork["forkedFrom"] == {"session": parent["id"], "outOffset": _offset(3), "inOffset": _offset(1)}
    assert fork["rootId"] == parent["id"]
    # The channels start at the fork points; stats count the fork's own appends only.
    assert fork["channels"]["out"]["tailOffset"] == _offset(3)
    assert fork["channels"]["in"]["tailOffset"] == _offset(1)
    assert fork["channels"]["out"]["records"] == fork["channels"]["in"]["records"] == 0

    _append(client, fork["id"], "out", "f-out")
    _append(client, fork["id"], "in", "f-in")
    _append(client, parent["id"], "out", "p-late")  # after the fork: never in it
    _append(client, parent["id"], "in", "p-late")

    assert _read(client, fork["id"], "out") == ["o0", "o1", "o2", "f-out"]
    assert _read(client, fork["id"], "in") == ["i0", "f-in"]
    assert _read(client, fork["id"], "out", _offset(2)) == ["o2", "f-out"]
    assert _read(client, parent["id"], "out") == ["o0", "o1", "o2", "o3", "o4", "p-late"]
    assert _read(client, parent["id"], "in") == ["i0", "i1", "i2", "p-late"]
    # The realtime SSE route: the same records, with offsets that continue the parent's.
    assert _sse(client, fork["id"], "out") == [
        (_offset(1), "o0"),
        (_offset(2), "o1"),
        (_offset(3), "o2"),
        (_offset(4), "f-out"),
    ]
    assert _sse(client, fork["id"], "in") == [(_offset(1), "i0"), (_offset(2), "f-in")]
    # No record bytes were copied: the fork's channels index only their own appends.
    got = client.get(f"/api/v1/sessions/{fork['id']}").json()
    assert got["channels"]["out"]["records"] == 1
    assert got["channels"]["out"]["tailOffset"] == _offset(4)


def test_a_live_reader_of_a_fork_sees_its_appends_and_not_the_parents(client: httpx.Client) -> None:
    parent = _create(client)
    _append(client, parent["id"], "out", "before")
    fork = _fork(client, parent["id"])
    received: list[tuple[str, Any]] = []
    ready = threading.Event()

    def subscribe() -> None:
        url = f"/realtime/v1/sessions/{fork['id']}/out"
        with connect_sse(client, "GET", url, params={"offset": "-1"}) as source:
            for event in source.iter_sse():
                if event.event == "message" and event.data:
                    received.append((event.id, json.loads(event.data)))
                    ready.set()

    reader = threading.Thread(target=subscribe, daemon=True)
    reader.start()
    assert ready.wait(10)  # the prefix arrived: the reader is live at the fork's tail
    _append(client, parent["id"], "out", "parent-only")
    _append(client, fork["id"], "out", "fork-1", "fork-2")
    assert client.post(f"/api/v1/sessions/{fork['id']}/close", json={}).status_code == 200
    reader.join(15)
    assert not reader.is_alive(), "the close ends the SSE response"
    assert received == [(_offset(1), "before"), (_offset(2), "fork-1"), (_offset(3), "fork-2")]


def test_defaults_fork_both_channels_at_their_tails_with_the_parents_fields(client: httpx.Client) -> None:
    parent = _create(
        client,
        type="support",
        taskIdentifier="agent-v1",
        tags=["a", "b"],
        metadata={"user": "u1"},
        expiresAt="2099-01-01T00:00:00Z",
    )
    _append(client, parent["id"], "out", 1, 2)
    _append(client, parent["id"], "in", "q")
    # No body at all, and an empty one, are the same request.
    no_body = client.post(f"/api/v1/sessions/{parent['id']}/fork")
    assert no_body.status_code == 201, no_body.text
    for fork in (no_body.json(), _fork(client, parent["id"])):
        assert fork["forkedFrom"] == {
            "session": parent["id"],
            "outOffset": _offset(2),
            "inOffset": _offset(1),
        }
        assert (fork["type"], fork["taskIdentifier"], fork["tags"], fork["metadata"]) == (
            "support",
            "agent-v1",
            ["a", "b"],
            {"user": "u1"},
        )
        assert fork["expiresAt"] is None
        assert fork["externalId"] is None
        assert _read(client, fork["id"], "out") == [1, 2]
        assert _read(client, fork["id"], "in") == ["q"]
    # -1 is the first kept record, now the tail.
    edges = _fork(client, parent["id"], outOffset="-1", inOffset="now")
    assert edges["forkedFrom"] == {"session": parent["id"], "outOffset": _offset(0), "inOffset": _offset(1)}
    assert _read(client, edges["id"], "out") == []


def test_forking_a_closed_session_makes_an_open_one(client: httpx.Client) -> None:
    parent = _create(client)
    _append(client, parent["id"], "out", "last words")
    assert client.post(f"/api/v1/sessions/{parent['id']}/close", json={"reason": "done"}).status_code == 200

    fork = _fork(client, parent["id"])
    assert fork["status"] == "ACTIVE"
    assert fork["closedAt"] is None
    assert fork["channels"]["out"]["closed"] is False
    assert fork["channels"]["in"]["closed"] is False
    _append(client, fork["id"], "out", "more")
    assert _read(client, fork["id"], "out") == ["last words", "more"]
    refused = client.post(f"/v1/stream/sessions/{parent['id']}/out", headers=JSON, content=b'"x"')
    assert refused.status_code == 409, refused.text
    assert client.get(f"/api/v1/sessions/{parent['id']}").json()["status"] == "CLOSED"


# --- lineage in get, list and count ------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(base_url: str, tenant: Tenant) -> dict[str, Any]:
    """root -> a -> b, and root -> c, with a type no other test uses."""
    kind = _unique("tree")
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=30) as c:
        root = _create(c, type=kind)
        _append(c, root["id"], "out", "r0", "r1")
        a = _fork(c, root["id"])
        _append(c, a["id"], "out", "a2")
        b = _fork(c, a["id"], outOffset=_offset(3))
        last = c.post(f"/api/v1/sessions/{root['id']}/fork", json={"outOffset": _offset(1)})
        assert last.status_code == 201, last.text
        return {
            "type": kind,
            "root": root,
            "a": a,
            "b": b,
            "c": last.json(),
            "lsn": last.headers["threadline-lsn"],
        }


def test_lineage_through_a_fork_of_a_fork(client: httpx.Client, tree: dict[str, Any]) -> None:
    root, a, b = tree["root"]["id"], tree["a"]["id"], tree["b"]["id"]
    got = {
        name: client.get(f"/api/v1/sessions/{tree[name]['id']}").json() for name in ("root", "a", "b", "c")
    }
    assert got["root"]["forkedFrom"] is None
    assert got["root"]["rootId"] == root
    assert got["a"]["forkedFrom"]["session"] == root
    assert got["a"]["rootId"] == root
    assert got["b"]["forkedFrom"] == {"session": a, "outOffset": _offset(3), "inOffset": _offset(0)}
    assert got["b"]["rootId"] == root
    assert got["c"]["forkedFrom"]["session"] == root
    assert got["c"]["rootId"] == root
    # b reads through two forks: the root's records, then a's.
    _append(client, b, "out", "b3")
    assert _read(client, b, "out") == ["r0", "r1", "a2", "b3"]
    assert _read(client, tree["c"]["id"], "out") == ["r0"]


def _check_lineage_lists(c: httpx.Client, tree: dict[str, Any], source: str) -> None:
    ids = {name: tree[name]["id"] for name in ("root", "a", "b", "c")}

    def listed(**filters: str) -> set[str]:
        params = {"filter[type]": tree["type"], "minLsn": tree["lsn"], **filters}
        response = c.get("/api/v1/sessions", params=params)
        assert response.status_code == 200, response.text
        assert response.headers["threadline-list-source"] == source
        return {s["id"] for s in response.json()["data"]}

    def counted(**filters: str) -> int:
        params = {"filter[type]": tree["type"], "minLsn": tree["lsn"], **filters}
        response = c.get("/api/v1/sessions/count", params=params)
        assert response.status_code == 200, response.text
        assert response.headers["threadline-list-source"] == source
        count: int = response.json()["count"]
        return count

    everything = set(ids.values())
    eventually(lambda: listed() == everything)
    assert listed(**{"filter[rootId]": ids["root"]}) == everything
    assert counted(**{"filter[rootId]": ids["root"]}) == 4
    assert listed(**{"filter[rootId]": ids["a"]}) == set()  # a is not a root
    assert listed(**{"filter[forkedFrom]": ids["root"]}) == {ids["a"], ids["c"]}
    assert counted(**{"filter[forkedFrom]": ids["root"]}) == 2
    assert listed(**{"filter[forkedFrom]": f"{ids['a']},{ids['c']}"}) == {ids["b"]}
    assert listed(**{"filter[forkedFrom]": ids["b"]}) == set()
    assert counted(**{"filter[forkedFrom]": ids["b"]}) == 0
    page = c.get("/api/v1/sessions", params={"filter[forkedFrom]": ids["a"], "minLsn": tree["lsn"]})
    assert [s["forkedFrom"]["session"] for s in page.json()["data"]] == [ids["a"]]
    assert [s["rootId"] for s in page.json()["data"]] == [ids["root"]]


@pytest.fixture(scope="module")
def source_servers(stack: StackEndpoints) -> Iterator[dict[str, str]]:
    with (
        ServerThread(settings_for(stack, list_source="clickhouse")) as clickhouse,
        ServerThread(settings_for(stack, list_source="postgres")) as postgres,
    ):
        yield {"clickhouse": clickhouse, "postgres": postgres}


@pytest.mark.parametrize("source", ["clickhouse", "postgres"])
def test_lineage_filters_in_list_and_count(
    source: str, source_servers: dict[str, str], tenant: Tenant, tree: dict[str, Any]
) -> None:
    with httpx.Client(base_url=source_servers[source], headers=bearer(tenant.key), timeout=30) as c:
        _check_lineage_lists(c, tree, source)


def test_lineage_columns_replicate_to_clickhouse(stack: StackEndpoints, tree: dict[str, Any]) -> None:
    from tests.conftest import clickhouse_rows

    def rows() -> dict[str, tuple[Any, ...]]:
        found = clickhouse_rows(
            stack,
            "SELECT session_id, forked_from, fork_out_offset, fork_in_offset, root_id FROM sessions_v1 FINAL"
            " WHERE type = {kind:String}",
            kind=tree["type"],
        )
        return {row[0]: row[1:] for row in found}

    mirrored = eventually(lambda: (found := rows()) and len(found) == 4 and found)
    assert mirrored[tree["root"]["id"]] == ("", None, None, "")
    assert mirrored[tree["a"]["id"]] == (tree["root"]["id"], 2, 0, tree["root"]["id"])
    assert mirrored[tree["b"]["id"]] == (tree["a"]["id"], 3, 0, tree["root"]["id"])


# --- trim ---------------------------------------------------------------------------------------


def test_trimming_the_parent_keeps_what_a_live_fork_reads(
    client: httpx.Client, db: Callable[..., Any]
) -> None:
    parent = _create(client)
    _append(client, parent["id"], "out", *range(10))
    _append(client, parent["id"], "in", "i0", "i1")
    fork = _fork(client, parent["id"], outOffset=_offset(5), inOffset=_offset(2))
    _append(client, fork["id"], "out", "own")

    for io, before in (("out", 8), ("in", 2)):
        trimmed = client.post(
            "/api/v1/streams/trim",
            json={"stream": f"sessions/{parent['id']}/{io}", "before": _offset(before)},
        )
        assert trimmed.status_code == 200, trimmed.text
    assert _read(client, parent["id"], "out") == [8, 9]
    assert _read(client, parent["id"], "in") == []
    # The fork keeps the history it shares with its parent, on both channels and through SSE.
    assert _read(client, fork["id"], "out") == [0, 1, 2, 3, 4, "own"]
    assert _read(client, fork["id"], "in") == ["i0", "i1"]
    assert [value for _, value in _sse(client, fork["id"], "out")] == [0, 1, 2, 3, 4, "own"]
    # The parent's index keeps the chunks below the fork point; those between it and the trim go.
    starts = [
        row["start_offset"]
        for row in db(
            "fetch",
            """SELECT c.start_offset FROM stream_chunks c JOIN streams s ON s.id = c.stream_id
               WHERE s.session_id = $1 AND s.io = 'out' ORDER BY 1""",
            parent["id"],
        )
    ]
    assert starts == [0, 1, 2, 3, 4, 8, 9]
    # A fork made after the trim starts at the trim point, and cannot fork below it.
    late = _fork(client, parent["id"], outOffset=_offset(9))
    assert _read(client, late["id"], "out") == [8]
    error = assert_error(
        client.post(f"/api/v1/sessions/{parent['id']}/fork", json={"outOffset": _offset(7)}),
        400,
        "invalid_fork_offset",
    )
    assert error["details"]["channel"] == "out"
    assert error["details"]["trimOffset"] == _offset(8)


# --- scopes -------------------------------------------------------------------------------------


def test_forking_needs_environment_wide_write(
    client: httpx.Client, anon: httpx.Client, db: Callable[..., Any], tenant: Tenant, other_tenant: Tenant
) -> None:
    parent = _create(client)
    path = f"/api/v1/sessions/{parent['id']}/fork"
    secret: str = db(
        "fetchval", "SELECT signing_secret FROM environments WHERE id = $1", tenant.environment_id
    )

    def session_token(scopes: list[str]) -> str:
        minted = client.post(f"/api/v1/sessions/{parent['id']}/tokens", json={"scopes": scopes})
        assert minted.status_code == 201, minted.text
        token: str = minted.json()["token"]
        return token

    # A session token cannot fork, even with write on the parent: a fork creates a session, as
    # create does, and the caller must be able to use it.
    for scopes in (["read", "write"], ["read"]):
        assert_error(anon.post(path, json={}, headers=bearer(session_token(scopes))), 403, "forbidden")
    env = tenant.environment_id
    read_only = make_jwt(secret, env, ["read:sessions"])
    assert_error(anon.post(path, json={}, headers=bearer(read_only)), 403, "forbidden")
    writer = make_jwt(secret, env, ["write:sessions", "read:sessions"])
    forked = anon.post(path, json={}, headers=bearer(writer))
    assert forked.status_code == 201, forked.text
    # ... and the caller can use what it got.
    fork_id = forked.json()["id"]
    appended = anon.post(
        f"/v1/stream/sessions/{fork_id}/out", content=b'"hi"', headers={**JSON, **bearer(writer)}
    )
    assert appended.status_code == 204, appended.text
    # Another environment's session is a 404, never a 403.
    assert_error(
        anon.post(path, json={}, headers=bearer(other_tenant.key)),
        404,
        "session_not_found",
    )
    assert_error(anon.post(path, json={}), 401, "unauthorized")


# --- validation, idempotency, atomicity ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"outOffset": "soon"}, "invalid_offset"),
        ({"inOffset": 5}, "validation_error"),
        ({"outOffset": _offset(99)}, "invalid_fork_offset"),
        ({"inOffset": "0000000000000001_0000000000000000"}, "offset_out_of_range"),
        ({"outOffset": _offset(0), "colour": "red"}, "validation_error"),
        ({"tags": "x"}, "validation_error"),
        ({"type": ""}, "validation_error"),
        ({"externalId": "session_x"}, "validation_error"),
        ({"metadata": [1]}, "validation_error"),
    ],
)
def test_bad_offsets_and_bodies_are_400_and_create_nothing(
    client: httpx.Client, body: dict[str, Any], code: str
) -> None:
    parent = _create(client)
    _append(client, parent["id"], "out", 1)
    external_id = _unique("bad")
    sent = {"externalId": external_id, **body} if "externalId" not in body else body
    assert_error(client.post(f"/api/v1/sessions/{parent['id']}/fork", json=sent), 400, code)
    if "externalId" not in body:
        assert_error(client.get(f"/api/v1/sessions/{external_id}"), 404, "session_not_found")


def test_not_json_and_unknown_parents(client: httpx.Client) -> None:
    parent = _create(client)
    assert_error(
        client.post(f"/api/v1/sessions/{parent['id']}/fork", content=b"{", headers=JSON), 400, "invalid_json"
    )
    assert_error(client.post("/api/v1/sessions/session_nope/fork", json={}), 404, "session_not_found")


def test_a_fork_with_an_external_id_is_idempotent(client: httpx.Client) -> None:
    parent = _create(client)
    _append(client, parent["id"], "out", 1, 2)
    external_id = _unique("branch")
    first = _fork(client, parent["id"], externalId=external_id, outOffset=_offset(1))
    again = _fork(client, parent["id"], 200, externalId=external_id, outOffset=_offset(1))
    assert again["id"] == first["id"]
    assert _fork(client, parent["id"], 200, externalId=external_id)["id"] == first["id"]  # tails: any
    # Other offsets, another parent, or a session that is no fork: a conflict.
    for source, body in (
        (parent["id"], {"outOffset": _offset(2)}),
        (_create(client)["id"], {}),
    ):
        error = assert_error(
            client.post(f"/api/v1/sessions/{source}/fork", json={"externalId": external_id, **body}),
            409,
            "external_id_conflict",
        )
        assert error["details"] == {"sessionId": first["id"]}
    plain = _create(client, externalId=_unique("plain"))
    assert_error(
        client.post(f"/api/v1/sessions/{parent['id']}/fork", json={"externalId": plain["externalId"]}),
        409,
        "external_id_conflict",
    )


def test_a_failed_channel_fork_leaves_no_session(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session row and its channel forks commit together or not at all."""
    from threadline.streams import channels

    async def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected: the channel forks cannot be created")

    parent = _create(client)
    external_id = _unique("atomic")
    monkeypatch.setattr(channels, "fork_channels", fail)  # the test server runs in this process
    # Connection: close: after an unhandled error the server drops the connection it came on.
    response = client.post(
        f"/api/v1/sessions/{parent['id']}/fork",
        json={"externalId": external_id},
        headers={"Connection": "close"},
    )
    assert_error(response, 500, "internal_error")
    monkeypatch.undo()
    assert_error(client.get(f"/api/v1/sessions/{external_id}"), 404, "session_not_found")
    assert _fork(client, parent["id"], externalId=external_id)["externalId"] == external_id
