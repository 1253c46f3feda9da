"""One load-generator process of the chat-shaped workload (driven by bench/chat.py).

    python bench/chat_load.py --url URL [--token T] --api realtime|stream|sessions-stream \\
        --sessions K [--first I] [--rate 20] [--seconds 10] [--record-bytes 100]

A chat is one session (or one plain stream): one writer appending one ~100 B JSON record per
request at ``--rate`` records/s to the session's ``out`` channel, and one SSE subscriber on that
channel. Protocol per ``--api``:

    realtime         Threadline as an agent and a browser use it (the SDK's session channels):
                     POST /api/v1/sessions, POST /realtime/v1/sessions/<id>/out/append,
                     GET /realtime/v1/sessions/<id>/out (one SSE `message` event per record)
    sessions-stream  Threadline sessions through the Durable Streams protocol on
                     /v1/stream/sessions/<id>/out (POST, GET live=sse)
    stream           any Durable Streams server: PUT /v1/stream/<name>, POST, GET live=sse

The process sets everything up (sessions, one keep-alive writer connection and one SSE connection
per chat), prints ``{"ready": ...}`` and waits for a start time (epoch seconds) on stdin, so that
several generator processes write during the same window. It then writes for ``--seconds``, waits
up to ``--settle`` seconds for every acknowledged record to reach its subscriber, and prints one
JSON object: every delivery and ack latency in ms, each writer's records sent over its scheduled
count, errors, acknowledged records never delivered (missing), records delivered twice or out of
order (disordered), records answered with an error yet delivered (refused_delivered: a broken
"failed means nothing stored"), and its own CPU seconds over the window.

Clock: each record carries ``time.time()`` taken just before its request is written; the
subscriber subtracts it from ``time.time()`` when the bytes arrive. Writer and subscriber run on
the same machine, so both read the same wall clock (no skew); the figure includes the server and
the generator's own scheduling delay, which is why the generator's CPU is reported.

Writers and subscribers speak raw HTTP over asyncio protocols, not through an HTTP client
library: at a few thousand requests per second a full client would cost the generator more CPU
than the server spends, and the generator must not be what limits the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from sse_wire import SseParser, SseRefused

REQUEST_TIMEOUT_S = 120.0  # setup calls; writers still waiting this long after the window fail
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
GOLDEN = 0.6180339887  # spreads writers' phases evenly over one interval, whatever their number


class HttpError(RuntimeError):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (a writer waits for its ack).

    The response parser knows what these servers send: a status line, headers, then a body of
    ``Content-Length`` bytes, chunked, or none (204)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        response = self._parse()
        if response is not None:
            self.waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def _parse(self) -> tuple[int, bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[: end + 2])
        status = int(head[9:12])  # "HTTP/1.1 200 ..."
        start = end + 4
        if length := _CONTENT_LENGTH.search(head):
            stop = start + int(length[1])
            if len(self.buffer) < stop:
                return None
            body = bytes(self.buffer[start:stop])
        elif _CHUNKED.search(head):
            body_parts, position = [], start
            while True:
                line_end = self.buffer.find(b"\r\n", position)
                if line_end < 0:
                    return None
                size = int(bytes(self.buffer[position:line_end]).split(b";")[0], 16)
                if len(self.buffer) < line_end + 2 + size + 2:
                    return None
                body_parts.append(bytes(self.buffer[line_end + 2 : line_end + 2 + size]))
                position = line_end + 2 + size + 2
                if size == 0:
                    break
            stop, body = position, b"".join(body_parts)
        else:
            stop, body = start, b""
        del self.buffer[:stop]
        return status, body

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """The response to ``data``. No timeout here (a timer per request costs the generator
        CPU); the writers' window as a whole is bounded instead (ChatLoad.run)."""
        if self.lost or self.transport is None:
            raise HttpError("connection closed")
        self.waiter = self.loop.create_future()
        self.transport.write(data)
        return self.waiter


