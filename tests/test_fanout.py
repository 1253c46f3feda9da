"""Live fan-out (streams/live.py Waiter and sliced wake-ups, api/sse.py): many subscribers of one
stream each get every record once and in order, however the commits and the wake-up slices
interleave; an idle subscriber gets heartbeats from its one timer and still gets the next record."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ServerThread, StackEndpoints, Tenant, make_tenant, settings_for
from threadline.streams.live import WAKE_SLICE


@pytest.fixture(scope="module")
def fast_heartbeats(stack: StackEndpoints) -> Iterator[tuple[str, Tenant]]:
    """A server of its own whose idle SSE readers get a heartbeat every 0.3 s."""
    settings = settings_for(stack, sse_heartbeat_seconds=0.3)
    with ServerThread(settings) as url:
        yield url, make_tenant(settings, "fanout")


class _Subscriber(asyncio.Protocol):
    """One raw SSE connection: the records of every ``data`` event, and the comments seen."""

    def __init__(self) -> None:
        self.buffer = b""
        self.records: list[int] = []
        self.pings = 0
        self.controls = 0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.controls == 0:
            assert self.buffer.split(b" ", 2)[1] == b"200", self.buffer[:200]
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            # Line by line, like the load generator: the headers and chunk sizes (uvicorn
            # chunks even an HTTP/1.0 response) sit on lines of their own.
            kind, data = b"", []
            for line in event.split(b"\n"):
                line = line.rstrip(b"\r")
                if line == b": ping":
                    self.pings += 1
                elif line.startswith(b"event:"):
                    kind = line[6:].strip()
                elif line.startswith(b"data:"):
                    data.append(line[5:])
            if kind == b"data":
                self.records.extend(record["i"] for record in json.loads(b"\n".join(data)))
            elif kind == b"control":
                self.controls += 1


async def _subscribe(
    url: str, path: str, key: str, count: int
) -> list[tuple[asyncio.Transport, _Subscriber]]:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    request = (
        f"GET {path}?offset=now&live=sse HTTP/1.0\r\nHost: {parts.hostname}\r\n"
        f"Authorization: Bearer {key}\r\n\r\n"
    ).encode()
    subscribers = []
    for _ in range(count):
        transport, protocol = await loop.create_connection(_Subscriber, parts.hostname, parts.port)
        transport.write(request)
        subscribers.append((transport, protocol))
    return subscribers


async def _wait_for(check: Callable[[], bool], state: Callable[[], str]) -> None:
    """``eventually`` for the test's own loop: up to a generous 60 s, then what was seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not check():
        assert loop.time() < deadline, f"timed out waiting: {state()}"
        await asyncio.sleep(0.05)


def _state(subscribers: list[tuple[asyncio.Transport, _Subscriber]]) -> str:
    sample = subscribers[0][1]
    return (
        f"controls {sum(bool(s.controls) for _, s in subscribers)}/{len(subscribers)}, "
        f"records {sorted({len(s.records) for _, s in subscribers})}, first: {sample.records} "
        f"{sample.buffer[:300]!r}"
    )


def test_every_subscriber_gets_every_record_once_in_order(
    fast_heartbeats: tuple[str, Tenant],
) -> None:
    """More subscribers than three wake-up slices, and appends that do not wait for deliveries:
    commits land while earlier slices are still being woken."""
    url, tenant = fast_heartbeats
    path = "/v1/stream/fanout-order"
    headers = {"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/json"}
    assert httpx.put(url + path, headers=headers).status_code == 201
    subscribers_count = WAKE_SLICE * 3 + 7
    appends = 30

    async def go() -> list[_Subscriber]:
        subscribers = await _subscribe(url, path, tenant.key, subscribers_count)
        try:
            await _wait_for(lambda: all(s.controls for _, s in subscribers), lambda: _state(subscribers))
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                for i in range(appends):
                    response = await client.post(path, content=json.dumps({"i": i}))
                    assert response.status_code == 204, response.text
            await _wait_for(
                lambda: all(len(s.records) >= appends for _, s in subscribers), lambda: _state(subscribers)
            )
            await asyncio.sleep(0.5)  # anything extra (a duplicate) would arrive by now
            return [s for _, s in subscribers]
        finally:
            for transport, _ in subscribers:
                transport.close()

    for subscriber in asyncio.run(go()):
        assert subscriber.records == list(range(appends))


def test_an_idle_subscriber_gets_heartbeats_then_the_next_record(fast_heartbeats: tuple[str, Tenant]) -> None:
    url, tenant = fast_heartbeats
    path = "/v1/stream/fanout-idle"
    headers = {"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/json"}
    assert httpx.put(url + path, headers=headers).status_code == 201

    async def go() -> _Subscriber:
        [(transport, subscriber)] = await _subscribe(url, path, tenant.key, 1)
        try:
            state = lambda: _state([(transport, subscriber)])  # noqa: E731
            await _wait_for(lambda: subscriber.pings >= 3, state)
            assert subscriber.records == []
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(url + path, headers=headers, content=json.dumps({"i": 7}))
            assert response.status_code == 204
            await _wait_for(lambda: subscriber.records == [7], state)
            pings = subscriber.pings
            await _wait_for(lambda: subscriber.pings > pings, state)  # idle again: heartbeats resume
            return subscriber
        finally:
            transport.close()

    assert asyncio.run(go()).records == [7]
