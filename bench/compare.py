"""Threadline next to the Durable Streams reference server and the cost floor, in one run.

    .venv/bin/python bench/compare.py [--quick]        (or: make bench / make bench-quick)

Starts everything itself: an embedded stack (Postgres, SeaweedFS, chDB) in a temporary directory,
`threadline serve`, and the reference server (npm `@durable-streams/server`, installed into
bench/peer by `npm ci` if missing) twice: in memory, and with its file store. Every workload runs
in a separate load-generator process (bench/loadgen.py) against each server in turn, through the
same protocol; the orchestrator samples the server's RSS and CPU while it runs. The floor (S3 PUT,
Postgres commit, on the same stack) is measured in the same run. The full run adds the list and
replication-lag benchmark (bench/list_replication.py, its own stack). Last, the chat-shaped ramp
(bench/chat.py: N sessions, each one writer at 20 records/s and one SSE subscriber) on the same
server and both peers. Results: one table on stdout and bench/results/compare{,_quick}.{json,md}.

    --workers N   sets THREADLINE_WORKERS for the `threadline serve` it starts (multi-worker servers)
    --procs P     the chat ramp's load-generator processes (default: one per 200 sessions)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import obstore
import psutil
from obstore.store import S3Store

import chat
from harness import (
    REPO,
    Target,
    ensure_peer_installed,
    pct,
    start_peer,
    start_server,
    stop_server,
    tenant,
    tree_cpu_seconds,
    tree_rss,
    write_results,
)
from threadline.embedded.stack import EmbeddedStack, StackEndpoints

LOADGEN = REPO / "bench" / "loadgen.py"


@dataclass
class Workload:
    key: str
    title: str
    args: list[str]
    per_request: int = 0  # throughput rows: records per request (the floor is per request)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def _throughput(key: str, streams: int, per_request: int, in_flight: int, seconds: str) -> Workload:
    unit = "1 per request" if per_request == 1 else f"{per_request} per request"
    where = "1 stream" if streams == 1 else f"{streams} streams"
    return Workload(
        key,
        f"200 B records, {unit}, {where}, {in_flight} in flight",
        [
            *("throughput", "--streams", str(streams), "--per-request", str(per_request)),
            *("--in-flight", str(in_flight), "--seconds", seconds),
        ],
        per_request=per_request,
    )


def workloads(quick: bool) -> list[Workload]:
    seconds = "2" if quick else "10"
    return [
        Workload(
            "latency",
            "append 1 KiB, 1 producer, sequential",
            ["latency", "--requests", "200" if quick else "1000"],
        ),
        _throughput("tp_1x100", streams=100, per_request=1, in_flight=64, seconds=seconds),
        _throughput("tp_100x100", streams=100, per_request=100, in_flight=16, seconds=seconds),
        _throughput("tp_100x1", streams=1, per_request=100, in_flight=16, seconds=seconds),
        Workload(
            "live",
            ("100" if quick else "1,000") + " SSE subscribers, 1 writer at 20 records/s",
            [
                "live",
                "--subscribers",
                "100" if quick else "1000",
                "--rate",
                "20",
                "--seconds",
                "3" if quick else "10",
            ],
        ),
        Workload(
            "replay",
            ("10,000" if quick else "100,000") + " x 200 B catch-up from -1, 1 reader / 10 at once",
            ["replay", "--records", "10000" if quick else "100000", "--readers", "10"],
        ),
    ]


# --- the floor --------------------------------------------------------------------------------


async def floor(
    endpoints: StackEndpoints, samples: int, seconds: float, replay_records: int
) -> dict[str, Any]:
    """What a durable append cannot beat on this stack: one object PUT and one Postgres commit."""
    env = endpoints.as_env()
    store = S3Store(
        env["THREADLINE_S3_BUCKET"],
        endpoint=env["THREADLINE_S3_ENDPOINT"],
        region="us-east-1",
        access_key_id=env["THREADLINE_S3_ACCESS_KEY_ID"],
        secret_access_key=env["THREADLINE_S3_SECRET_ACCESS_KEY"],
        allow_http=True,
    )
    pool = await asyncpg.create_pool(endpoints.database_url, min_size=1, max_size=64)
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, key text)")
    body = secrets.token_bytes(1024)
    put_s, commit_s, both_s = [], [], []
    async with pool.acquire() as conn:
        for i in range(samples):
            t0 = time.perf_counter()
            await obstore.put_async(store, f"bench-floor/{i}-{secrets.token_hex(4)}", body)
            t1 = time.perf_counter()
            await conn.execute("INSERT INTO bench_floor (key) VALUES ('k')")
            t2 = time.perf_counter()
            put_s.append(t1 - t0)
            commit_s.append(t2 - t1)
            both_s.append(t2 - t0)
    # One PUT + one commit per request, 64 at once: the naive durable append's ceiling.
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                await obstore.put_async(store, f"bench-floor/{secrets.token_hex(8)}", body[:200])
                await conn.execute("INSERT INTO bench_floor (key) VALUES ('k')")
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(64)))
    concurrent = done / (time.perf_counter() - started)
    # Replay floor: the bytes of the replay workload in one object GET.
    blob = secrets.token_bytes(200 * replay_records)
    await obstore.put_async(store, "bench-floor/replay", blob)
    t0 = time.perf_counter()
    await (await obstore.get_async(store, "bench-floor/replay")).bytes_async()
    get_seconds = time.perf_counter() - t0
    await pool.close()
    return {
        "put_p50_ms": pct(put_s, 0.5),
        "put_p99_ms": pct(put_s, 0.99),
        "commit_p50_ms": pct(commit_s, 0.5),
        "commit_p99_ms": pct(commit_s, 0.99),
        "put_commit_p50_ms": pct(both_s, 0.5),
        "put_commit_p99_ms": pct(both_s, 0.99),
        "put_commit_64_in_flight_per_s": concurrent,
        "get_replay_bytes_s": get_seconds,
        "replay_bytes": len(blob),
    }


# --- servers ----------------------------------------------------------------------------------


# --- running one workload -------------------------------------------------------------------


async def run_load(target: Target, workload: Workload) -> dict[str, Any]:
    """One load-generator process; the server's peak RSS and CPU are sampled meanwhile."""
    server = psutil.Process(target.pid)
    cpu0 = tree_cpu_seconds(server)
    peak_rss = tree_rss(server)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(LOADGEN),
        "--url",
        target.url,
        "--token",
        target.token,
        *workload.args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    started = time.perf_counter()
    communicate = asyncio.ensure_future(process.communicate())
    while not communicate.done():
        peak_rss = max(peak_rss, tree_rss(server))
        await asyncio.wait([communicate], timeout=0.2)
    stdout, stderr = communicate.result()
    wall = time.perf_counter() - started
    cpu1 = tree_cpu_seconds(server)
    if process.returncode != 0:
        return {"error": stderr.decode()[-500:]}
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    result["server_rss_mib"] = peak_rss / 2**20
    result["server_cpu_s"] = cpu1 - cpu0
    result["wall_s"] = wall
    return result


