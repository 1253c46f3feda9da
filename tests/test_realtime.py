"""Session-flavoured channel routes (``/realtime/v1/sessions/{session}/{io}``) against a live server.

Events are parsed with httpx-sse, a client-side SSE parser that follows the HTML spec's rules for
``id:``/``event:``/``retry:``, so what passes here is what a browser EventSource would see.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse

from tests.conftest import assert_error, bearer

JSON = {"Content-Type": "application/json"}
START = "0000000000000000_0000000000000000"


def _offset(position: int) -> str:
    return f"0000000000000000_{position:016d}"


def _session(client: httpx.Client) -> dict[str, Any]:
    response = client.post("/api/v1/sessions", json={"type": "chat"})
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


def _token(client: httpx.Client, session_id: str, scopes: list[str] | None = None) -> str:
    response = client.post(
        f"/api/v1/sessions/{session_id}/tokens", json={"scopes": scopes or ["read", "write"]}
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def _append(client: httpx.Client, url: str, value: Any, **headers: str) -> dict[str, Any]:
    response = client.post(url, content=json.dumps(value), headers={**JSON, **headers})
    assert response.status_code == 200, response.text
    ack: dict[str, Any] = response.json()
    return ack


def _events(client: httpx.Client, url: str, **kwargs: Any) -> list[ServerSentEvent]:
    """Every event of one SSE response, read until the server ends it."""
    headers = {"Timeout-Seconds": "1", **kwargs.pop("headers", {})}
    with connect_sse(client, "GET", url, headers=headers, **kwargs) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return _dispatched(source.iter_sse())


def _dispatched(events: Any) -> list[ServerSentEvent]:
    # httpx-sse also yields blocks without data (our ``retry:`` hint); a browser does not
    # dispatch those (HTML spec: an empty data buffer dispatches nothing), so neither do we.
    return [event for event in events if event.data]


def _records(events: list[ServerSentEvent]) -> list[tuple[str, Any]]:
    return [(event.id, json.loads(event.data)) for event in events if event.event == "message"]


def test_describe_append_subscribe_and_resume_by_last_event_id(client: httpx.Client) -> None:
    session = _session(client)
    url = f"/realtime/v1/sessions/{session['id']}/out"

    described = client.put(url)
    assert described.status_code == 200, described.text
    body = described.json()
    assert body["sessionId"] == session["id"]
    assert body["io"] == "out"
    assert body["tailOffset"] == START
    assert body["records"] == 0
    assert body["closed"] is False
    assert body["urls"]["append"].endswith(f"{url}/append")
    assert body["urls"]["stream"].endswith(f"/v1/stream/sessions/{session['id']}/out")

    first = _append(client, f"{url}/append", {"type": "token", "text": "Hel"})
    assert (first["offset"], first["nextOffset"], first["records"]) == (START, _offset(1), 1)
    batch = _append(client, f"{url}/append", [{"type": "token", "text": "lo"}, {"text": "multi\nline"}, 3])
    assert (batch["offset"], batch["nextOffset"], batch["records"]) == (_offset(1), _offset(4), 3)

    records = _records(_events(client, url, params={"offset": "-1"}))
    assert records == [
        (_offset(1), {"type": "token", "text": "Hel"}),
        (_offset(2), {"type": "token", "text": "lo"}),
        (_offset(3), {"text": "multi\nline"}),
        (_offset(4), 3),
    ]
    # A reconnecting EventSource sends the last id it saw: the rest follows, nothing repeats.
    resumed = _records(_events(client, url, headers={"Last-Event-ID": _offset(2)}))
    assert [value for _, value in resumed] == [{"text": "multi\nline"}, 3]
    # Last-Event-ID wins over ?offset= (the browser keeps the original URL when it reconnects).
    assert (
        _records(_events(client, url, params={"offset": "-1"}, headers={"Last-Event-ID": _offset(4)})) == []
    )
    assert _records(_events(client, url, params={"offset": "now"})) == []

    again = client.put(url).json()
    assert (again["records"], again["tailOffset"]) == (4, _offset(4))
    # The same records through the Durable Streams route.
    read = client.get(f"/v1/stream/sessions/{session['id']}/out", params={"offset": "-1"})
    assert read.json() == [
        {"type": "token", "text": "Hel"},
        {"type": "token", "text": "lo"},
        {"text": "multi\nline"},
        3,
    ]


def test_live_subscriber_with_query_token_receives_appends_then_closed(
    client: httpx.Client, anon: httpx.Client
) -> None:
    session = _session(client)
    token = _token(client, session["id"], ["read"])
    url = f"/realtime/v1/sessions/{session['id']}/out"
    received: list[ServerSentEvent] = []
    connected = threading.Event()

    def subscribe() -> None:
        # The EventSource way: credentials and timeout in the query, no custom headers.
        with connect_sse(
            anon, "GET", url, params={"offset": "now", "token": token, "timeoutSeconds": "30"}
        ) as source:
            assert source.response.status_code == 200
            connected.set()
            received.extend(_dispatched(source.iter_sse()))

    thread = threading.Thread(target=subscribe, daemon=True)
    thread.start()
    assert connected.wait(10)
    for n in range(3):
        _append(client, f"{url}/append", {"n": n})
    closed = client.post(f"/api/v1/sessions/{session['id']}/close", json={"reason": "done"})
    assert closed.status_code == 200, closed.text
    thread.join(20)
    assert not thread.is_alive(), "the stream did not end after the session closed"

    assert _records(received) == [(_offset(n + 1), {"n": n}) for n in range(3)]
    assert received[-1].event == "closed"
    assert json.loads(received[-1].data) == {"nextOffset": _offset(3)}
    # Reconnecting at the end of a closed channel: 204 tells EventSource to stop retrying.
    ended = anon.get(url, params={"token": token}, headers={"Last-Event-ID": _offset(3)})
    assert ended.status_code == 204
    # Reading a closed channel from the start still replays it, then says closed.
    replay = _events(anon, url, params={"offset": "-1", "token": token})
    assert [event.event for event in replay] == ["message", "message", "message", "closed"]


def test_appends_after_close_are_refused_on_every_write_path(
    client: httpx.Client, anon: httpx.Client
) -> None:
    session = _session(client)
    token = _token(client, session["id"])
    for io in ("out", "in"):
        _append(anon, f"/realtime/v1/sessions/{session['id']}/{io}/append", {"io": io}, **bearer(token))
    assert client.post(f"/api/v1/sessions/{session['id']}/close", json={}).status_code == 200

    for io in ("out", "in"):
        realtime = f"/realtime/v1/sessions/{session['id']}/{io}/append"
        assert_error(client.post(realtime, content=b'"late"', headers=JSON), 409, "session_closed")
        assert_error(
            anon.post(realtime, content=b'"late"', headers={**JSON, **bearer(token)}), 409, "session_closed"
        )
        protocol = client.post(f"/v1/stream/sessions/{session['id']}/{io}", content=b'"late"', headers=JSON)
        assert_error(protocol, 409, "stream_closed")
        described = client.put(f"/realtime/v1/sessions/{session['id']}/{io}").json()
        assert (described["closed"], described["records"], described["sessionStatus"]) == (True, 1, "CLOSED")


def test_requests_that_cannot_be_served_get_clear_errors_and_change_nothing(
    client: httpx.Client, anon: httpx.Client
) -> None:
    session = _session(client)
    other = _session(client)
    url = f"/realtime/v1/sessions/{session['id']}/in"
    for timeout in ("0", "601", "1.5", "soon"):
        assert_error(client.get(url, headers={"Timeout-Seconds": timeout}), 400, "invalid_timeout")
    assert_error(client.get(url, params={"timeoutSeconds": "0"}), 400, "invalid_timeout")
    assert_error(client.get(url, headers={"Last-Event-ID": "yesterday"}), 400, "invalid_offset")
    assert_error(client.get(url, params={"offset": _offset(5)}), 400, "offset_out_of_range")
    assert_error(client.put(f"/realtime/v1/sessions/{session['id']}/sideways"), 404, "channel_not_found")
    assert_error(client.put("/realtime/v1/sessions/session_doesnotexist/out"), 404)
    assert_error(anon.put(url), 401)
    assert_error(
        anon.post(f"{url}/append", content=b"1", headers={**JSON, **bearer(_token(client, other["id"]))}), 403
    )
    read_only = _token(client, session["id"], ["read"])
    assert_error(anon.post(f"{url}/append", content=b"1", headers={**JSON, **bearer(read_only)}), 403)
    assert_error(client.post(f"{url}/append", content=b"{nope", headers=JSON), 400, "invalid_json")
    assert_error(client.post(f"{url}/append", content=json.dumps(list(range(1001))), headers=JSON), 413)
    assert_error(client.post(f"{url}/append", content=b"1", headers={"Content-Type": "text/plain"}), 409)
    assert client.put(url).json()["records"] == 0
    # A body without Content-Type is taken as JSON on these routes.
    assert client.post(f"{url}/append", content=b'{"ok": true}').status_code == 200
    assert client.put(url).json()["records"] == 1


def test_producer_retry_returns_the_original_ack(client: httpx.Client) -> None:
    seq_headers = {"Producer-Id": "agent-1", "Producer-Epoch": "0", "Producer-Seq": "0"}
    session = _session(client)
    url = f"/realtime/v1/sessions/{session['id']}/out/append"
    first = _append(client, url, ["a", "b"], **seq_headers)
    retry = _append(client, url, ["a", "b"], **seq_headers)
    assert first["duplicate"] is False
    assert retry["duplicate"] is True
    assert retry["nextOffset"] == first["nextOffset"] == _offset(2)
    assert client.put(f"/realtime/v1/sessions/{session['id']}/out").json()["records"] == 2