def _request(method: str, path: str, host: str, token: str, body: bytes = b"") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Subscriber(asyncio.Protocol):
    """One SSE connection. Both routes' events: a realtime ``message`` event is one record, a
    Durable Streams ``data`` event a JSON array."""

    def __init__(self, chat: _Chat) -> None:
        self.chat = chat
        self.parser = SseParser()
        self.ready = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        try:
            events = self.parser.feed(data)
        except SseRefused as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            return
        if self.parser.status is not None and not self.ready.done():
            self.ready.set_result(None)
        for name, payload in events:
            if name == b"message":
                self.chat.received(orjson.loads(payload), now)
            elif name == b"data":
                for record in orjson.loads(payload):
                    self.chat.received(record, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(HttpError(f"SSE connection lost: {exc}"))


@dataclass
class _Chat:
    """One session: its writer's figures and what its subscriber received."""

    index: int
    path: str = ""  # the channel or stream the writer posts to and the subscriber reads
    writes: int = 0
    scheduled: int = 0
    late: int = 0
    errors: int = 0
    reconnects: int = 0
    acked: set[int] = field(default_factory=set)  # records whose append was acknowledged
    refused: set[int] = field(default_factory=set)  # answered with an error: must never show up
    seen: set[int] = field(default_factory=set)
    last_seen: int = -1
    disordered: int = 0  # a record delivered twice or before one written ahead of it
    deliveries: list[float] = field(default_factory=list)

    def received(self, record: dict[str, Any], now: float) -> None:
        self.deliveries.append(now - record["t"])
        i = record["i"]
        if i <= self.last_seen or i in self.seen:
            self.disordered += 1
        self.last_seen = max(self.last_seen, i)
        self.seen.add(i)


@dataclass
class Plan:
    url: str
    token: str
    api: str
    sessions: int
    first: int
    rate: float
    seconds: float
    settle: float
    record_bytes: int
    run: str


class ChatLoad:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        url = urlsplit(plan.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.chats = [_Chat(plan.first + i) for i in range(plan.sessions)]
        self.connections: list[_Connection] = []  # one writer connection per chat, same order
        self.subscriptions: list[tuple[asyncio.BaseTransport, _Subscriber]] = []
        self.acks: list[float] = []

    async def _connect(self) -> _Connection:
        _, protocol = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        return protocol

    async def _call(self, conn: _Connection, method: str, path: str, body: bytes = b"") -> bytes:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            status, answer = await conn.request(_request(method, path, self.host, self.plan.token, body))
        if status not in (200, 201, 204):
            raise HttpError(f"{method} {path}: {status} {answer[:300]!r}")
        return answer

    async def _create(self, chat: _Chat, conn: _Connection) -> None:
        plan = self.plan
        if plan.api == "stream":
            chat.path = f"/v1/stream/bench-chat-{plan.run}-{chat.index}"
            await self._call(conn, "PUT", chat.path)
            return
        body = json.dumps({"type": "bench-chat", "externalId": f"bench-chat-{plan.run}-{chat.index}"})
        session = json.loads(await self._call(conn, "POST", "/api/v1/sessions", body.encode()))
        if plan.api == "realtime":
            chat.path = f"/realtime/v1/sessions/{session['id']}/out"
        else:
            chat.path = f"/v1/stream/sessions/{session['id']}/out"

    async def _subscribe(self, chat: _Chat) -> None:
        # From -1 on an empty channel: nothing written after the subscription can be missed,
        # whenever the server starts following it.
        if self.plan.api == "realtime":
            target = f"{chat.path}?offset=-1&timeoutSeconds=600"
        else:
            target = f"{chat.path}?offset=-1&live=sse"
        auth = f"Authorization: Bearer {self.plan.token}\r\n" if self.plan.token else ""
        transport, protocol = await asyncio.get_running_loop().create_connection(
            lambda: _Subscriber(chat), self.host, self.port
        )
        transport.write(f"GET {target} HTTP/1.0\r\nHost: {self.host}\r\n{auth}\r\n".encode())
        self.subscriptions.append((transport, protocol))
        await asyncio.wait_for(protocol.ready, 60)

    async def setup(self) -> None:
        limit = asyncio.Semaphore(16)

        async def one(chat: _Chat) -> _Connection:
            async with limit:
                conn = await self._connect()
                await self._create(chat, conn)
                await self._subscribe(chat)
                return conn

        self.connections = list(await asyncio.gather(*(one(chat) for chat in self.chats)))

    def _request(self, chat: _Chat, path: str, i: int) -> bytes:
        """``{"t":<time.time()>,"s":<session>,"i":<seq>,"text":"xx…"}``, padded to
        ``--record-bytes`` (at least), in one POST."""
        record = b'{"t":%.6f,"s":%d,"i":%d,"text":"' % (time.time(), chat.index, i)
        record += b"x" * max(0, self.plan.record_bytes - len(record) - 2) + b'"}'
        return _request("POST", path, self.host, self.plan.token, record)

    async def _write(self, chat: _Chat, conn: _Connection, start: float) -> None:
        """Record i is due at start + phase + i / rate. A writer behind schedule sends at once
        (it never skips a record) and stops at the end of the window: a server that holds its
        writers back shows as sent / scheduled < 1. A connection the server closed (keep-alive
        timeout) is reopened before the next request; a request that fails counts as an error
        and the writer goes on with the next record on a new connection."""
        interval = 1 / self.plan.rate
        first = start + ((chat.index * GOLDEN) % 1.0) * interval
        stop = start + self.plan.seconds
        chat.scheduled = math.ceil((stop - first) / interval)
        path = chat.path + "/append" if self.plan.api == "realtime" else chat.path
        for i in range(chat.scheduled):
            delay = first + i * interval - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                chat.late += 1
            if time.time() >= stop:
                break
            if conn.lost:
                conn = await self._connect()
                chat.reconnects += 1
            request = self._request(chat, path, i)
            sent = time.time()
            try:
                status, answer = await conn.request(request)
            except HttpError:
                chat.errors += 1
                if conn.transport is not None:
                    conn.transport.close()
                conn.lost = True
                continue
            self.acks.append(time.time() - sent)
            if status in (200, 204):
                chat.writes += 1
                chat.acked.add(i)
            else:
                chat.errors += 1
                # Unanswered (above) or `outcome_unknown`: it may be stored. Any other refusal
                # promises that nothing of it is visible.
                if b"outcome_unknown" not in answer:
                    chat.refused.add(i)

    async def run(self, start: float) -> dict[str, Any]:
        # Fresh writer connections: those opened during setup may have sat idle for longer than
        # the server's keep-alive timeout while the other generator processes set up.
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()
        self.connections = list(await asyncio.gather(*(self._connect() for _ in self.chats)))
        delay = start - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu0 = os.times()
        writers = [
            asyncio.ensure_future(self._write(chat, conn, start))
            for chat, conn in zip(self.chats, self.connections, strict=True)
        ]
        _, stuck = await asyncio.wait(writers, timeout=self.plan.seconds + REQUEST_TIMEOUT_S)
        for writer in stuck:  # a request unanswered long after the window: a failed append
            writer.cancel()
        stuck_errors = len(stuck)
        cpu1 = os.times()
        window = time.time() - start
        expected = sum(chat.writes for chat in self.chats)
        settle = time.time() + self.plan.settle
        while sum(len(c.acked & c.seen) for c in self.chats) < expected and time.time() < settle:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for transport, _ in self.subscriptions:
            transport.close()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()
        return {
            "sessions": len(self.chats),
            "window_s": window,
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "writes": expected,
            "scheduled": sum(c.scheduled for c in self.chats),
            "late": sum(c.late for c in self.chats),
            "errors": sum(c.errors for c in self.chats) + stuck_errors,
            "reconnects": sum(c.reconnects for c in self.chats),
            "missing": sum(len(c.acked - c.seen) for c in self.chats),
            "refused_delivered": sum(len(c.refused & c.seen) for c in self.chats),
            "disordered": sum(c.disordered for c in self.chats),
            "writer_ratios": [c.writes / c.scheduled if c.scheduled else 1.0 for c in self.chats],
            "ack_ms": [round(a * 1000, 3) for a in self.acks],
            "delivery_ms": [round(d * 1000, 3) for c in self.chats for d in c.deliveries],
        }


async def main(plan: Plan) -> None:
    load = ChatLoad(plan)
    started = time.perf_counter()
    await load.setup()
    print(json.dumps({"ready": True, "setup_s": time.perf_counter() - started}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    result = await load.run(float(line))
    print(json.dumps(result), flush=True)


def parse(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--api", choices=["realtime", "sessions-stream", "stream"], required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first session")
    parser.add_argument("--rate", type=float, default=20.0, help="records/s per writer")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--record-bytes", type=int, default=100)
    parser.add_argument("--run", default=os.urandom(4).hex(), help="names sessions/streams uniquely")
    args = parser.parse_args(argv)
    return Plan(
        url=args.url,
        token=args.token,
        api=args.api,
        sessions=args.sessions,
        first=args.first,
        rate=args.rate,
        seconds=args.seconds,
        settle=args.settle,
        record_bytes=args.record_bytes,
        run=args.run,
    )


if __name__ == "__main__":
    _soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parse()))
