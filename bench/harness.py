"""What every benchmark here shares: a `threadline serve` process on an embedded stack, a tenant
with a key, and percentiles."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from threadline.auth.keys import bootstrap_environment, create_api_key  # noqa: E402
from threadline.db import apply_migrations  # noqa: E402
from threadline.embedded.ports import free_port  # noqa: E402
from threadline.embedded.stack import StackEndpoints  # noqa: E402


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds of a server and all its processes (`threadline serve` runs one per CPU)."""
    total = 0.0
    for proc in _tree(root):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of a server and all its processes."""
    total = 0
    for proc in _tree(root):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def start_server(endpoints: StackEndpoints, **env: str) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline",
        "serve",
        env={
            **os.environ,
            **endpoints.as_env(),
            "THREADLINE_PORT": str(port),
            "THREADLINE_LOG_LEVEL": "WARNING",
            **env,
        },
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        for _ in range(300):
            try:
                async with client.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return process, url
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not start")


async def stop_server(process: asyncio.subprocess.Process) -> None:
    process.terminate()
    await asyncio.wait_for(process.wait(), 30)


async def tenant(endpoints: StackEndpoints, name: str) -> tuple[Any, str]:
    conn = await asyncpg.connect(endpoints.database_url)
    try:
        await apply_migrations(conn)
        env = await bootstrap_environment(conn, environment=name)
        _, key = await create_api_key(conn, env.id, name)
        return env, key
    finally:
        await conn.close()


def write_results(name: str, result: dict[str, Any], table: str) -> None:
    """Print the table and keep it, with the raw figures, under bench/results/."""
    print(table)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
