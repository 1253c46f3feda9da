"""Sessions REST API benchmark: latency and throughput of create / get / list, next to the floor.

    .venv/bin/python bench/sessions_api.py [--quick]

Starts its own embedded stack and a real `threadline serve` process, then drives it from this
process over HTTP with aiohttp (httpx costs ~2 ms of client CPU per request on this machine,
which would be measured as server latency). The floor is one asyncpg INSERT + commit on the same Postgres, measured in the
same run. Prints a table and writes bench/results/sessions_api.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from harness import pct, start_server, stop_server, tenant, write_results
from threadline.embedded.stack import EmbeddedStack


async def floor(dsn: str, n: int) -> list[float]:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TEMP TABLE floor_t (id text primary key, body jsonb)")
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await conn.execute("INSERT INTO floor_t VALUES ($1, '{}')", f"k{i}")
        samples.append(time.perf_counter() - t)
    await conn.close()
    return samples


async def sequential(client: aiohttp.ClientSession, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create": [], "get": [], "list": []}
    ids = []
    for i in range(n):
        t = time.perf_counter()
        async with client.post("/api/v1/sessions", json={"type": "bench", "tags": ["a", f"t{i % 7}"]}) as r:
            body = await r.json()
        out["create"].append(time.perf_counter() - t)
        assert r.status == 201, body
        ids.append(body["id"])
    for session_id in ids:
        t = time.perf_counter()
        async with client.get(f"/api/v1/sessions/{session_id}") as r:
            await r.read()
        out["get"].append(time.perf_counter() - t)
        assert r.status == 200
    for _ in range(n // 4):
        t = time.perf_counter()
        async with client.get(
            "/api/v1/sessions", params={"filter[tags]": "t3", "filter[status]": "ACTIVE"}
        ) as r:
            await r.read()
        out["list"].append(time.perf_counter() - t)
        assert r.status == 200
    return out


async def throughput(client: aiohttp.ClientSession, total: int, concurrency: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            async with client.post("/api/v1/sessions", json={"type": "bench-tp"}) as r:
                await r.read()
            assert r.status == 201

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def main(quick: bool) -> dict[str, Any]:
    n = 200 if quick else 2000
    with (
        tempfile.TemporaryDirectory(prefix="threadline-bench-") as tmp,
        EmbeddedStack(Path(tmp) / "stack") as stack,
    ):
        endpoints = stack.endpoints
        _, key = await tenant(endpoints, "bench")
        server, base = await start_server(endpoints)
        try:
            async with aiohttp.ClientSession(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
                floor_samples = await floor(endpoints.database_url, n)
                seq = await sequential(c, n)
                rate = await throughput(c, n * 2, 32)
            rss = psutil.Process(server.pid).memory_info().rss / 2**20
        finally:
            await stop_server(server)
    rows = [
        {
            "operation": "floor: asyncpg INSERT + commit",
            "p50_ms": pct(floor_samples, 0.5),
            "p99_ms": pct(floor_samples, 0.99),
        }
    ]
    for name, samples in seq.items():
        rows.append(
            {"operation": f"{name} (sequential)", "p50_ms": pct(samples, 0.5), "p99_ms": pct(samples, 0.99)}
        )
    return {
        "quick": quick,
        "requests_per_op": n,
        "rows": rows,
        "create_throughput_32_concurrent_per_s": rate,
        "create_p50_over_floor": statistics.median(seq["create"]) / statistics.median(floor_samples),
        "server_rss_mib": rss,
    }


def render(result: dict[str, Any]) -> str:
    lines = ["| operation | p50 ms | p99 ms |", "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['operation']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    lines.append("")
    lines.append(
        f"create throughput, 32 concurrent: {result['create_throughput_32_concurrent_per_s']:.0f} sessions/s"
    )
    lines.append(
        f"create p50 / floor p50: {result['create_p50_over_floor']:.1f}x; server RSS {result['server_rss_mib']:.0f} MiB"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.quick))
    write_results("sessions_api", result, render(result))
