"""What every benchmark here shares: a `threadline serve` process on an embedded stack, a tenant
with a key, the reference peer server, and percentiles."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO / "bench" / "peer"
sys.path.insert(0, str(REPO / "src"))

from threadline.auth.keys import bootstrap_environment, create_api_key  # noqa: E402
from threadline.db import apply_migrations  # noqa: E402
from threadline.embedded.ports import free_port  # noqa: E402
from threadline.embedded.processes import setpriv_prefix  # noqa: E402
from threadline.embedded.stack import StackEndpoints  # noqa: E402


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """A server and every process under it (`threadline serve` is a supervisor and its workers)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds of a server and all its processes (`threadline serve` runs one per CPU)."""
    total = 0.0
    for proc in process_tree(root):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of a server and all its processes."""
    total = 0
    for proc in process_tree(root):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def start_server(endpoints: StackEndpoints, **env: str) -> tuple[asyncio.subprocess.Process, str]:
    """`threadline serve` on the stack, with a parent-death signal: a bench killed or
    interrupted takes its server (and so the server's workers) with it instead of orphaning it."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *setpriv_prefix(death_signal=signal.SIGTERM),
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


def ensure_peer_installed() -> str:
    """Install the reference server into bench/peer if missing; its version."""
    if not (PEER_DIR / "node_modules" / "@durable-streams" / "server").exists():
        if shutil.which("npm") is None:
            raise SystemExit("the peer needs node and npm on PATH (see README)")
        subprocess.run(
            ["npm", "ci", "--prefix", str(PEER_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            check=True,
        )
    package = PEER_DIR / "node_modules/@durable-streams/server/package.json"
    version: str = json.loads(package.read_text())["version"]
    return version


def start_peer(data_dir: Path | None, max_file_handles: int = 0) -> tuple[subprocess.Popen[str], str]:
    """The reference server (bench/peer/server.mjs): in memory, or its file store in ``data_dir``
    keeping up to ``max_file_handles`` stream files open (0: the package's 100)."""
    command = ["node", str(PEER_DIR / "server.mjs"), "--port", "0", "--long-poll-timeout-ms", "30000"]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
        if max_file_handles:
            command += ["--max-file-handles", str(max_file_handles)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("listening "):
        process.kill()
        raise RuntimeError(f"peer did not start: {line!r}")
    return process, line.removeprefix("listening ").rstrip("/")


@dataclass
class Target:
    """A server under test: Threadline (started by the caller) or a peer this object owns."""

    name: str
    url: str
    pid: int
    token: str = ""
    api: str = "stream"  # how bench/chat_load.py talks to it
    process: subprocess.Popen[str] | None = None
    data_dir: Path | None = None  # a file-store peer: restarted empty before every workload
    max_file_handles: int = 0

    def restart(self) -> None:
        """The reference file store keeps at most 100 open stream files (``maxFileHandles``,
        not settable through DurableStreamTestServer); past that its appends answer 404. Each
        workload therefore gets a fresh, empty peer, so none sees more streams than it creates."""
        assert self.process is not None
        assert self.data_dir is not None
        self.process.terminate()
        self.process.wait(15)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.process, self.url = start_peer(self.data_dir, self.max_file_handles)
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)


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
