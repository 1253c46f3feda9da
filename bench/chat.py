"""The chat-shaped workload: N live chats at once, ramped, on Threadline and both reference peers.

    .venv/bin/python bench/chat.py [--quick] [--workers N] [--procs P] [--sessions 50,100] [--seconds S]
    .venv/bin/python bench/chat.py --url URL --token KEY [--pid PID] [--api realtime|stream] ...
    (or: make bench-chat; `make bench` / `make bench-quick` run it inside bench/compare.py)

A chat is a session with one writer appending one ~100 B JSON record per request at 20 records/s
to its ``out`` channel and one SSE subscriber on that channel. Threadline is driven the way an
agent (the SDK's session channels) and a browser (EventSource) use it: sessions created over
REST, appends to ``/realtime/v1/sessions/<id>/out/append``, the subscriber on
``/realtime/v1/sessions/<id>/out``. The Durable Streams reference server (in memory, and its
durable file store) runs the same load on N plain streams through the protocol.

Per N (full: 50, 100, 200, 500, 1,000; quick: 50, 100, 200) and per server it reports delivery
p50/p99 (append sent -> record received by its subscriber), ack p99, the achieved write rate next
to the offered one, the server's CPU (cores) and peak RSS summed over its whole process tree
(workers included), the embedded stack's CPU (Postgres, SeaweedFS, chDB), and the load
generators' CPU, one process per ``--per-proc`` sessions (200) so that they are not the limit.

A step **holds** when delivery p99 ≤ 100 ms, every writer sent at least 95 % of the records
scheduled in the window (so no writer was held back by more than one record a second), and
every acknowledged record reached its subscriber once and in order, with no failed append.
The headline is the largest N that holds.

Results: a table on stdout and bench/results/chat{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from harness import (
    REPO,
    Target,
    ensure_peer_installed,
    pct,
    start_peer,
    start_server,
    stop_server,
    tenant,
    write_results,
)
from threadline.embedded.stack import EmbeddedStack

CHAT_LOAD = REPO / "bench" / "chat_load.py"
FULL_STEPS = (50, 100, 200, 500, 1000)
QUICK_STEPS = (50, 100, 200)
DELIVERY_P99_MS = 100.0
WRITER_SHARE = 0.95
FILE_HANDLES = 4096  # the file-store peer keeps a stream file open per chat (bench/peer/server.mjs)
RESULT_LINE_LIMIT = 1 << 28  # a generator's result line carries every latency it measured


@dataclass
class Settings:
    steps: tuple[int, ...]
    seconds: float
    settle: float
    rate: float = 20.0
    record_bytes: int = 100
    per_proc: int = 200
    procs: int = 0  # fixed number of generator processes; 0: one per `per_proc` sessions
    py_spy: Path | None = None  # sample Threadline's process tree over each window into this folder

    @classmethod
    def of(cls, quick: bool) -> Settings:
        return cls(QUICK_STEPS, 5.0, 5.0) if quick else cls(FULL_STEPS, 10.0, 10.0)

    def generators(self, sessions: int) -> int:
        return min(sessions, self.procs or math.ceil(sessions / self.per_proc))


# --- resources ----------------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    if pid <= 0:  # a server given by --url without --pid: not sampled
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Usage:
    """CPU seconds and RSS summed over a set of processes that may change while sampled (worker
    processes restart): CPU counts each process from its first sample (a process born during the
    window from zero) to its last."""

    def __init__(self, processes: Callable[[], Iterable[psutil.Process]]) -> None:
        self.processes = processes
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.peak_rss = 0
        self.window_cpu: float | None = None

    def sample(self, *, baseline: bool = False) -> None:
        rss = 0
        for process in self.processes():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            cpu = times.user + times.system
            if baseline or process.pid not in self.first:
                self.first[process.pid] = cpu if baseline else 0.0
            self.last[process.pid] = cpu
        self.peak_rss = max(self.peak_rss, rss)

    def reset(self) -> None:
        self.first, self.last = {}, {}
        self.sample(baseline=True)

    def cpu(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


def stack_processes(exclude: set[int]) -> list[psutil.Process]:
    """The embedded stack's services (Postgres, SeaweedFS, chDB): this process's descendants that
    are neither a server under test nor a load generator."""
    keep = []
    for process in psutil.Process().children(recursive=True):
        if process.pid in exclude:
            continue
        try:
            parents = {parent.pid for parent in process.parents()}
        except psutil.NoSuchProcess:
            continue
        if parents & exclude:
            continue
        keep.append(process)
    return keep


# --- one step -------------------------------------------------------------------------------------


async def _line(stream: asyncio.StreamReader, limit_s: float) -> dict[str, Any]:
    async with asyncio.timeout(limit_s):
        raw = await stream.readline()
    if not raw:
        raise RuntimeError("generator exited")
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


async def run_step(
    target: Target, sessions: int, settings: Settings, run: str, exclude: set[int]
) -> dict[str, Any]:
    """N chats on one server: P generator processes set up their share, then all write during
    the same window; server, stack and generator CPU are taken over that window."""
    count = settings.generators(sessions)
    shares = [sessions // count + (1 if i < sessions % count else 0) for i in range(count)]
    generators: list[asyncio.subprocess.Process] = []
    first = 0
    for share in shares:
        generators.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(CHAT_LOAD),
                *("--url", target.url, "--token", target.token, "--api", target.api),
                *("--sessions", str(share), "--first", str(first), "--run", run),
                *("--rate", str(settings.rate), "--seconds", str(settings.seconds)),
                *("--settle", str(settings.settle), "--record-bytes", str(settings.record_bytes)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=RESULT_LINE_LIMIT,
            )
        )
        first += share
    generator_pids = {g.pid for g in generators}
    server = Usage(lambda: _tree(target.pid))
    stack = Usage(lambda: stack_processes({target.pid, *exclude, *generator_pids}))
    server.reset()
    try:
        ready = [await _line(g.stdout, 300) for g in generators if g.stdout is not None]
        start = time.time() + 2.0  # time to open fresh writer connections (chat_load.py)
        for g in generators:
            assert g.stdin is not None
            g.stdin.write(f"{start}\n".encode())
            await g.stdin.drain()
        results = asyncio.gather(*(_line(g.stdout, 600) for g in generators if g.stdout is not None))
        await asyncio.sleep(max(0.0, start - time.time()))
        server.reset()  # CPU over the writing window only; peak RSS over the whole step
        stack.reset()
        spy = await _start_py_spy(target, sessions, settings)
        end = start + settings.seconds
        while time.time() < end:
            server.sample()
            await asyncio.sleep(min(0.25, max(0.0, end - time.time())))
        server.sample()
        stack.sample()
        window_server_cpu, window_stack_cpu = server.cpu(), stack.cpu()
        while not results.done():
            server.sample()
            await asyncio.wait([results], timeout=0.25)
        outputs: list[dict[str, Any]] = results.result()
    except Exception as exc:  # a failed step is reported as such; the run goes on
        stderr = b""
        for g in generators:
            if g.returncode is None:
                g.kill()
            _, err = await g.communicate()
            stderr += err
        last = stderr.decode().strip().splitlines()[-1:] or [""]
        return {"sessions": sessions, "error": f"{exc!r}: {last[0][:300]}"}
    for g in generators:
        await g.wait()
    summary = summarize(
        sessions, settings, ready, outputs, window_server_cpu, window_stack_cpu, server.peak_rss
    )
    if spy is not None:
        process, raw = spy
        await process.wait()
        summary["profile"] = str(raw)
        summary["profile_self"] = profile_self(raw)
    return summary


async def _start_py_spy(
    target: Target, sessions: int, settings: Settings
) -> tuple[asyncio.subprocess.Process, Path] | None:
    """py-spy on a Python server's whole process tree for the writing window (collapsed stacks,
    one line per stack with its sample count); not for the Node peers."""
    if settings.py_spy is None or target.api == "stream":
        return None
    settings.py_spy.mkdir(parents=True, exist_ok=True)
    raw = settings.py_spy / f"chat-{sessions}-{target.name}.raw"
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--py-spy needs py-spy (.venv/bin/pip install py-spy)")
    process = await asyncio.create_subprocess_exec(
        *(spy, "record", "--pid", str(target.pid), "--subprocesses", "--nonblocking", "--rate", "100"),
        *("--duration", str(math.ceil(settings.seconds)), "--format", "raw", "--output", str(raw)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return process, raw


def profile_self(raw: Path, top: int = 12) -> list[tuple[str, float]]:
    """Self time by function (a stack's last frame without its line number), as shares of all
    samples: where the server's CPU went. The first entry is ("samples", count): a server that
    got little CPU yields few samples, and then the shares say little."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        counts[re.sub(r":\d+\)$", ")", leaf)] += int(count)
    total = sum(counts.values())
    return [("samples", float(total))] + [(frame, n / max(total, 1)) for frame, n in counts.most_common(top)]


