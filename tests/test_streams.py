"""Channels on object storage: group commit, limits, session channels, live fan-out, faults.

Everything runs against the real embedded stack; the fault tests stop the real S3 server and
SIGKILL a real ``threadline serve`` process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ServeProcess, ServerThread, Tenant, assert_error, bearer, eventually
from tests.conftest import read_json_stream as _read_all
from threadline.config import Settings
from threadline.embedded.stack import EmbeddedStack, StackEndpoints

JSON = {"Content-Type": "application/json"}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_concurrent_appends_to_many_streams_share_objects(
    client: httpx.Client, db: Callable[..., Any]
) -> None:
    streams = [f"/v1/stream/{_name('group')}" for _ in range(20)]
    for path in streams:
        assert client.put(path, headers=JSON).status_code == 201
    objects_before = db("fetchval", "SELECT count(*) FROM stream_objects")

    def append(index: int) -> None:
        path = streams[index % len(streams)]
        with httpx.Client(base_url=client.base_url, headers=client.headers, timeout=30) as own:
            response = own.post(path, headers=JSON, content=json.dumps({"n": index}))
            assert response.status_code == 204, response.text

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(append, range(400)))

    objects = db("fetchval", "SELECT count(*) FROM stream_objects") - objects_before
    shared = db(
        "fetchval",
        """SELECT max(n) FROM (SELECT count(DISTINCT c.stream_id) AS n FROM stream_chunks c
           JOIN streams s ON s.id = c.stream_id WHERE s.name = ANY($1::text[]) GROUP BY c.object_id) t""",
        [path.removeprefix("/v1/stream/") for path in streams],
    )
    assert objects < 400, f"{objects} objects for 400 appends: no group commit"
    assert shared >= 2, "no object holds more than one stream's records"
    for index, path in enumerate(streams):
        values = [value["n"] for value in _read_all(client, path)]
        assert sorted(values) == list(range(index, 400, len(streams))), path
        assert len(values) == len(set(values))


def test_record_and_batch_limits_reject_without_appending(client: httpx.Client) -> None:
    path = f"/v1/stream/{_name('limits')}"
    assert client.put(path, headers={"Content-Type": "application/octet-stream"}).status_code == 201
    too_big = client.post(
        path, headers={"Content-Type": "application/octet-stream"}, content=b"x" * (1024 * 1024 + 1)
    )
    assert_error(too_big, 413, "record_too_large")
    json_path = f"/v1/stream/{_name('limits-json')}"
    assert client.put(json_path, headers=JSON).status_code == 201
    assert_error(
        client.post(json_path, headers=JSON, content=json.dumps(list(range(1001)))), 413, "batch_too_large"
    )
    assert_error(client.post(json_path, headers=JSON, content=b"{nope"), 400, "invalid_json")
    for target in (path, json_path):
        head = client.head(target)
        assert head.headers["Stream-Next-Offset"] == "0000000000000000_0000000000000000"
    exactly = client.post(json_path, headers=JSON, content=json.dumps(list(range(1000))))
    assert exactly.status_code == 204
    assert _read_all(client, json_path) == list(range(1000))


def _create_session(client: httpx.Client) -> dict[str, Any]:
    response = client.post("/api/v1/sessions", json={"type": "chat"})
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


def _token(client: httpx.Client, session_id: str) -> str:
    response = client.post(f"/api/v1/sessions/{session_id}/tokens", json={})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def test_session_channels_follow_session_scopes_stats_and_close(
    client: httpx.Client, anon: httpx.Client, db: Callable[..., Any]
) -> None:
    session = _create_session(client)
    other = _create_session(client)
    token = _token(client, session["id"])
    out = f"/v1/stream/sessions/{session['id']}/out"

    described = anon.put(out, headers={**bearer(token), **JSON})
    assert described.status_code == 200
    appended = anon.post(out, headers={**bearer(token), **JSON}, content=json.dumps([{"t": "a"}, {"t": "b"}]))
    assert appended.status_code == 204, appended.text
    assert appended.headers["Stream-Next-Offset"] == "0000000000000000_0000000000000002"
    # A session token reads with ?token= (EventSource cannot send headers) ...
    read = anon.get(out, params={"offset": "-1", "token": token})
    assert read.json() == [{"t": "a"}, {"t": "b"}]
    # ... and touches nothing else.
    assert_error(
        anon.post(f"/v1/stream/sessions/{other['id']}/out", headers={**bearer(token), **JSON}, content=b"1"),
        403,
    )
    assert_error(anon.put(f"/v1/stream/{_name('standalone')}", headers=bearer(token)), 403)
    assert_error(client.delete(out), 409, "session_channel")

    fetched = client.get(f"/api/v1/sessions/{session['id']}").json()
    assert fetched["channels"]["out"]["records"] == 2
    assert fetched["channels"]["out"]["tailOffset"] == "0000000000000000_0000000000000002"
    assert fetched["channels"]["in"]["records"] == 0
    eventually(
        lambda: (
            client.get(f"/api/v1/sessions/{session['id']}").json()["lastActiveAt"] > session["lastActiveAt"]
        )
    )

    closed = client.post(f"/api/v1/sessions/{session['id']}/close", json={"reason": "done"})
    assert closed.status_code == 200
    rejected = anon.post(out, headers={**bearer(token), **JSON}, content=b"{}")
    assert_error(rejected, 409, "stream_closed")
    assert rejected.headers["Stream-Closed"] == "true"
    tail = anon.get(out, params={"offset": "now", "token": token})
    assert tail.headers["Stream-Closed"] == "true"
    after = client.get(f"/api/v1/sessions/{session['id']}").json()
    assert after["channels"]["out"]["closed"] is True
    assert after["channels"]["in"]["closed"] is True
    assert after["channels"]["out"]["records"] == 2


def _sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    event, data = "", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:])
        elif line == "" and event:
            yield event, "\n".join(data)
            event, data = "", []


def test_subscriber_on_another_instance_receives_appends(
    settings: Settings, base_url: str, tenant: Tenant
) -> None:
    path = f"/v1/stream/{_name('fanout')}"
    headers = bearer(tenant.key)
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as a:
        created = a.put(path, headers=JSON)
        assert created.status_code == 201
        start = created.headers["Stream-Next-Offset"]
        with ServerThread(settings) as other_url:
            received: list[Any] = []
            ready = threading.Event()

            def subscribe() -> None:
                with (
                    httpx.Client(base_url=other_url, headers=headers, timeout=30) as b,
                    b.stream("GET", path, params={"offset": start, "live": "sse"}) as response,
                ):
                    assert response.status_code == 200
                    for event, data in _sse_events(response):
                        if event == "control":
                            ready.set()
                        if event == "data":
                            received.extend(json.loads(data))
                            if len(received) >= 3:
                                return

            thread = threading.Thread(target=subscribe, daemon=True)
            thread.start()
            assert ready.wait(10), "subscriber never got its first control event"
            for n in range(3):
                assert a.post(path, headers=JSON, content=json.dumps({"n": n})).status_code == 204
            thread.join(15)
            assert received == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_appends_follow_a_name_deleted_and_recreated_on_another_instance(
    settings: Settings, base_url: str, tenant: Tenant
) -> None:
    """Instance A remembers where a name's appends go; B deletes the stream and creates a new
    one of another content type under the same name. A must append to the new stream, refuse
    the old content type, and answer 404 once the name is gone, as if it had never cached it."""
    path = f"/v1/stream/{_name('renamed')}"
    text = {"Content-Type": "text/plain"}
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=30) as a:
        assert a.put(path, headers=JSON).status_code == 201
        for n in range(2):
            assert a.post(path, headers=JSON, content=json.dumps({"n": n})).status_code == 204
        with (
            ServerThread(settings) as other_url,
            httpx.Client(base_url=other_url, headers=bearer(tenant.key), timeout=30) as b,
        ):
            assert b.delete(path).status_code == 204
            assert b.put(path, headers=text).status_code == 201
            assert a.post(path, headers=text, content=b"hello").status_code == 204
            assert_error(a.post(path, headers=JSON, content=b"{}"), 409, "content_type_mismatch")
            read = a.get(path, params={"offset": "-1"})
            assert read.status_code == 200
            assert read.headers["Content-Type"].startswith("text/plain")
            assert read.content == b"hello"
            assert b.delete(path).status_code == 204
            assert_error(a.post(path, headers=text, content=b"late"), 404, "stream_not_found")


def test_a_reader_that_never_reads_does_not_slow_the_writer(base_url: str, tenant: Tenant) -> None:
    import socket

    path = f"/v1/stream/{_name('slow-reader')}"
    with httpx.Client(base_url=base_url, headers=bearer(tenant.key), timeout=30) as client:
        assert client.put(path, headers={"Content-Type": "application/octet-stream"}).status_code == 201
        host, port = base_url.removeprefix("http://").split(":")
        stuck = socket.create_connection((host, int(port)))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(
            f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {tenant.key}\r\n\r\n".encode()
        )
        try:
            # 32 MiB through a reader that takes nothing: far beyond every socket buffer.
            record = b"r" * (256 * 1024)
            for _ in range(128):
                response = client.post(
                    path, headers={"Content-Type": "application/octet-stream"}, content=record
                )
                assert response.status_code == 204
            # No timing assertion (shared CI cores): every append acknowledged while the
            # reader's connection stays open and unread is the property.
            tail = client.head(path).headers["Stream-Next-Offset"]
            assert tail.endswith("0000000000000128")
        finally:
            stuck.close()


def test_s3_outage_fails_appends_fast_and_recovers(
    embedded_stack: EmbeddedStack, client: httpx.Client
) -> None:
    path = f"/v1/stream/{_name('s3-outage')}"
    assert client.put(path, headers=JSON).status_code == 201
    assert client.post(path, headers=JSON, content=b'"before"').status_code == 204
    embedded_stack.stop_service("s3")
    try:
        started = time.monotonic()
        failed = client.post(path, headers=JSON, content=b'"during"')
        assert_error(failed, 503, "storage_unavailable")
        assert time.monotonic() - started < 15
        assert client.head(path).headers["Stream-Next-Offset"].endswith("0000000000000001")
    finally:
        embedded_stack.start_service("s3")
    eventually(lambda: client.post(path, headers=JSON, content=b'"after"').status_code == 204, timeout=60)
    assert _read_all(client, path) == ["before", "after"]


@pytest.mark.slow
def test_kill_9_during_appends_loses_and_duplicates_nothing(
    stack: StackEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    """Producers append at full speed with Producer-Id; the server is SIGKILLed mid-run and
    restarted on the same port; producers retry whatever was not acknowledged. Every
    acknowledged record must be there exactly once, in order, and retries must not duplicate."""
    server = ServeProcess(stack, tmp_path / "serve-1.log", workers=2)
    port = server.port
    headers = {**bearer(tenant.key), **JSON}
    streams = [f"/v1/stream/{_name('crash')}" for _ in range(4)]
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as setup:
        for path in streams:
            assert setup.put(path).status_code == 201
    per_producer = 150
    acked: dict[str, list[int]] = {path: [] for path in streams}

    def produce(path: str) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as own:
            seq = 0
            while seq < per_producer:
                producer = {"Producer-Id": f"p-{path}", "Producer-Epoch": "0", "Producer-Seq": str(seq)}
                try:
                    response = own.post(path, headers=producer, content=json.dumps({"seq": seq}))
                except httpx.TransportError:
                    time.sleep(0.1)  # server down: retry the same seq
                    continue
                if response.status_code in (200, 204):
                    acked[path].append(seq)
                    seq += 1
                elif response.status_code == 503:
                    time.sleep(0.1)
                else:
                    raise AssertionError(f"{response.status_code} {response.text}")

    threads = [threading.Thread(target=produce, args=(path,), daemon=True) for path in streams]
    for thread in threads:
        thread.start()
    eventually(lambda: sum(len(v) for v in acked.values()) >= 100, timeout=60, interval=0.01)
    server.kill()
    acked_before_kill = {path: len(values) for path, values in acked.items()}
    restarted = ServeProcess(stack, tmp_path / "serve-2.log", port=port, workers=2)
    try:
        for thread in threads:
            thread.join(120)
            assert not thread.is_alive()
        with httpx.Client(base_url=restarted.url, headers=headers, timeout=10) as reader:
            for path in streams:
                values = [value["seq"] for value in _read_all(reader, path)]
                assert values == list(range(per_producer)), f"{path}: {values[:20]}…"
                assert acked[path] == list(range(per_producer))
        assert all(count < per_producer for count in acked_before_kill.values()), "kill came too late"
    finally:
        restarted.stop()


def test_a_fork_made_while_its_source_is_being_trimmed_waits_for_the_trim(
    client: httpx.Client, settings: Settings
) -> None:
    """A trim and a fork of the same stream serialise on the source row: a fork below the new trim
    point is refused, never created over history the trim is about to delete."""
    name = f"fork-trim-{uuid.uuid4().hex[:8]}"
    text = {"Content-Type": "text/plain"}
    assert client.put(f"/v1/stream/{name}", headers=text).status_code == 201
    for n in range(10):
        assert client.post(f"/v1/stream/{name}", content=f"{n};".encode(), headers=text).status_code == 204

    async def race() -> httpx.Response:
        trim = await asyncpg.connect(settings.database_url)
        watch = await asyncpg.connect(settings.database_url)
        try:
            # A trim in progress: its transaction holds the source row, as trim_stream's does.
            transaction = trim.transaction()
            await transaction.start()
            await trim.execute(
                "UPDATE streams SET trim_offset = 6 WHERE name = $1 AND deleted_at IS NULL", name
            )
            fork = asyncio.create_task(
                asyncio.to_thread(
                    client.put,
                    f"/v1/stream/{name}-fork",
                    headers={
                        **text,
                        "Stream-Forked-From": f"/v1/stream/{name}",
                        "Stream-Fork-Offset": "0000000000000000_0000000000000003",
                    },
                )
            )
            for _ in range(600):  # the fork's transaction must be waiting for the trim's lock
                waiting = await watch.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                if waiting or fork.done():
                    break
                await asyncio.sleep(0.05)
            assert not fork.done(), "the fork did not wait for the trim holding its source"
            await transaction.commit()
            return await fork
        finally:
            await trim.close()
            await watch.close()

    answer = asyncio.run(race())
    assert_error(answer, 400, "invalid_fork_offset")
    assert client.head(f"/v1/stream/{name}-fork").status_code == 404


def _upload_then_read(base_url: str, token: str, path: str, body: bytes) -> bytes:
    """What fetch does: write the whole request, then read the answer (raw socket, no retries)."""
    url = httpx.URL(base_url)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port), timeout=60) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_a_body_over_the_request_limit_is_a_413_the_client_can_read(
    client: httpx.Client, base_url: str, tenant: Tenant
) -> None:
    """A client that uploads all of an oversized body before reading (fetch in the conformance
    suite does) reads the 413 and its JSON, three times on fresh connections, and a streamed
    body without Content-Length is refused the same way; nothing is appended. (Loopback here
    did not reproduce the reset seen under load before the server drained such bodies, so
    this guards the answer, not that race.)"""
    path = f"/v1/stream/{_name('oversized')}"
    assert client.put(path, headers={"Content-Type": "application/octet-stream"}).status_code == 201
    body = b"x" * (10 * 1024 * 1024)  # over the 4 MiB request limit, under the discard bound
    for _ in range(3):
        answer = _upload_then_read(base_url, tenant.key, path, body)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b'"payload_too_large"' in answer

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    streamed = client.post(path, headers={"Content-Type": "application/octet-stream"}, content=chunks())
    assert_error(streamed, 413, "payload_too_large")
    assert client.head(path).headers["Stream-Next-Offset"] == "0000000000000000_0000000000000000"
