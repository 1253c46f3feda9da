"""Bad input is a 400 (or the precise 4xx) with a JSON error body, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant, assert_error, bearer

JSON = {"Content-Type": "application/json"}


def _count(db: Callable[..., Any]) -> int:
    """Sessions in Postgres (the truth; a count from ClickHouse may lag behind earlier tests)."""
    count: int = db("fetchval", "SELECT count(*) FROM sessions")
    return count


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "chat\\u0000"}',
        b'{"type": "chat", "externalId": "a\\u0000b"}',
        b'{"type": "chat", "taskIdentifier": "\\u0000"}',
        b'{"type": "chat", "tags": ["ok", "b\\u0000d"]}',
        b'{"type": "chat", "metadata": {"note": "nul \\u0000 inside"}}',
        b'{"type": "chat", "metadata": {"k\\u0000": 1}}',
        b'{"type": "chat", "metadata": {"deep": [{"x": "\\u0000"}]}}',
    ],
)
def test_nul_in_any_field_is_a_400_and_creates_nothing(
    client: httpx.Client, db: Callable[..., Any], body: bytes
) -> None:
    before = _count(db)
    error = assert_error(client.post("/api/v1/sessions", content=body, headers=JSON), 400, "validation_error")
    assert "NUL" in error["message"]
    assert _count(db) == before


def test_nul_in_a_patch_or_close_reason_is_a_400(client: httpx.Client) -> None:
    session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
    url = f"/api/v1/sessions/{session['id']}"
    assert_error(client.patch(url, content=b'{"metadata": {"a": "\\u0000"}}', headers=JSON), 400)
    assert_error(client.post(f"{url}/close", content=b'{"reason": "x\\u0000"}', headers=JSON), 400)
    assert client.get(url).json()["status"] == "ACTIVE"
    assert client.get(url).json()["metadata"] == {}


def test_nul_in_query_and_path_values_is_a_4xx_not_a_500(client: httpx.Client) -> None:
    assert_error(client.get("/api/v1/sessions", params={"filter[type]": "a\x00b"}), 400, "validation_error")
    assert_error(client.get("/api/v1/sessions/count", params={"filter[tags]": "\x00"}), 400)
    assert_error(client.get("/api/v1/sessions/a%00b"), 404, "session_not_found")
    assert_error(client.get("/v1/stream/a%00b", params={"offset": "-1"}), 400, "invalid_stream_name")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"type": "chat", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, "invalid_json"),
        (b'{"type": "chat", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "invalid_json"),
        (b'{"type": "chat", "metadata": {"n": 1' + b"0" * 30 + b"}}", "validation_error"),
        (b'{"type": "chat", "metadata": {"n": 1' + b"0" * 5000 + b"}}", "invalid_json"),
        (b'{"type": "chat", "metadata": {"n": NaN}}', "invalid_json"),
        (b'{"type": "chat", "metadata": {"n": Infinity}}', "invalid_json"),
    ],
)
def test_json_depth_and_number_limits_are_400s(
    client: httpx.Client, db: Callable[..., Any], body: bytes, code: str
) -> None:
    before = _count(db)
    assert_error(client.post("/api/v1/sessions", content=body, headers=JSON), 400, code)
    assert _count(db) == before


def test_an_external_id_with_a_slash_is_refused(client: httpx.Client) -> None:
    error = assert_error(client.post("/api/v1/sessions", json={"type": "chat", "externalId": "a/b"}), 400)
    assert "externalId" in str(error["details"])
    session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
    assert_error(client.patch(f"/api/v1/sessions/{session['id']}", json={"externalId": "c/d"}), 400)


def test_a_secret_key_is_never_accepted_in_the_url(
    anon: httpx.Client, client: httpx.Client, tenant: Tenant
) -> None:
    session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
    url = f"/realtime/v1/sessions/{session['id']}/out"
    error = assert_error(
        anon.get(url, params={"token": tenant.key, "timeoutSeconds": "1"}), 401, "unauthorized"
    )
    assert "URL" in error["message"]
    stream = f"/v1/stream/sessions/{session['id']}/out"
    assert_error(anon.get(stream, params={"offset": "-1", "token": tenant.key}), 401, "unauthorized")
    # The header still works, and a session token still works in the URL.
    token = client.post(f"/api/v1/sessions/{session['id']}/tokens", json={"scopes": ["read"]}).json()["token"]
    assert anon.get(stream, params={"offset": "-1", "token": token}).status_code == 200


def test_a_session_channel_closes_only_with_its_session(anon: httpx.Client, client: httpx.Client) -> None:
    session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
    token = client.post(f"/api/v1/sessions/{session['id']}/tokens").json()["token"]
    stream = f"/v1/stream/sessions/{session['id']}/in"
    for headers in ({"Stream-Closed": "true"}, {"Stream-Closed": "true", **JSON}):
        response = anon.post(
            stream,
            content=b'"last"' if JSON.items() <= headers.items() else b"",
            headers={**headers, **bearer(token)},
        )
        assert_error(response, 409, "session_channel")
    # Nothing was appended or closed: the channel still takes appends from the backend.
    assert client.get(stream, params={"offset": "-1"}).json() == []
    assert client.post(stream, content=b'"hello"', headers=JSON).status_code == 204
    assert "Stream-Closed" not in client.head(stream).headers


@pytest.mark.parametrize("content_type", ["*/*", "text/*", "0", "text", "text/plain/x", "a b/c"])
def test_a_stream_content_type_that_is_not_a_media_type_is_a_400(
    client: httpx.Client, content_type: str
) -> None:
    """Found by the fuzzer (tests/test_fuzz.py): a PUT with `Content-Type: */*` created a stream
    whose every read then answered `Content-Type: */*`, a type no client can act on."""
    name = "fuzz-found/content-type"
    error = assert_error(
        client.put(f"/v1/stream/{name}", headers={"Content-Type": content_type}), 400, "validation_error"
    )
    assert "media type" in error["message"]
    assert client.head(f"/v1/stream/{name}").status_code == 404


def test_a_stream_of_any_media_type_reads_back_with_it(client: httpx.Client) -> None:
    name = "fuzz-found/image"
    assert (
        client.put(
            f"/v1/stream/{name}", headers={"Content-Type": "image/png"}, content=b"\x89PNG"
        ).status_code
        == 201
    )
    read = client.get(f"/v1/stream/{name}")
    assert read.status_code == 200
    assert read.headers["content-type"] == "image/png"
    assert read.content == b"\x89PNG"


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["a%0Ab", "abc%0A", "%0A", "a/b%0D%0A"])
def test_a_line_break_in_a_stream_name_is_invalid_stream_name(
    client: httpx.Client, method: str, path: str
) -> None:
    """Found by the fuzzer (tests/test_fuzz.py, make fuzz): `GET /v1/stream/%0A...` matched no
    route and answered 404 route_not_found, a code the document does not list for the route."""
    response = client.request(method, f"/v1/stream/{path}")
    assert response.status_code == 400, response.text
    if method != "HEAD":
        assert response.json()["error"]["code"] == "invalid_stream_name"