def summarize(
    sessions: int,
    settings: Settings,
    ready: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    server_cpu: float,
    stack_cpu: float,
    server_rss: int,
) -> dict[str, Any]:
    deliveries = [d / 1000 for out in outputs for d in out["delivery_ms"]]
    acks = [a / 1000 for out in outputs for a in out["ack_ms"]]
    ratios = [r for out in outputs for r in out["writer_ratios"]]
    writes = sum(out["writes"] for out in outputs)
    window = max(out["window_s"] for out in outputs)
    summary: dict[str, Any] = {
        "sessions": sessions,
        "offered_per_s": sessions * settings.rate,
        "achieved_per_s": writes / settings.seconds,
        "writes": writes,
        "scheduled": sum(out["scheduled"] for out in outputs),
        "writers_at_rate": sum(1 for r in ratios if r >= WRITER_SHARE),
        "min_writer_share": min(ratios),
        "late": sum(out["late"] for out in outputs),
        "errors": sum(out["errors"] for out in outputs),
        "reconnects": sum(out["reconnects"] for out in outputs),
        "missing": sum(out["missing"] for out in outputs),
        "disordered": sum(out["disordered"] for out in outputs),
        "refused_delivered": sum(out["refused_delivered"] for out in outputs),
        "delivery_p50_ms": pct(deliveries, 0.5) if deliveries else None,
        "delivery_p99_ms": pct(deliveries, 0.99) if deliveries else None,
        "delivery_max_ms": max(deliveries) * 1000 if deliveries else None,
        "ack_p50_ms": pct(acks, 0.5) if acks else None,
        "ack_p99_ms": pct(acks, 0.99) if acks else None,
        "server_cpu_cores": server_cpu / settings.seconds,
        "server_rss_mib": server_rss / 2**20,
        "stack_cpu_cores": stack_cpu / settings.seconds,
        "generator_cpu_cores": [out["cpu_s"] / window for out in outputs],
        "setup_s": max(r["setup_s"] for r in ready),
    }
    summary["holds"] = (
        summary["delivery_p99_ms"] is not None
        and summary["delivery_p99_ms"] <= DELIVERY_P99_MS
        and summary["writers_at_rate"] == sessions
        and summary["missing"] == 0
        and summary["disordered"] == 0
        and summary["refused_delivered"] == 0
        and summary["errors"] == 0
    )
    return summary


