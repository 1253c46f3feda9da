"""`threadline dev` as a user runs it: a real process, its printed curl, and a clean exit."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.slow


class DevProcess:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threadline", "dev", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=data_dir.parent,
            env={**os.environ, "THREADLINE_LOG_FORMAT": "json"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream: object, sink: list[str], announce: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)
            if announce:
                self.lines.put(line)

    def wait_banner(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError("dev exited early:\n" + "".join(self.stderr[-30:])) from None
                continue
            text = "".join(self.stdout)
            if "Ctrl-C stops" in text:
                return text
        raise AssertionError("no banner within timeout:\n" + "".join(self.stderr[-30:]))


def stack_processes(data_dir: Path) -> list[psutil.Process]:
    """Every live process that belongs to a stack in ``data_dir``."""
    marker = str(data_dir)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_processes(data_dir: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while stack_processes(data_dir):
        if time.monotonic() > deadline:
            left = [(p.pid, " ".join(p.cmdline())[:120]) for p in stack_processes(data_dir)]
            raise AssertionError(f"orphan processes: {left}")
        time.sleep(0.2)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "devdata"
    yield path
    for proc in stack_processes(path):  # never leak processes into other tests
        proc.kill()


def run_printed_curl(banner: str) -> dict[str, object]:
    lines = banner.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    command = []
    for line in lines[start:]:
        command.append(line)
        if not line.rstrip().endswith("\\"):
            break
    out = subprocess.run(
        ["bash", "-c", "\n".join(command) + " -w '\\n%{http_code}'"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "201", out.stdout + out.stderr
    result: dict[str, object] = json.loads(body)
    return result


def test_dev_serves_prints_a_working_curl_and_stops_cleanly_on_sigterm(data_dir: Path) -> None:
    dev = DevProcess(data_dir, "--port", "0")
    banner = dev.wait_banner()
    key = re.search(r"API key\s+(tl_sk_\S+)", banner)
    assert key is not None, banner
    session = run_printed_curl(banner)
    assert session["externalId"] == "my-first-chat"
    assert str(session["id"]).startswith("session_")
    assert len(stack_processes(data_dir)) >= 3  # postgres (and its workers), weed, chdb sidecar
    dev.proc.send_signal(signal.SIGTERM)
    assert dev.proc.wait(timeout=60) == 0
    wait_no_processes(data_dir)
    assert not (data_dir / "endpoints.env").exists()
    for line in dev.stderr:
        if line.strip():
            json.loads(line)  # every log line is one JSON object

    # Data and the key survive a restart (this time stopped with Ctrl-C, i.e. SIGINT).
    again = DevProcess(data_dir, "--port", "0")
    banner2 = again.wait_banner()
    assert key.group(1) in banner2
    again.proc.send_signal(signal.SIGINT)
    assert again.proc.wait(timeout=60) == 0
    wait_no_processes(data_dir)


def test_sigkill_of_dev_leaves_no_orphans(data_dir: Path) -> None:
    dev = DevProcess(data_dir, "--port", "0")
    dev.wait_banner()
    assert stack_processes(data_dir)
    dev.proc.kill()
    dev.proc.wait(timeout=10)
    wait_no_processes(data_dir)


def test_busy_port_is_a_clear_error(data_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        dev = DevProcess(data_dir, "--port", str(port))
        assert dev.proc.wait(timeout=60) == 1
    time.sleep(0.2)
    message = "".join(dev.stderr)
    assert str(port) in message
    assert "in use" in message
    wait_no_processes(data_dir)


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    dev = DevProcess(not_a_dir, "--port", "0")
    assert dev.proc.wait(timeout=60) == 1
    time.sleep(0.2)
    assert "error:" in "".join(dev.stderr)


def _service_process(data_dir: Path, service: str, dev_pid: int) -> psutil.Process | None:
    """The live main process of one embedded service of the dev launcher ``dev_pid``."""
    for proc in psutil.Process(dev_pid).children():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        program = Path(cmdline[0]).name if cmdline else ""
        if (
            (service == "postgres" and program == "postgres")
            or (service == "s3" and program == "weed")
            or (service == "clickhouse" and "threadline.embedded.chdb_server" in cmdline)
        ):
            return proc
    return None


def _log_records(dev: DevProcess) -> list[dict[str, object]]:
    records = []
    for line in list(dev.stderr):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def test_dev_restarts_a_killed_service_on_the_same_ports_and_says_so(data_dir: Path) -> None:
    dev = DevProcess(data_dir, "--port", "0")
    banner = dev.wait_banner()
    key = re.search(r"API key\s+(tl_sk_\S+)", banner)
    api = re.search(r"API\s+(http://\S+)", banner)
    assert key is not None, banner
    assert api is not None, banner
    headers = {"Authorization": f"Bearer {key.group(1)}"}
    endpoints = (data_dir / "endpoints.env").read_text()
    try:
        for service in ("postgres", "s3", "clickhouse"):
            victim = _service_process(data_dir, service, dev.proc.pid)
            assert victim is not None, service
            victim.kill()  # kill -9 of the service's main process only, as the OOM killer would

            def reported(service: str = service) -> bool:
                return any(
                    record.get("service") == service
                    and record.get("exit_code") == -9
                    and "died" in str(record.get("event", ""))
                    for record in _log_records(dev)
                )

            eventually(reported, timeout=30)

            def back(service: str = service, old: int = victim.pid) -> bool:
                proc = _service_process(data_dir, service, dev.proc.pid)
                return (
                    proc is not None
                    and proc.pid != old
                    and any(
                        record.get("service") == service and "restarted" in str(record.get("event", ""))
                        for record in _log_records(dev)
                    )
                )

            eventually(back, timeout=120)
            # The same ports (the running server's endpoints stay valid), and the server works:
            # a session write needs Postgres, a stream append S3, /readyz checks ClickHouse.
            assert (data_dir / "endpoints.env").read_text() == endpoints

            def serving(service: str = service) -> bool:
                with httpx.Client(base_url=api.group(1), headers=headers, timeout=30) as client:
                    session = client.post("/api/v1/sessions", json={"type": f"after-{service}"})
                    if session.status_code != 201:
                        return False
                    out = f"/v1/stream/sessions/{session.json()['id']}/out"
                    appended = client.post(out, content=b'"hi"', headers={"Content-Type": "application/json"})
                    return appended.status_code < 300 and client.get("/readyz").status_code == 200

            eventually(serving, timeout=60, interval=1.0)
        assert dev.proc.poll() is None  # dev itself kept running throughout
    finally:
        dev.proc.send_signal(signal.SIGTERM)
        assert dev.proc.wait(timeout=90) == 0
    wait_no_processes(data_dir)
