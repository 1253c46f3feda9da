"""Stuck SSE readers: server RSS and a writer's ack latency while readers that never read sit on a
multi-MB backlog, until the server drops them.

    .venv/bin/python bench/stuck_readers.py [--readers 200] [--backlog-mib 8] [--send-timeout 30]

Starts its own embedded stack and a real `threadline serve` (default settings but the send
timeout). One writer appends 1 KiB JSON records to the stream at 20/s throughout:
1. alone for a few seconds: its baseline latency, and the server's baseline RSS;
2. while ``--readers`` raw sockets (4 KiB receive buffer) ask for the stream from ``-1`` over SSE
   and never read, until the server has closed every one of them (read from the client sockets'
   TCP state): the writer's latency, the server's peak RSS, and how long the drops took;
3. after the drops: the server's RSS.
Prints a table and writes bench/results/stuck_readers.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from harness import pct, start_server, stop_server, tenant, tree_rss, write_results
from threadline.embedded.stack import EmbeddedStack

MIB = 1024 * 1024
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8


def stuck_reader(url: str, path: str, key: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    )
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in (TCP_CLOSE, TCP_CLOSE_WAIT)


class Writer:
    """Appends one 1 KiB record every 50 ms, recording each acknowledgement's latency by phase."""

    def __init__(self, client: aiohttp.ClientSession, path: str) -> None:
        self.client = client
        self.path = path
        self.phase = "alone"
        self.latencies: dict[str, list[float]] = {"alone": [], "stuck": [], "after": []}
        self.failures = 0

    async def run(self) -> None:
        index = 0
        while True:
            body = orjson.dumps({"i": index, "pad": "x" * 1000})
            started = time.perf_counter()
            async with self.client.post(self.path, data=body) as response:
                await response.read()
            if response.status == 204:
                self.latencies[self.phase].append(time.perf_counter() - started)
            else:
                self.failures += 1
            index += 1
            await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="tl-bench-stuck-") as data_dir,
        EmbeddedStack(Path(data_dir)) as stack,
    ):
        endpoints = stack.endpoints
        _, key = await tenant(endpoints, "bench-stuck")
        server, url = await start_server(
            endpoints,
            THREADLINE_SSE_SEND_TIMEOUT_SECONDS=str(args.send_timeout),
            THREADLINE_LOG_LEVEL="ERROR",
        )
        process = psutil.Process(server.pid)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        path = f"/v1/stream/bench-stuck-{time.time_ns()}"
        sockets: list[socket.socket] = []
        try:
            async with aiohttp.ClientSession(base_url=url, headers=headers) as client:
                async with client.put(path) as response:
                    assert response.status == 201, await response.text()
                record = orjson.dumps("r" * (256 * 1024 - 2))
                for _ in range(args.backlog_mib * 4):
                    async with client.post(path, data=record) as response:
                        assert response.status == 204, await response.text()
                writer = Writer(client, path)
                writing = asyncio.create_task(writer.run())
                await asyncio.sleep(5)
                baseline = tree_rss(process)
                writer.phase = "stuck"
                started = time.monotonic()
                for _ in range(args.readers):
                    sockets.append(stuck_reader(url, path, key))
                peak = baseline
                while not all(closed_by_server(sock) for sock in sockets):
                    peak = max(peak, tree_rss(process))
                    if time.monotonic() - started > args.send_timeout + 120:
                        break
                    await asyncio.sleep(0.25)
                dropped_after = time.monotonic() - started
                closed = sum(closed_by_server(sock) for sock in sockets)
                writer.phase = "after"
                await asyncio.sleep(5)
                after = tree_rss(process)
                writing.cancel()
                async with client.get("/metrics") as response:
                    metrics = await response.text()
        finally:
            for sock in sockets:
                sock.close()
            await stop_server(server)
    dropped = next(
        (
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("threadline_sse_readers_dropped_total{")
        ),
        "0",
    )
    return {
        "readers": args.readers,
        "backlog_mib": args.backlog_mib,
        "send_timeout_s": args.send_timeout,
        "rss_baseline_mib": round(baseline / MIB),
        "rss_peak_mib": round(peak / MIB),
        "rss_after_mib": round(after / MIB),
        "closed_by_server": closed,
        "dropped_metric": float(dropped),
        "all_dropped_after_s": round(dropped_after, 1),
        "writer_failures": writer.failures,
        "writer": {
            phase: {
                "n": len(samples),
                "p50_ms": round(pct(samples, 0.5), 1),
                "p99_ms": round(pct(samples, 0.99), 1),
            }
            for phase, samples in writer.latencies.items()
            if samples
        },
    }


def table(result: dict[str, Any]) -> str:
    writer = result["writer"]
    rows = [
        f"Stuck SSE readers: {result['readers']} readers that never read, {result['backlog_mib']} MiB backlog, "
        f"send timeout {result['send_timeout_s']} s",
        "",
        "| measure | value |",
        "|---|---|",
        f"| server RSS baseline / peak / after drops | {result['rss_baseline_mib']} / {result['rss_peak_mib']} / "
        f"{result['rss_after_mib']} MiB |",
        f"| readers closed by the server | {result['closed_by_server']} of {result['readers']} "
        + (
            f"(all within {result['all_dropped_after_s']} s"
            if result["closed_by_server"] == result["readers"]
            else f"(stopped waiting after {result['all_dropped_after_s']} s"
        )
        + f"; metric {result['dropped_metric']:g}) |",
    ]
    for phase, label in (
        ("alone", "writer alone"),
        ("stuck", "writer with stuck readers"),
        ("after", "writer after"),
    ):
        if phase in writer:
            w = writer[phase]
            rows.append(f"| {label}: ack p50 / p99 (n) | {w['p50_ms']} / {w['p99_ms']} ms ({w['n']}) |")
    rows.append(f"| writer failures | {result['writer_failures']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--backlog-mib", type=int, default=8)
    parser.add_argument("--send-timeout", type=float, default=30.0)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    write_results("stuck_readers", result, table(result))


if __name__ == "__main__":
    main()