def largest_holding(steps: list[dict[str, Any]]) -> int:
    """The largest N that holds; 0 if none does. A smaller N that misses is shown in the table."""
    return max((s["sessions"] for s in steps if s.get("holds")), default=0)


# --- the whole ramp -------------------------------------------------------------------------------


async def ramp(targets: list[Target], settings: Settings, exclude: set[int]) -> dict[str, Any]:
    """Every N on every server, N by N (so the servers at one N see the machine in the same
    state); the file-store peer restarts empty before each step. ``exclude``: processes that are
    neither the stack nor a target (compare.py's own peers), left out of the stack's CPU."""
    steps: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for sessions in settings.steps:
        for target in targets:
            if target.data_dir is not None:
                target.restart()
            run = f"{sessions}-{os.urandom(3).hex()}"
            servers = {t.pid for t in targets} | exclude
            result = await run_step(target, sessions, settings, run, servers)
            result["load_avg"] = os.getloadavg()
            steps[target.name].append(result)
            print(f"chat {sessions:>5} {target.name:>12}: {json.dumps(result)}", file=sys.stderr)
    return {
        "rate": settings.rate,
        "seconds": settings.seconds,
        "record_bytes": settings.record_bytes,
        "per_proc": settings.per_proc,
        "procs": settings.procs,
        "steps": steps,
        "largest_holding": {name: largest_holding(s) for name, s in steps.items()},
    }


