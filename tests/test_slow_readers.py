"""SSE readers that stop reading, against a real `threadline serve` process.

Two hundred raw sockets ask for a multi-MB backlog over SSE and never read. The server must hold
a bounded amount for each (catch-up paced by the socket), drop them once they take nothing for
the send timeout (the client sockets see the reset), log each drop as one line and count it, keep
acknowledging a writer meanwhile, give its memory back, and let a dropped reader resume from its
last offset with nothing missing or repeated. No timing assertions beyond generous bounds.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from tests.conftest import ServeProcess, Tenant, bearer, eventually
from threadline.embedded.stack import StackEndpoints

pytestmark = pytest.mark.slow

READERS = 200
RECORD = 256 * 1024
BACKLOG_RECORDS = 32  # 8 MiB
SEND_TIMEOUT = 3
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8
JSON = {"Content-Type": "application/json"}


def _stuck_reader(url: str, path: str, token: str) -> socket.socket:
    """A client that sends the request and never reads, with a small receive buffer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    request = (
        f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    sock.sendall(request.encode())
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """The server reset the connection (or sent FIN): read from TCP_INFO, without reading data."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (TCP_CLOSE, TCP_CLOSE_WAIT)


class _SseParser:
    """De-chunks an HTTP/1.1 response and collects complete ``data`` + ``control`` event pairs."""

    def __init__(self) -> None:
        self.raw = b""
        self.body = b""
        self.headers_done = False
        self.records: list[str] = []
        self.offset: str | None = None  # streamNextOffset of the last complete control event
        self._pending: list[str] = []

    def feed(self, data: bytes) -> None:
        self.raw += data
        if not self.headers_done:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return
            assert head.startswith(b"HTTP/1.1 200"), head
            self.headers_done, self.raw = True, rest
        while True:
            line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                break
            size = int(line, 16)
            if len(rest) < size + 2:
                break
            self.body += rest[:size]
            self.raw = rest[size + 2 :]
        while b"\n\n" in self.body:
            event, _, self.body = self.body.partition(b"\n\n")
            self._event(event.decode())

    def _event(self, text: str) -> None:
        kind = re.search(r"^event: (\w+)$", text, re.MULTILINE)
        if kind is None:
            return  # a comment (heartbeat)
        data = "".join(line.removeprefix("data:") for line in text.splitlines() if line.startswith("data:"))
        if kind.group(1) == "data":
            self._pending.extend(orjson.loads(data))
        else:
            self.records.extend(self._pending)
            self._pending = []
            self.offset = orjson.loads(data)["streamNextOffset"]


def _rss(process: psutil.Process) -> int:
    return int(process.memory_info().rss)


def _read_all(client: httpx.Client, path: str, offset: str = "-1") -> tuple[list[str], str]:
    records: list[str] = []
    while True:
        response = client.get(path, params={"offset": offset})
        assert response.status_code == 200, response.text
        records.extend(response.json())
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return records, offset


def test_stuck_sse_readers_are_dropped_and_their_memory_freed(
    stack: StackEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    server = ServeProcess(
        stack,
        log,
        THREADLINE_SSE_SEND_TIMEOUT_SECONDS=str(SEND_TIMEOUT),
        THREADLINE_SSE_HEARTBEAT_SECONDS="1",
        THREADLINE_LOG_LEVEL="INFO",
    )
    sockets: list[socket.socket] = []
    stop_writer = threading.Event()
    try:
        process = psutil.Process(server.proc.pid)
        path = f"/v1/stream/stuck-readers-{time.time_ns()}"
        with httpx.Client(base_url=server.url, headers=bearer(tenant.key), timeout=30) as client:
            assert client.put(path, headers=JSON).status_code == 201
            for index in range(BACKLOG_RECORDS):
                record = orjson.dumps(f"{index:04d}".ljust(RECORD - 2, "r"))
                assert client.post(path, headers=JSON, content=record).status_code == 204
            # Warm up (the backlog in the chunk cache, the SSE path's code and pools) before the baseline.
            _read_all(client, path)
            warm = _SseParser()
            warm_sock = _stuck_reader(server.url, path, tenant.key)
            while warm.offset is None:
                warm.feed(warm_sock.recv(65536))
            warm_sock.close()
            time.sleep(1)
            baseline = _rss(process)

            acks: list[float] = []

            def write() -> None:
                with httpx.Client(
                    base_url=server.url, headers={**bearer(tenant.key), **JSON}, timeout=30
                ) as w:
                    index = 0
                    while not stop_writer.is_set():
                        started = time.monotonic()
                        response = w.post(path, content=orjson.dumps(f"w{index}"))
                        assert response.status_code == 204, response.text
                        acks.append(time.monotonic() - started)
                        index += 1
                        time.sleep(0.02)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()

            # One reader takes its first event, then stops: it must resume from that offset.
            partial = _SseParser()
            partial_sock = _stuck_reader(server.url, path, tenant.key)
            while partial.offset is None:
                partial.feed(partial_sock.recv(4096))
            sockets.append(partial_sock)
            sockets.extend(_stuck_reader(server.url, path, tenant.key) for _ in range(READERS))

            peak = baseline
            acks_before_drops = len(acks)

            def all_closed() -> bool:
                nonlocal peak
                peak = max(peak, _rss(process))
                return all(_closed_by_server(sock) for sock in sockets)

            mib = 1024 * 1024
            acks_during = 0
            try:
                eventually(all_closed, timeout=120, interval=0.5)
                acks_during = len(acks) - acks_before_drops

                def near_baseline() -> int | None:
                    rss = _rss(process)
                    return rss if rss <= baseline + 150 * mib else None

                after = eventually(near_baseline, timeout=30, interval=0.5)
            finally:
                closed = sum(_closed_by_server(sock) for sock in sockets)
                print(
                    f"\nserver RSS: baseline {baseline / mib:.0f} MiB, peak {peak / mib:.0f} MiB, "
                    f"now {_rss(process) / mib:.0f} MiB; readers closed by the server: {closed}/{len(sockets)}; "
                    f"writer acks while they were stuck: {len(acks) - acks_before_drops}"
                )
            assert after <= baseline + 150 * mib
            stop_writer.set()
            writer.join(30)
            assert not writer.is_alive()
            assert acks_during >= 5, acks_during  # the writer was acknowledged throughout

            # The partial reader resumes from the last offset it received: nothing missing or twice.
            assert partial.offset is not None
            expected, _ = _read_all(client, path)
            resumed, _ = _read_all(client, path, partial.offset)
            assert partial.records + resumed == expected
            assert len(partial.records) < BACKLOG_RECORDS  # it was dropped part way

            metrics = client.get("/metrics").text
            dropped = re.search(
                r'^threadline_sse_readers_dropped_total\{reason="send_timeout"\} (\S+)$', metrics, re.M
            )
            assert dropped is not None, metrics[-2000:]
            assert float(dropped.group(1)) >= READERS + 1
    finally:
        stop_writer.set()
        for sock in sockets:
            sock.close()
        server.stop()
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Exception in ASGI" not in text, text[-4000:]
    assert text.count("dropped a slow SSE reader") >= READERS + 1


def test_resuming_over_sse_after_a_drop_misses_and_repeats_nothing(
    stack: StackEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    """The same, through SSE itself: a reader dropped part way reconnects with its last offset."""
    server = ServeProcess(stack, tmp_path / "serve.log", THREADLINE_SSE_SEND_TIMEOUT_SECONDS="2")
    try:
        path = f"/v1/stream/resume-after-drop-{time.time_ns()}"
        with httpx.Client(base_url=server.url, headers=bearer(tenant.key), timeout=30) as client:
            assert client.put(path, headers=JSON).status_code == 201
            for index in range(16):
                record = orjson.dumps(f"{index:04d}".ljust(RECORD - 2, "r"))
                assert client.post(path, headers=JSON, content=record).status_code == 204
            expected, tail = _read_all(client, path)
            first = _SseParser()
            sock = _stuck_reader(server.url, path, tenant.key)
            while first.offset is None:
                first.feed(sock.recv(4096))
            eventually(lambda: _closed_by_server(sock), timeout=60)
            sock.close()
            second = _SseParser()
            host, port = server.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as again:
                again.sendall(
                    f"GET {path}?offset={first.offset}&live=sse HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {tenant.key}\r\n\r\n".encode()
                )
                while second.offset != tail:
                    second.feed(again.recv(65536))
            assert first.records + second.records == expected
            assert 0 < len(first.records) < len(expected)
    finally:
        server.stop()
