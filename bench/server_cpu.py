"""Server CPU per operation, A/B between source trees, back to back on one stack.

    .venv/bin/python bench/server_cpu.py [--tree before=/path/to/old/checkout] [--tree after=.]
        [--rounds 2] [--subscribers 100,1000] [--seconds 10]

Latency on a shared 2-core machine says little; CPU seconds the server process spent per
operation (its ``cpu_times`` delta over the operations) compare two builds fairly when run back
to back. Each ``--tree`` is a checkout whose ``src`` is put first on the server's PYTHONPATH
(default: this one). Per tree and round it starts one ``threadline serve`` on a shared embedded
stack and measures:

- appends: single-record JSON appends over 100 streams, 16 in flight: server ms of CPU per append;
- live N: N SSE subscribers on one stream (raw HTTP/1.0 sockets, as bench/loadgen.py), one writer
  at 20 records/s: server µs of CPU per delivery over the writing window (appends included, they
  are ~1 in N of the work), the writer's achieved rate, ack p99 and delivery p50/p99.

Figures go to stdout, one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, pct, start_server, stop_server, tenant
from loadgen import JSON, _create, _name, _post, _Subscriber
from threadline.embedded.stack import EmbeddedStack


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _profile(pid: int, seconds: float, out: Path | None) -> asyncio.Task[Any] | None:
    """py-spy over the measured window (collapsed stacks, ``-f raw``), if asked for."""
    if out is None:
        return None
    py_spy = Path(sys.executable).parent / "py-spy"
    command = [str(py_spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "-f", "raw"]
    return asyncio.ensure_future(
        asyncio.create_subprocess_exec(*command, "-o", str(out), stdout=asyncio.subprocess.DEVNULL)
    )


async def appends(
    url: str, token: str, pid: int, seconds: float, profile: Path | None = None
) -> dict[str, Any]:
    server = psutil.Process(pid)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(url, headers=headers, connector=aiohttp.TCPConnector(limit=0)) as client:
        paths = [_name("cpu") for _ in range(100)]
        for path in paths:
            await _create(client, path, JSON)
        body = json.dumps("x" * 196)
        done = 0
        stop = 0.0

        async def worker(index: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await _post(client, paths[(index + done) % len(paths)], body, JSON)
                done += 1

        # Warm up (caches, connections), then measure.
        stop = time.perf_counter() + 2
        await asyncio.gather(*(worker(i) for i in range(16)))
        done = 0
        _profile(pid, seconds, profile)
        cpu0 = _cpu(server)
        started = time.perf_counter()
        stop = started + seconds
        await asyncio.gather(*(worker(i) for i in range(16)))
        cpu = _cpu(server) - cpu0
        elapsed = time.perf_counter() - started
    return {
        "appends": done,
        "appends_per_s": done / elapsed,
        "server_cpu_s": cpu,
        "server_ms_per_append": cpu / done * 1000,
    }


async def live(
    url: str, token: str, pid: int, subscribers: int, seconds: float, profile: Path | None = None
) -> dict[str, Any]:
    server = psutil.Process(pid)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(url, headers=headers) as client:
        path = _name("cpu-live")
        await _create(client, path, JSON)
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        request = (
            f"GET {path}?offset=now&live=sse HTTP/1.0\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        latencies: list[float] = []
        counter = [0]
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(subscribers):
            ready = asyncio.Event()
            transport, _protocol = await loop.create_connection(
                lambda ready=ready: _Subscriber(latencies, ready, counter), host, port
            )
            transport.write(request)
            transports.append(transport)
        deadline = time.perf_counter() + 120
        while counter[0] < subscribers and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        _profile(pid, seconds, profile)
        cpu0 = _cpu(server)
        acks: list[float] = []
        rate = 20.0
        started = time.perf_counter()
        writes = 0
        for i in range(int(seconds * rate)):
            if time.perf_counter() >= started + seconds:
                break
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            await _post(client, path, json.dumps([{"t": time.time(), "i": i}]), JSON)
            acks.append(time.perf_counter() - t0)
            writes += 1
        elapsed = time.perf_counter() - started
        expected = writes * counter[0]
        settle = time.perf_counter() + 30
        while len(latencies) < expected and time.perf_counter() < settle:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        cpu = _cpu(server) - cpu0
        for transport in transports:
            transport.close()
    return {
        "subscribers": counter[0],
        "writes": writes,
        "achieved_rate": writes / elapsed,
        "ack_p99_ms": pct(acks, 0.99),
        "delivery_p50_ms": pct(latencies, 0.5) if latencies else None,
        "delivery_p99_ms": pct(latencies, 0.99) if latencies else None,
        "deliveries": len(latencies),
        "missing": expected - len(latencies),
        "server_cpu_s": cpu,
        "server_us_per_delivery": cpu / max(1, len(latencies)) * 1e6,
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    trees: list[tuple[str, str]] = args.trees
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStack(Path(tmp) / "stack") as stack:
        _, key = await tenant(stack.endpoints, "bench-cpu")
        for round_ in range(args.rounds):
            for label, tree in trees:
                env = {"PYTHONPATH": tree, **args.server_env}
                process, url = await start_server(stack.endpoints, **env)
                try:
                    load = os.getloadavg()[0]
                    row: dict[str, Any] = {"tree": label, "round": round_, "load1": load}
                    out = Path(args.profile) if args.profile else None

                    def where(
                        name: str, out: Path | None = out, tag: str = f"{label}-{round_}"
                    ) -> Path | None:
                        return out / f"{tag}-{name}.txt" if out else None

                    row["appends"] = await appends(url, key, process.pid, args.seconds, where("appends"))
                    for n in args.subscribers:
                        row[f"live{n}"] = await live(
                            url, key, process.pid, n, args.seconds, where(f"live{n}")
                        )
                finally:
                    await stop_server(process)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], subscribers: list[int]) -> str:
    head = "| tree | round | load | ms CPU/append |"
    for n in subscribers:
        head += f" {n} subs: µs CPU/delivery, writer/s, ack p99, delivery p50/p99 ms |"
    lines = [head, "|" + "---|" * (4 + len(subscribers))]
    for row in rows:
        line = f"| {row['tree']} | {row['round']} | {row['load1']:.1f} | {row['appends']['server_ms_per_append']:.3f} |"
        for n in subscribers:
            lv = row[f"live{n}"]
            line += (
                f" {lv['server_us_per_delivery']:.1f}, {lv['achieved_rate']:.1f}, {lv['ack_p99_ms']:.1f},"
                f" {lv['delivery_p50_ms'] or 0:.1f} / {lv['delivery_p99_ms'] or 0:.1f} (missing {lv['missing']}) |"
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", default=[], help="label=path of a checkout")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--subscribers", default="100,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for the server (bench/harness.py sets THREADLINE_LOG_LEVEL=WARNING; "
        "THREADLINE_LOG_LEVEL=INFO measures the default access log too)",
    )
    parser.add_argument("--profile", help="a directory for py-spy collapsed stacks of each window")
    args = parser.parse_args()
    args.trees = [
        (label, str(Path(tree).resolve() / "src"))
        for label, tree in (item.split("=", 1) for item in args.tree or [f"this={REPO}"])
    ]
    args.server_env = dict(item.split("=", 1) for item in args.env)
    args.subscribers = [int(n) for n in args.subscribers.split(",") if n]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = asyncio.run(run(args))
    print(table(rows, args.subscribers))


if __name__ == "__main__":
    main()