# --- the table --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}" if value < 1000 else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}×"


def _headline(key: str, result: dict[str, Any]) -> tuple[float | None, str]:
    """The row's main figure and how it reads."""
    if "error" in result:
        return None, "failed"
    if key == "latency":
        return result["p50_ms"], f"p50 {_fmt(result['p50_ms'], 2)} / p99 {_fmt(result['p99_ms'], 2)} ms"
    if key.startswith("tp_"):
        return result["records_per_s"], f"{_fmt(result['records_per_s'], 0)} rec/s"
    if key == "live":
        return result["delivery_p99_ms"], (
            f"delivery p50 {_fmt(result['delivery_p50_ms'])} / p99 {_fmt(result['delivery_p99_ms'])} ms; "
            f"writer {_fmt(result['achieved_rate'])}/s, ack p99 {_fmt(result['ack_p99_ms'])} ms; "
            f"missing {result['missing']}"
        )
    return result["one_reader_s"], f"{result['one_reader_s']:.2f} s / {result['many_readers_s']:.2f} s"


TARGETS_TEXT = {
    "latency": "p50 ≤ 1.5× floor (≈5 ms), p99 ≤ 20 ms",
    "tp_1x100": "≥ 5,000 rec/s",
    "tp_100x100": "≥ 120,000 rec/s",
    "tp_100x1": "≥ 20,000 rec/s",
    "live": "p99 ≤ 100 ms, writer never slowed (1,000 subs)",
    "replay": "≤ 0.4 s / ≤ 3 s",
}


