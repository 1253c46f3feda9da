"""``threadline serve --workers 2``: a killed worker is replaced while the port keeps serving, and
SIGTERM drains every worker (acknowledged appends kept, SSE readers ended cleanly, exit 0)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ServeProcess, Tenant, bearer, eventually, read_json_stream
from threadline.embedded.stack import StackEndpoints

JSON = {"Content-Type": "application/json"}


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, text[:2000]
    return float(match.group(1))


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(
    stack: StackEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    server = ServeProcess(stack, log, workers=2)
    try:
        workers = eventually(lambda: (pids := server.worker_pids()) and len(pids) == 2 and pids, timeout=60)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> list[int] | None:
            pids = server.worker_pids()
            return pids if len(pids) == 2 and victim not in pids else None

        now = eventually(replaced, timeout=60)
        assert workers[1] in now  # the other worker was left alone
        eventually(lambda: "worker died; restarted" in log.read_text(), timeout=30)
        assert server.proc.poll() is None

        # Both workers answer: enough appends that the kernel hands connections to each.
        path = f"/v1/stream/workers-{os.urandom(4).hex()}"
        headers = {**bearer(tenant.key), **JSON}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:

            def created() -> bool:
                return c.put(path).status_code in (200, 201)

            eventually(created, timeout=60)  # the replacement may still be starting
            for i in range(40):
                with httpx.Client(base_url=server.url, headers=headers, timeout=30) as fresh:
                    response = fresh.post(path, content=json.dumps({"i": i}))
                assert response.status_code in (200, 204), response.text
            assert read_json_stream(c, path) == [{"i": i} for i in range(40)]
        # /metrics (whichever worker answers) counts every worker's appends, the dead one's too.
        assert _metric(server.url, "threadline_stream_records_total") >= 40
    finally:
        server.stop()
    assert server.proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_drains_every_worker_keeps_acknowledged_appends_and_exits_0(
    stack: StackEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    server = ServeProcess(stack, log, workers=2)
    headers = {**bearer(tenant.key), **JSON}
    streams = [f"/v1/stream/drain-{os.urandom(4).hex()}" for _ in range(4)]
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as setup:
        for path in streams:
            assert setup.put(path).status_code == 201
    acked: dict[str, list[int]] = {path: [] for path in streams}
    stop_producing = threading.Event()

    def produce(path: str) -> None:
        # One connection per request, so the appends spread over both workers.
        seq = 0
        while not stop_producing.is_set():
            producer = {"Producer-Id": f"p-{path}", "Producer-Epoch": "0", "Producer-Seq": str(seq)}
            try:
                with httpx.Client(base_url=server.url, headers=headers, timeout=30) as own:
                    response = own.post(path, headers=producer, content=json.dumps({"seq": seq}))
            except httpx.TransportError:
                return  # the server is going away: this append was not acknowledged
            if response.status_code in (200, 204):
                acked[path].append(seq)
                seq += 1
            elif response.status_code != 503:
                raise AssertionError(f"{response.status_code} {response.text}")

    sse_outcome: dict[str, Any] = {}

    def subscribe() -> None:
        events = 0
        try:
            with (
                httpx.Client(base_url=server.url, headers=bearer(tenant.key), timeout=60) as sse,
                sse.stream("GET", streams[0], params={"offset": "-1", "live": "sse"}) as response,
            ):
                sse_outcome["status"] = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events += 1
            sse_outcome["ended"] = "cleanly"
        except httpx.HTTPError as exc:
            sse_outcome["ended"] = repr(exc)
        sse_outcome["events"] = events

    reader = threading.Thread(target=subscribe, daemon=True)
    reader.start()
    threads = [threading.Thread(target=produce, args=(path,), daemon=True) for path in streams]
    for thread in threads:
        thread.start()
    eventually(lambda: sum(len(v) for v in acked.values()) >= 60, timeout=120, interval=0.01)
    eventually(lambda: sse_outcome.get("status") == 200, timeout=30)
    workers = server.worker_pids()
    assert len(workers) == 2
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        stop_producing.set()
        server.stop()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    reader.join(60)
    assert not reader.is_alive()
    assert sse_outcome["ended"] == "cleanly", sse_outcome
    assert sse_outcome["events"] > 0, sse_outcome
    assert not [pid for pid in workers if psutil.pid_exists(pid)]  # the supervisor waited for them

    restarted = ServeProcess(stack, tmp_path / "after.log")
    try:
        with httpx.Client(base_url=restarted.url, headers=headers, timeout=30) as c:
            for path in streams:
                values = [value["seq"] for value in read_json_stream(c, path)]
                done = acked[path]
                assert done == list(range(len(done)))
                # Every acknowledged append is there once, in order; at most the one append in
                # flight when the connection went may have committed without its answer.
                assert values[: len(done)] == done, f"{path}: {values[:20]}"
                assert len(values) <= len(done) + 1, f"{path}: {len(values)} values, {len(done)} acked"
    finally:
        restarted.stop()
