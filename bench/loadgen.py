"""The load generator: one workload against one Durable Streams server, in its own process.

    python bench/loadgen.py --url URL [--token T] WORKLOAD [options]

It speaks only the protocol (``/v1/stream/<name>``), so the same code drives Threadline and the
reference server. It prints one JSON object: the workload's figures plus this process's own CPU
seconds and wall time, so a reader can check the generator was not the bottleneck.

Workloads:
    latency     sequential 1 KiB appends by one producer: p50/p99 ack latency
    throughput  200 B JSON records, N per request, over S streams, F requests in flight, for D s
    replay      write R records of 200 B, then read them back from -1 (1 reader, then K at once)
    live        M SSE subscribers on one stream, one writer at W records/s for D s: append ->
                receive latency at every subscriber, and the writer's own ack latency

SSE subscribers use raw HTTP/1.0 connections (no chunked framing to undo, one read per packet),
because a thousand of them through a full HTTP client would cost more CPU than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from sse_wire import SseParser

RECORD_200 = "x" * 196  # with quotes and a comma: ~200 bytes a record in a JSON array
JSON = {"Content-Type": "application/json"}
OCTETS = {"Content-Type": "application/octet-stream"}


def pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _name(kind: str) -> str:
    return f"/v1/stream/bench-{kind}-{secrets.token_hex(5)}"


async def _create(client: aiohttp.ClientSession, path: str, headers: dict[str, str]) -> None:
    async with client.put(path, headers=headers) as response:
        if response.status not in (200, 201):
            raise RuntimeError(f"PUT {path}: {response.status} {await response.text()}")


async def _post(client: aiohttp.ClientSession, path: str, body: bytes | str, headers: dict[str, str]) -> None:
    async with client.post(path, data=body, headers=headers) as response:
        if response.status not in (200, 204):
            raise RuntimeError(f"POST {path}: {response.status} {await response.text()}")
        await response.read()


async def latency(client: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    path = _name("latency")
    await _create(client, path, OCTETS)
    record = secrets.token_bytes(1024)
    for _ in range(20):  # warm the connection and the server's caches
        await _post(client, path, record, OCTETS)
    samples = []
    for _ in range(args.requests):
        started = time.perf_counter()
        await _post(client, path, record, OCTETS)
        samples.append(time.perf_counter() - started)
    return {"p50_ms": pct(samples, 0.5), "p99_ms": pct(samples, 0.99), "requests": len(samples)}


async def throughput(client: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    paths = [_name("tp") for _ in range(args.streams)]
    for path in paths:  # one at a time: with 100 concurrent PUTs the reference file store once 404ed appends
        await _create(client, path, JSON)
    body = json.dumps([RECORD_200] * args.per_request) if args.per_request > 1 else json.dumps(RECORD_200)
    done = 0
    deadline = time.perf_counter() + args.seconds
    counter = iter(range(1 << 62))

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await _post(client, paths[next(counter) % len(paths)], body, JSON)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    elapsed = time.perf_counter() - started
    return {"records_per_s": done * args.per_request / elapsed, "requests": done, "seconds": elapsed}


async def _read_all(client: aiohttp.ClientSession, path: str) -> int:
    offset, total = "-1", 0
    while True:
        async with client.get(path, params={"offset": offset}) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
            offset = response.headers["Stream-Next-Offset"]
            up_to_date = response.headers.get("Stream-Up-To-Date") == "true"
        total += len(json.loads(body))
        if up_to_date:
            return total


async def replay(client: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    path = _name("replay")
    await _create(client, path, JSON)
    batch = json.dumps([RECORD_200] * 1000)
    limit = asyncio.Semaphore(4)

    async def post() -> None:
        async with limit:
            await _post(client, path, batch, JSON)

    await asyncio.gather(*(post() for _ in range(args.records // 1000)))
    started = time.perf_counter()
    one = await _read_all(client, path)
    one_seconds = time.perf_counter() - started
    started = time.perf_counter()
    many = await asyncio.gather(*(_read_all(client, path) for _ in range(args.readers)))
    many_seconds = time.perf_counter() - started
    if one != args.records or any(count != args.records for count in many):
        raise RuntimeError(f"replay read {one} / {many} records, wrote {args.records}")
    return {
        "records": one,
        "one_reader_s": one_seconds,
        "readers": args.readers,
        "many_readers_s": many_seconds,
    }


class _Subscriber(asyncio.Protocol):
    """One SSE connection: parse events, time every record's delivery."""

    def __init__(self, latencies: list[float], ready: asyncio.Event, counter: list[int]) -> None:
        self.latencies = latencies
        self.ready = ready
        self.counter = counter
        self.parser = SseParser()
        self.got_control = False
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        for name, payload in self.parser.feed(data):
            if name == b"control" and not self.got_control:
                self.got_control = True
                self.counter[0] += 1
                self.ready.set()
            elif name == b"data":
                for record in json.loads(payload):
                    self.latencies.append(now - record["t"])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def live(client: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    path = _name("live")
    await _create(client, path, JSON)
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    auth = f"Authorization: Bearer {args.token}\r\n" if args.token else ""
    request = (f"GET {path}?offset=now&live=sse HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n").encode()
    latencies: list[float] = []
    counter = [0]
    loop = asyncio.get_running_loop()
    subscribers: list[tuple[asyncio.BaseTransport, _Subscriber]] = []
    for _ in range(args.subscribers):
        ready = asyncio.Event()
        transport, protocol = await loop.create_connection(
            lambda ready=ready: _Subscriber(latencies, ready, counter), host, port
        )
        transport.write(request)  # type: ignore[attr-defined]
        subscribers.append((transport, protocol))
    deadline = time.perf_counter() + 60
    while counter[0] < args.subscribers and time.perf_counter() < deadline:  # noqa: ASYNC110 (a count)
        await asyncio.sleep(0.05)
    connected = counter[0]

    acks: list[float] = []
    interval = 1 / args.rate
    started = time.perf_counter()
    stop = started + args.seconds
    late = 0
    writes = 0
    # Bounded by time, not by count: a server that holds the writer back ends with fewer writes
    # (its achieved rate says so) instead of stretching the run.
    for i in range(int(args.seconds * args.rate)):
        if time.perf_counter() >= stop:
            break
        writes += 1
        due = started + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late += 1
        sent = time.time()
        t0 = time.perf_counter()
        await _post(client, path, json.dumps([{"t": sent, "i": i}]), JSON)
        acks.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    expected = writes * connected
    settle = time.perf_counter() + 10
    while len(latencies) < expected and time.perf_counter() < settle:  # noqa: ASYNC110 (a count)
        await asyncio.sleep(0.05)
    for transport, _ in subscribers:
        transport.close()
    return {
        "subscribers": connected,
        "writes": writes,
        "achieved_rate": writes / elapsed,
        "writes_behind_schedule": late,
        "ack_p50_ms": pct(acks, 0.5),
        "ack_p99_ms": pct(acks, 0.99),
        "delivery_p50_ms": pct(latencies, 0.5),
        "delivery_p99_ms": pct(latencies, 0.99),
        "deliveries": len(latencies),
        "missing": expected - len(latencies),
    }


WORKLOADS = {"latency": latency, "throughput": throughput, "replay": replay, "live": live}


async def main(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        args.url, headers=headers, connector=connector, timeout=timeout
    ) as client:
        cpu0, wall0 = os.times(), time.perf_counter()
        result = await WORKLOADS[args.workload](client, args)
        cpu1, wall = os.times(), time.perf_counter() - wall0
    result["loadgen_cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    result["loadgen_wall_s"] = wall
    print(json.dumps(result))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parse()))