def _floor_for(key: str, per_request: int, fl: dict[str, Any]) -> tuple[float | None, str]:
    if key == "latency":
        return fl["put_commit_p50_ms"], f"PUT+commit p50 {fl['put_commit_p50_ms']:.2f} ms"
    if key.startswith("tp_"):
        # A naive durable append: one PUT + one commit per request, 64 requests at once.
        records = fl["put_commit_64_in_flight_per_s"] * per_request
        return records, f"{records:,.0f} rec/s (1 PUT+commit per request, 64 in flight)"
    if key == "replay":
        return fl[
            "get_replay_bytes_s"
        ], f"one {fl['replay_bytes'] / 1e6:.0f} MB GET {fl['get_replay_bytes_s']:.2f} s"
    return None, "—"


def render(result: dict[str, Any]) -> str:
    fl = result["floor"]
    lines = [
        f"Threadline vs Durable Streams reference server {result['peer_version']} "
        f"({'quick' if result['quick'] else 'full'} run, {result['cpus']} CPUs, {result['started']})",
        "",
        f"Floor on this stack: 1 KiB S3 PUT p50 {fl['put_p50_ms']:.2f} / p99 {fl['put_p99_ms']:.2f} ms; "
        f"Postgres INSERT+commit p50 {fl['commit_p50_ms']:.2f} / p99 {fl['commit_p99_ms']:.2f} ms; "
        f"both p50 {fl['put_commit_p50_ms']:.2f} / p99 {fl['put_commit_p99_ms']:.2f} ms.",
        "",
        "| workload | Threadline | peer, file store (durable) | peer, in memory (not durable) "
        "| TL / peer file | TL / floor | floor | SPEC target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["workloads"]:
        key = row["key"]
        figures = {name: _headline(key, res) for name, res in row["results"].items()}
        tl, peer_file = figures.get("threadline", (None, "—")), figures.get("peer-file", (None, "—"))
        peer_mem = figures.get("peer-memory", (None, "—"))
        floor_value, floor_text = _floor_for(key, row.get("per_request", 0), fl)
        lines.append(
            f"| {row['title']} | {tl[1]} | {peer_file[1]} | {peer_mem[1]} | {_ratio(tl[0], peer_file[0])} "
            f"| {_ratio(tl[0], floor_value)} | {floor_text} | {TARGETS_TEXT[key]} |"
        )
    lines += [
        "",
        "Resources while each workload ran (server peak RSS MiB / server CPU s / load generator CPU s over wall s):",
        "",
    ]
    lines += ["| workload | Threadline | peer, file store | peer, in memory |", "|---|---|---|---|"]
    for row in result["workloads"]:
        cells = []
        for name in ("threadline", "peer-file", "peer-memory"):
            res = row["results"].get(name, {})
            if "server_rss_mib" not in res:
                cells.append("—")
                continue
            cells.append(
                f"{res['server_rss_mib']:.0f} MiB / {res['server_cpu_s']:.1f} s / "
                f"{res['loadgen_cpu_s']:.1f} of {res['loadgen_wall_s']:.1f} s"
            )
        lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    if result.get("chat"):
        lines += ["", chat.render(result["chat"])]
    lists = result.get("lists")
    if lists:
        lines += ["", "Lists and replication (bench/list_replication.py, same command):", ""]
        lines += [
            "| query on "
            + f"{lists['lists']['sessions']:,} sessions | ClickHouse p50 / p99 ms | Postgres p50 / p99 ms | SPEC target |",
            "|---|---|---|---|",
        ]
        by_query: dict[str, dict[str, Any]] = {}
        for item in lists["lists"]["rows"]:
            by_query.setdefault(item["query"], {})[item["source"]] = item
        for query, sources in by_query.items():
            ch, pg = sources.get("clickhouse", {}), sources.get("postgres", {})
            lines.append(
                f"| {query} | {_fmt(ch.get('p50_ms'))} / {_fmt(ch.get('p99_ms'))} "
                f"| {_fmt(pg.get('p50_ms'))} / {_fmt(pg.get('p99_ms'))} | p50 ≤ 50, p99 ≤ 200 |"
            )
        lag = lists["lag"]
        lines.append(
            f"| replication lag at {lag['offered_writes_per_s']} writes/s | p50 {lag['lag_p50_ms']:.0f} / "
            f"p99 {lag['lag_p99_ms']:.0f} ms (max {lag['lag_max_ms']:.0f}, missing {lag['missing']}) | — | p99 ≤ 1,000 ms |"
        )
    elif result["quick"]:
        lines += [
            "",
            "Lists and replication lag: full run only (`make bench`); they load 1,000,000 sessions.",
        ]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


async def compare(quick: bool, workers: int | None, procs: int, py_spy: Path | None) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 SSE sockets on each side
    peer_version = ensure_peer_installed()
    plan = workloads(quick)
    result: dict[str, Any] = {
        "quick": quick,
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "peer_version": peer_version,
        "workers": workers,
    }
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStack(Path(tmp) / "stack") as stack:
        endpoints = stack.endpoints
        _, key = await tenant(endpoints, "bench-compare")
        result["floor"] = await floor(
            endpoints, 100 if quick else 1000, 1 if quick else 5, 10_000 if quick else 100_000
        )
        process, url = await start_server(
            endpoints, **({"THREADLINE_WORKERS": str(workers)} if workers else {})
        )
        peer_dir = Path(tmp) / "peer-data"
        file_peer, file_url = start_peer(peer_dir)
        memory_peer, memory_url = start_peer(None)
        targets = [
            Target("threadline", url, process.pid, key),
            Target("peer-file", file_url, file_peer.pid, process=file_peer, data_dir=peer_dir),
            Target("peer-memory", memory_url, memory_peer.pid, process=memory_peer),
        ]
        try:
            for index, workload in enumerate(plan):
                for target in targets:
                    if target.data_dir is not None and index > 0:
                        target.restart()
                    workload.results[target.name] = await run_load(target, workload)
                    print(
                        f"{workload.key:>11} {target.name:>12}: {json.dumps(workload.results[target.name])}",
                        file=sys.stderr,
                    )
            settings = chat.Settings.of(quick)
            settings.procs, settings.py_spy = procs, py_spy
            ours = frozenset(t.pid for t in targets[1:])  # this run's idle peers: not the stack
            result["chat"] = await chat.with_peers(
                Target("threadline", url, process.pid, key, api="realtime"),
                settings,
                Path(tmp),
                exclude=ours,
            )
        finally:
            await stop_server(process)
            for target in targets:
                if target.process is not None:
                    target.process.terminate()
                    target.process.wait(15)
    result["workloads"] = [
        {"key": w.key, "title": w.title, "per_request": w.per_request, "results": w.results} for w in plan
    ]
    return result


def main(quick: bool, workers: int | None, procs: int, py_spy: Path | None) -> None:
    result = asyncio.run(compare(quick, workers, procs, py_spy))
    name = "compare" + ("_quick" if quick else "")
    write_results(name, result, render(result))  # first: a failure below must not lose these rows
    if not quick:
        subprocess.run([sys.executable, str(REPO / "bench" / "list_replication.py")], check=True)
        result["lists"] = json.loads((REPO / "bench" / "results" / "list_replication.json").read_text())
        write_results(name, result, render(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes; about two minutes")
    chat.add_arguments(parser)
    args = parser.parse_args()
    main(args.quick, args.workers, args.procs, args.py_spy)
