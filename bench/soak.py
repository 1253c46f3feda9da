"""A soak: sustained mixed load on one `threadline serve`, with the server's resources per minute.

`make soak` (SOAK_MINUTES, default 30). Load, all at once, at steady rates:

* appends: `--writers` streams, each appended at `--rate` records/s (200 B JSON records);
* subscribers: `--subscribers` SSE readers at any time, each on a random stream for 1-5 s, then
  it leaves and another connects (connect → first byte is the "subscribe" latency). By default
  (`--from recent`) a reader starts `--window` records behind the tail its stream's writer last
  saw acknowledged, so every connection catches up a bounded backlog and then follows live: the
  work per minute stays the same for the whole run. `--from start` reads each stream from its
  first record instead, a workload that grows with the streams (a rise in RSS is then expected
  and says nothing about leaks);
* lists: a session list and a count, `--lists` per second;
* sessions: create one and close an older one, `--sessions` per second.

Every minute it prints the server's RSS, open file descriptors, connections, and p50/p99 latency
and errors per kind. At the end it fits a line through the last two thirds of the minutes (the
first third is warm-up: caches, pools and allocator arenas filling) and gives a verdict: RSS drifts
if it rises faster than 0.5 MB/min and by more than 5 % over that window, fds if they rise by more
than 10. The server's chunk cache is `--chunk-cache-mb` (8) instead of 64 MiB, so that it is full
by the end of warm-up and its filling is not mistaken for a leak. Figures are for reading, not
asserted; latency on a shared machine says little, drift says more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, pct, process_tree, start_server, stop_server, tenant, write_results
from threadline.embedded.stack import EmbeddedStack

KINDS = ("append", "subscribe", "list", "count", "create", "close")
# Drift after warm-up: RSS rising faster than this per minute and by more than this fraction of its
# mean over the window, or fds rising by more than this many; judged on at least this many minutes.
RSS_SLOPE_MB_PER_MIN = 0.5
RSS_RISE_FRACTION = 0.05
FD_RISE = 10
MIN_WINDOW_MINUTES = 3


class Stats:
    """Latencies and errors per kind for the current minute."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)

    def take(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        latency, errors = self.latency, self.errors
        self.latency, self.errors = defaultdict(list), defaultdict(int)
        return latency, errors


async def _timed(
    stats: Stats,
    kind: str,
    call: Any,
    ok: tuple[int, ...],
    on_ok: Callable[[aiohttp.ClientResponse], None] | None = None,
) -> Any:
    started = time.perf_counter()
    try:
        async with call as response:
            body = await response.read()
            if response.status in ok:
                stats.latency[kind].append(time.perf_counter() - started)
                if on_ok is not None:
                    on_ok(response)
                return body
            stats.errors[f"{kind} {response.status}"] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.errors[f"{kind} {type(exc).__name__}"] += 1
    return None


async def _paced(rate: float, stop: asyncio.Event, step: Any) -> None:
    """Call ``step`` ``rate`` times a second (not faster when it is quick, later when slow)."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        await step()
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class Tails:
    """The last acknowledged record count of each stream, as its writer saw it (from
    ``Stream-Next-Offset``): where a ``--from recent`` reader starts, ``--window`` records back."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.records: dict[str, int] = defaultdict(int)

    def acknowledged(self, path: str, next_offset: str | None) -> None:
        if next_offset:
            self.records[path] = max(self.records[path], int(next_offset.rsplit("_", 1)[-1]))

    def start(self, path: str) -> str:
        """An offset ``window`` records behind the known tail (offsets are ``<0>_<position>``)."""
        return f"{0:016d}_{max(0, self.records[path] - self.window):016d}"


async def _writer(
    client: aiohttp.ClientSession,
    url: str,
    path: str,
    rate: float,
    stats: Stats,
    stop: asyncio.Event,
    tails: Tails,
) -> None:
    record = json.dumps({"text": "x" * 180}).encode()

    def acknowledged(response: aiohttp.ClientResponse) -> None:
        tails.acknowledged(path, response.headers.get("Stream-Next-Offset"))

    async def step() -> None:
        await _timed(
            stats,
            "append",
            client.post(url + path, data=record, headers={"Content-Type": "application/json"}),
            (200, 204),
            acknowledged,
        )

    await _paced(rate, stop, step)


async def _subscriber(
    client: aiohttp.ClientSession,
    url: str,
    paths: list[str],
    stats: Stats,
    stop: asyncio.Event,
    seed: int,
    tails: Tails | None,
) -> None:
    """Connect to a random stream's SSE, read for 1-5 s, leave; again until stopped. From the
    stream's start without ``tails``, else a bounded window behind its tail."""
    rng = random.Random(seed)
    while not stop.is_set():
        path = rng.choice(paths)
        stay = rng.uniform(1.0, 5.0)
        started = time.perf_counter()
        start = "-1" if tails is None else tails.start(path)
        try:
            async with client.get(url + path, params={"offset": start, "live": "sse"}) as response:
                if response.status != 200:
                    stats.errors[f"subscribe {response.status}"] += 1
                    await asyncio.sleep(1.0)
                    continue
                await response.content.readany()
                stats.latency["subscribe"].append(time.perf_counter() - started)
                deadline = time.monotonic() + stay
                while time.monotonic() < deadline and not stop.is_set():
                    try:
                        async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                            if not await response.content.readany():
                                break
                    except TimeoutError:
                        break
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.errors[f"subscribe {type(exc).__name__}"] += 1
            await asyncio.sleep(1.0)


async def _lists(
    client: aiohttp.ClientSession, url: str, rate: float, stats: Stats, stop: asyncio.Event
) -> None:
    async def step() -> None:
        await _timed(stats, "list", client.get(f"{url}/api/v1/sessions", params={"page[size]": "50"}), (200,))
        await _timed(stats, "count", client.get(f"{url}/api/v1/sessions/count"), (200,))

    await _paced(rate, stop, step)


async def _sessions(
    client: aiohttp.ClientSession, url: str, rate: float, stats: Stats, stop: asyncio.Event
) -> None:
    created: list[str] = []

    async def step() -> None:
        body = await _timed(
            stats, "create", client.post(f"{url}/api/v1/sessions", json={"type": "soak"}), (201,)
        )
        if body is not None:
            created.append(json.loads(body)["id"])
        if len(created) > 20:
            session = created.pop(0)
            await _timed(
                stats, "close", client.post(f"{url}/api/v1/sessions/{session}/close", json={}), (200,)
            )

    await _paced(rate, stop, step)


def _sample(server: psutil.Process) -> dict[str, float]:
    """The server's whole process tree: `threadline serve` is a supervisor and one worker per CPU,
    and the supervisor alone holds neither the connections nor the memory that matter."""
    totals = {"rss_mb": 0.0, "fds": 0.0, "connections": 0.0, "cpu_s": 0.0}
    for process in process_tree(server):
        try:
            with process.oneshot():
                totals["rss_mb"] += process.memory_info().rss / 2**20
                totals["fds"] += process.num_fds()
                totals["connections"] += len(process.net_connections(kind="tcp"))
                totals["cpu_s"] += sum(process.cpu_times()[:2])
        except psutil.Error:
            continue  # a worker that just exited (and is being replaced)
    return totals


def _fit(values: list[float]) -> tuple[float, float]:
    """Slope per minute and the fitted rise over the window, for the last two thirds."""
    window = values[len(values) // 3 :]
    if len(window) < 2:
        return 0.0, 0.0
    slope, _ = statistics.linear_regression(range(len(window)), window)
    return slope, slope * (len(window) - 1)


async def soak(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    with EmbeddedStack(data_dir) as stack:
        endpoints = stack.endpoints
        _, key = await tenant(endpoints, "soak")
        # A small chunk cache fills during warm-up, so growth after it is not the cache filling.
        process, url = await start_server(
            endpoints, THREADLINE_CHUNK_CACHE_BYTES=str(args.chunk_cache_mb * 2**20)
        )
        server = psutil.Process(process.pid)
        stats = Stats()
        stop = asyncio.Event()
        minutes: list[dict[str, Any]] = []
        headers = {"Authorization": f"Bearer {key}"}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        try:
            async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as client:
                paths = [f"/v1/stream/soak-{uuid.uuid4().hex[:8]}-{i}" for i in range(args.writers)]
                for path in paths:
                    async with client.put(
                        url + path, headers={"Content-Type": "application/json"}
                    ) as response:
                        response.raise_for_status()
                tails = Tails(args.window)
                tasks = [
                    asyncio.create_task(_writer(client, url, p, args.rate, stats, stop, tails)) for p in paths
                ]
                readers_tails = tails if args.start == "recent" else None
                tasks += [
                    asyncio.create_task(_subscriber(client, url, paths, stats, stop, seed, readers_tails))
                    for seed in range(args.subscribers)
                ]
                tasks.append(asyncio.create_task(_lists(client, url, args.lists, stats, stop)))
                tasks.append(asyncio.create_task(_sessions(client, url, args.sessions, stats, stop)))
                print(_header(), flush=True)
                base = _sample(server)
                for minute in range(1, args.minutes + 1):
                    await asyncio.sleep(args.interval)
                    latency, errors = stats.take()
                    sample = _sample(server)
                    row = {
                        "minute": minute,
                        **sample,
                        "cpu_s": sample["cpu_s"] - base["cpu_s"],
                        "latency": {k: (pct(v, 0.5), pct(v, 0.99), len(v)) for k, v in latency.items() if v},
                        "errors": dict(errors),
                    }
                    base = sample
                    minutes.append(row)
                    print(_row(row), flush=True)
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await stop_server(process)
    rss_slope, rss_rise = _fit([m["rss_mb"] for m in minutes])
    fd_slope, fd_rise = _fit([m["fds"] for m in minutes])
    window = minutes[len(minutes) // 3 :]
    rss_mean = statistics.fmean(m["rss_mb"] for m in window) if window else 0.0
    rss_drift = rss_slope > RSS_SLOPE_MB_PER_MIN and rss_rise > RSS_RISE_FRACTION * rss_mean
    fd_drift = fd_rise > FD_RISE
    if len(window) < MIN_WINDOW_MINUTES:
        verdict = f"too short to judge (fewer than {MIN_WINDOW_MINUTES} minutes after warm-up)"
    else:
        verdict = "drift" if rss_drift or fd_drift else "no drift"
    return {
        "config": vars(args),
        "minutes": minutes,
        "rss_slope_mb_per_min": rss_slope,
        "rss_rise_mb": rss_rise,
        "fd_slope_per_min": fd_slope,
        "fd_rise": fd_rise,
        "verdict": verdict,
    }


def _header() -> str:
    cells = "".join(f"{k + ' p50/p99 ms':>24}" for k in KINDS)
    return f"{'min':>4}{'rss MB':>9}{'fds':>6}{'conns':>7}{'cpu s':>7}{cells}  errors"


def _row(row: dict[str, Any]) -> str:
    cells = ""
    for kind in KINDS:
        p50, p99, count = row["latency"].get(kind, (None, None, 0))
        cells += f"{f'{p50:.0f}/{p99:.0f} ({count})' if count else '-':>24}"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "0"
    return (
        f"{row['minute']:>4}{row['rss_mb']:>9.1f}{row['fds']:>6}{row['connections']:>7}{row['cpu_s']:>7.1f}"
        f"{cells}  {errors}"
    )


def table(result: dict[str, Any]) -> str:
    lines = [_header(), *(_row(m) for m in result["minutes"])]
    lines.append(
        f"after warm-up (last 2/3 of {len(result['minutes'])} minutes): RSS {result['rss_slope_mb_per_min']:+.2f} MB/min "
        f"(fitted rise {result['rss_rise_mb']:+.1f} MB), fds {result['fd_slope_per_min']:+.2f}/min "
        f"(fitted rise {result['fd_rise']:+.1f}): {result['verdict'].upper()}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per reported row (a minute)")
    parser.add_argument("--writers", type=int, default=20, help="streams, one writer each")
    parser.add_argument("--rate", type=float, default=10.0, help="appends/s per writer")
    parser.add_argument("--subscribers", type=int, default=20, help="SSE readers connected at any time")
    parser.add_argument(
        "--from",
        dest="start",
        choices=("recent", "start"),
        default="recent",
        help="where readers start: --window records behind the tail (steady work), or each stream's start",
    )
    parser.add_argument("--window", type=int, default=200, help="records a --from recent reader catches up")
    parser.add_argument("--lists", type=float, default=2.0, help="list + count per second")
    parser.add_argument("--sessions", type=float, default=2.0, help="session creates (and closes) per second")
    parser.add_argument(
        "--chunk-cache-mb", type=int, default=8, help="the server's THREADLINE_CHUNK_CACHE_BYTES"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="threadline-soak-") as data_dir:
        result = asyncio.run(soak(args, Path(data_dir)))
    write_results("soak", result, table(result))
    assert REPO  # the results land under the repo's bench/results


if __name__ == "__main__":
    main()
