"""Which HTTP server, and how many workers: appends/s and server CPU per append, A/B.

    .venv/bin/threadline dev --data-dir /tmp/wk --workers 1 &      # any running stack
    .venv/bin/python bench/workers.py --data-dir /tmp/wk [--servers uvicorn,granian]
        [--workers 1,2] [--seconds 15] [--rounds 2]

For each server and worker count, in turn and back to back, it starts a server on the dev
stack (``threadline serve --workers N``, or granian with N workers running the same app),
drives ``bench/loadgen.py throughput`` (200 B JSON records, 1 per request, 100 streams,
64 in flight) at it, and reports records/s with the server's CPU seconds (the supervisor and
every worker, from /proc) per append. Latency on a shared 2-core machine is noise; CPU per
append is the figure to compare. granian needs ``pip install granian`` (not a dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness import tree_cpu_seconds

HERE = Path(__file__).resolve().parent


def granian_app() -> Any:
    """The app as granian's factory target (``workers:granian_app``), configured from the env."""
    from threadline.api.app import create_app
    from threadline.config import Settings
    from threadline.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def _start(server: str, workers: int, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    if server == "uvicorn":
        command = [sys.executable, "-m", "threadline", "serve", "--workers", str(workers)]
    else:
        command = [
            str(Path(sys.executable).parent / "granian"),
            "--interface", "asgi", "--factory", "--no-ws", "--loop", "uvloop",
            "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
            "--working-dir", str(HERE), "--no-access-log",
            "workers:granian_app",
        ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server} did not start: {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_one(
    server: str, workers: int, args: argparse.Namespace, stack_env: dict[str, str], key: str
) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, **stack_env, "THREADLINE_PORT": str(port), "THREADLINE_LOG_LEVEL": "WARNING"}
    proc = _start(server, workers, port, env, Path(f"/tmp/bench-workers-{server}-{workers}.log"))
    try:
        root = psutil.Process(proc.pid)
        cpu0, load0 = tree_cpu_seconds(root), os.getloadavg()[0]
        out = subprocess.run(
            [
                sys.executable, str(HERE / "loadgen.py"), "--url", f"http://127.0.0.1:{port}", "--token", key,
                "throughput", "--per-request", "1", "--streams", "100", "--in-flight", "64",
                "--seconds", str(args.seconds),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed against {server} ×{workers}: {out.stderr[-1500:]}")
        cpu = tree_cpu_seconds(root) - cpu0
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        # Appends per group commit (the batching each worker achieves on its own); /metrics covers
        # every worker only under `threadline serve` (granian's workers each report their own).
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        if server == "uvicorn" or workers == 1:
            flushes = _counter(metrics, "threadline_stream_flushes_total")
            result["appends_per_flush"] = round(
                _counter(metrics, "threadline_stream_records_total") / flushes, 1
            )
    finally:
        _stop(proc)
    requests = int(result["requests"])
    return {
        "server": server,
        "workers": workers,
        "records_per_s": round(result["records_per_s"]),
        "server_cpu_ms_per_append": round(cpu * 1000 / max(1, requests), 3),
        "server_cores_busy": round(cpu / result["seconds"], 2),
        "appends_per_flush": result.get("appends_per_flush"),
        "loadgen_cpu_s": round(result["loadgen_cpu_s"], 1),
        "load_average_1m": round(load0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="a running `threadline dev` data dir")
    parser.add_argument("--servers", default="uvicorn,granian")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    stack_env = _env_file(args.data_dir / "endpoints.env")
    key = (args.data_dir / "dev-key").read_text().strip()
    for _ in range(args.rounds):
        for server in args.servers.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                print(json.dumps(run_one(server, workers, args, stack_env, key)), flush=True)


if __name__ == "__main__":
    main()