async def with_peers(
    threadline: Target, settings: Settings, tmp: Path, exclude: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """The ramp on Threadline (already running) and both peers, which it starts and stops."""
    file_dir = tmp / "chat-peer-data"
    file_peer, file_url = start_peer(file_dir, FILE_HANDLES)
    memory_peer, memory_url = start_peer(None)
    targets = [
        threadline,
        Target(
            "peer-file",
            file_url,
            file_peer.pid,
            process=file_peer,
            data_dir=file_dir,
            max_file_handles=FILE_HANDLES,
        ),
        Target("peer-memory", memory_url, memory_peer.pid, process=memory_peer),
    ]
    try:
        return await ramp(targets, settings, set(exclude))
    finally:
        for target in targets[1:]:
            target.stop()


# --- the table ------------------------------------------------------------------------------------

NAMES = {"threadline": "Threadline", "peer-file": "peer, file store", "peer-memory": "peer, in memory"}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _per_record(step: dict[str, Any], cores: str) -> str:
    """CPU per record written and delivered: unlike latency, it hardly moves when other work
    shares the machine, so it says what N the cores could carry."""
    if not step["achieved_per_s"]:
        return "—"
    return f"{step[cores] * 1000 / step['achieved_per_s']:.2f}"


def render(chat: dict[str, Any]) -> str:
    largest = chat["largest_holding"]
    lines = [
        f"Chat-shaped sessions: one writer at {chat['rate']:g} records/s ({chat['record_bytes']} B JSON, one per "
        f"request) and one SSE subscriber per session, {chat['seconds']:g} s per step. Holds: delivery p99 "
        f"≤ {DELIVERY_P99_MS:g} ms, every writer ≥ {WRITER_SHARE:.0%} of its scheduled records, none missing, "
        "failed or out of order.",
        "",
        "Largest N that holds: "
        + "; ".join(
            f"{NAMES.get(name, name)} {n:,}" if n else f"{NAMES.get(name, name)} none"
            for name, n in largest.items()
        )
        + ".",
        "",
        "| sessions | server | delivery p50 / p99 ms | ack p50 / p99 ms | writes/s achieved of offered "
        "(writers ≥ 95 %) | missing / failed / disordered / failed yet delivered | server CPU cores / RSS MiB "
        "| stack CPU cores | server / stack CPU ms per record "
        "| generator CPU cores (procs) | holds | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_n: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for name, steps in chat["steps"].items():
        for step in steps:
            by_n.setdefault(step["sessions"], []).append((name, step))
    for sessions in sorted(by_n):
        for name, s in by_n[sessions]:
            label = NAMES.get(name, name)
            load = " / ".join(f"{x:.1f}" for x in s.get("load_avg", ()))
            if "error" in s:
                lines.append(
                    f"| {sessions:,} | {label} | failed: {s['error'][:120]} | | | | | | | | no | {load} |"
                )
                continue
            gens = s["generator_cpu_cores"]
            lines.append(
                f"| {sessions:,} | {label} | {_ms(s['delivery_p50_ms'])} / {_ms(s['delivery_p99_ms'])} "
                f"| {_ms(s['ack_p50_ms'])} / {_ms(s['ack_p99_ms'])} "
                f"| {s['achieved_per_s']:,.0f} of {s['offered_per_s']:,.0f} ({s['writers_at_rate']:,} of {sessions:,}) "
                f"| {s['missing']} / {s['errors']} / {s['disordered']} / {s['refused_delivered']} "
                f"| {s['server_cpu_cores']:.2f} / {s['server_rss_mib']:.0f} | {s['stack_cpu_cores']:.2f} "
                f"| {_per_record(s, 'server_cpu_cores')} / {_per_record(s, 'stack_cpu_cores')} "
                f"| {sum(gens):.2f} ({len(gens)}) | {'yes' if s['holds'] else 'no'} | {load} |"
            )
    profiled = [(n, name, s) for n, rows in sorted(by_n.items()) for name, s in rows if s.get("profile_self")]
    if profiled:
        lines += ["", "Server self time by function over the window (py-spy, all processes, top 6):", ""]
        for sessions, name, s in profiled:
            (_, samples), *frames = s["profile_self"]
            top = "; ".join(f"{frame} {share:.0%}" for frame, share in frames[:6])
            lines.append(f"- {sessions:,} {NAMES.get(name, name)} ({samples:,.0f} samples): {top}")
    return "\n".join(lines)


# --- standalone -----------------------------------------------------------------------------------


async def standalone(settings: Settings, workers: int | None, api: str = "realtime") -> dict[str, Any]:
    ensure_peer_installed()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 sockets per chat on each side
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStack(Path(tmp) / "stack") as stack:
        endpoints = stack.endpoints
        _, key = await tenant(endpoints, "bench-chat")
        env = {"THREADLINE_WORKERS": str(workers)} if workers else {}
        process, url = await start_server(endpoints, **env)
        try:
            threadline = Target("threadline", url, process.pid, key, api=api)
            chat = await with_peers(threadline, settings, Path(tmp))
        finally:
            await stop_server(process)
    chat["workers"] = workers
    chat["cpus"] = os.cpu_count()
    return chat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options compare.py shares."""
    parser.add_argument(
        "--workers", type=int, default=None, help="sets THREADLINE_WORKERS for the server it starts"
    )
    parser.add_argument("--procs", type=int, default=0, help="chat: generator processes (default: 1 per 200)")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="chat: sample Threadline with py-spy over each window (DIR/chat-N-threadline.raw)",
    )


async def external(settings: Settings, url: str, token: str, pid: int, api: str) -> dict[str, Any]:
    """The ramp on a server someone else started (for profiling it): no stack, no peers."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    chat = await ramp([Target("server", url, pid, token, api=api)], settings, set())
    chat["cpus"] = os.cpu_count()
    return chat


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 50, 100, 200 for 5 s each")
    add_arguments(parser)
    parser.add_argument(
        "--sessions", default="", help="comma-separated N instead of the ramp (prints, writes no results)"
    )
    parser.add_argument("--seconds", type=float, default=0, help="writing window per step (same)")
    parser.add_argument("--url", help="drive this running server instead (no stack, no peers, no files)")
    parser.add_argument("--token", default="", help="with --url: its API key")
    parser.add_argument("--pid", type=int, default=0, help="with --url: its pid, for CPU and RSS")
    parser.add_argument(
        "--api",
        default="realtime",
        choices=["realtime", "sessions-stream", "stream"],
        help="how Threadline (or the --url server) is driven; see bench/chat_load.py",
    )
    args = parser.parse_args()
    settings = Settings.of(args.quick)
    settings.procs, settings.py_spy = args.procs, args.py_spy
    if args.sessions:
        settings.steps = tuple(int(n) for n in args.sessions.split(","))
    if args.seconds:
        settings.seconds = args.seconds
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.url:
        print(render(asyncio.run(external(settings, args.url, args.token, args.pid, args.api))))
        return
    chat = asyncio.run(standalone(settings, args.workers, args.api))
    chat["api"] = args.api
    chat["started"], chat["quick"] = started, args.quick
    header = f"({'quick' if args.quick else 'full'} run, {chat['cpus']} CPUs, {started})\n\n"
    if args.sessions or args.seconds:  # not the standard ramp: print only, keep the results
        print(header + render(chat))
        return
    write_results("chat" + ("_quick" if args.quick else ""), chat, header + render(chat))


if __name__ == "__main__":
    main()
