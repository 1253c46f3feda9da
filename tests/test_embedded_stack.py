"""The embedded stack launcher against real Postgres, SeaweedFS and the chDB sidecar.

Each test starts its own stack in its own data dir (pytest's 0700 tmp dirs exercise the
root → unprivileged Postgres user path). Waits poll with generous deadlines, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from obstore.exceptions import PermissionDeniedError
from obstore.store import S3Store

from threadline.embedded.ports import ensure_port_free
from threadline.embedded.processes import http_call
from threadline.embedded.stack import EmbeddedStack, StackEndpoints, StackError


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path / "data") as running:
        yield running


def s3_store(ep: StackEndpoints, *, secret: str | None = None) -> S3Store:
    return S3Store(
        ep.s3_bucket,
        endpoint=ep.s3_endpoint,
        allow_http=True,
        region=ep.s3_region,
        access_key_id=ep.s3_access_key_id,
        secret_access_key=secret or ep.s3_secret_access_key,
    )


def pg_fetchval(url: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def pg_execute(url: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def process_tree(pids: dict[str, int]) -> list[psutil.Process]:
    """Each service process and all its descendants (Postgres forks workers)."""
    procs: list[psutil.Process] = []
    for pid in pids.values():
        proc = psutil.Process(pid)
        procs += [proc, *proc.children(recursive=True)]
    return procs


def alive(proc: psutil.Process) -> bool:
    """``is_running`` guards against pid reuse. A zombie counts as gone once its last threads
    are gone too — they keep its sockets open for some milliseconds; reaping it is init's job.
    """
    try:
        if not proc.is_running():
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE or proc.num_threads() > 1)
    except psutil.NoSuchProcess:
        return False


def port_free(port: int) -> bool:
    try:
        ensure_port_free("127.0.0.1", port)
    except StackError:
        return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_stack_serves_postgres_s3_and_clickhouse(stack: EmbeddedStack) -> None:
    ep = stack.endpoints
    assert set(ep.as_env()) == {
        "THREADLINE_DATABASE_URL",
        "THREADLINE_S3_ENDPOINT",
        "THREADLINE_S3_BUCKET",
        "THREADLINE_S3_REGION",
        "THREADLINE_S3_ACCESS_KEY_ID",
        "THREADLINE_S3_SECRET_ACCESS_KEY",
        "THREADLINE_CLICKHOUSE_URL",
    }
    assert ep.database_url.endswith("/threadline")
    assert pg_fetchval(ep.database_url, "SHOW wal_level") == "logical"
    assert pg_fetchval(ep.database_url, "SHOW fsync") == "on"
    assert pg_fetchval(ep.database_url, "SELECT current_database()") == "threadline"

    store = s3_store(ep)
    store.put("greeting", b"hello")
    assert bytes(store.get("greeting").bytes()) == b"hello"
    with pytest.raises(PermissionDeniedError):
        s3_store(ep, secret="wrong-secret").get("greeting")

    base = ep.clickhouse_url.split("@", 1)[1].split("/", 1)[0]
    assert http_call(f"http://{base}/ping") == (200, b"Ok.\n")
    assert set(stack.service_pids()) == {"postgres", "s3", "clickhouse"}


def test_data_survives_restart_and_fresh_wipes_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EmbeddedStack(data) as stack:
        ep = stack.endpoints
        pg_execute(ep.database_url, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('row')")
        s3_store(ep).put("kept", b"object")
        first = ep
    with EmbeddedStack(data) as stack:
        ep = stack.endpoints
        assert ep.database_url != first.database_url  # new ports on every start
        assert ep.s3_secret_access_key == first.s3_secret_access_key  # credentials are reused
        assert pg_fetchval(ep.database_url, "SELECT v FROM kept") == "row"
        assert bytes(s3_store(ep).get("kept").bytes()) == b"object"
    with EmbeddedStack(data, fresh=True) as stack:
        ep = stack.endpoints
        assert ep.s3_secret_access_key != first.s3_secret_access_key
        assert pg_fetchval(ep.database_url, "SELECT to_regclass('kept') IS NULL") is True
        with pytest.raises(FileNotFoundError):
            s3_store(ep).get("kept")


def test_second_launcher_on_same_data_dir_is_refused(stack: EmbeddedStack) -> None:
    with pytest.raises(StackError, match=rf"in use by another threadline process \(pid {os.getpid()}\)"):
        EmbeddedStack(stack.data_dir).start()
    assert set(stack.service_pids()) == {"postgres", "s3", "clickhouse"}


def test_unusable_data_dirs_are_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(StackError, match="is a file"):
        EmbeddedStack(a_file).start()
    with pytest.raises(StackError, match="cannot create data dir"):
        EmbeddedStack(a_file / "below-a-file").start()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(StackError, match="not a Threadline data dir"):
        EmbeddedStack(foreign, fresh=True).start()
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_stop_leaves_no_processes(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path / "data")
    stack.start()
    procs = process_tree(stack.service_pids())
    assert len(procs) > 3, "postgres should have forked workers"
    stack.stop()
    stack.stop()  # idempotent
    assert [p for p in procs if alive(p)] == []
    assert stack.service_pids() == {}


def test_killed_launcher_takes_its_services_down(tmp_path: Path) -> None:
    data = tmp_path / "data"
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from threadline.embedded.stack import EmbeddedStack\n"
        "stack = EmbeddedStack(Path(sys.argv[1]))\n"
        "stack.start()\n"
        "ep = stack.endpoints\n"
        "ports = [int(u.rsplit(':', 1)[1].split('/')[0]) for u in (ep.database_url, ep.s3_endpoint, ep.clickhouse_url)]\n"
        "print(json.dumps({'pids': stack.service_pids(), 'ports': ports}), flush=True)\n"
        "time.sleep(600)\n"
    )
    stderr_path = tmp_path / "launcher.err"
    with stderr_path.open("wb") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, "-c", script, str(data)], stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        assert launcher.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(launcher.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=120), "launcher did not report its services"
        line = launcher.stdout.readline()
        assert line, f"launcher failed: {stderr_path.read_text()}"
        report = json.loads(line)
        pids, ports = report["pids"], report["ports"]
        assert set(pids) == {"postgres", "s3", "clickhouse"}
        procs = process_tree(pids)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        assert wait_until(lambda: not any(alive(p) for p in procs), timeout=20), [
            p.pid for p in procs if alive(p)
        ]
        assert wait_until(lambda: all(port_free(port) for port in ports), timeout=10), ports
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
    with EmbeddedStack(data) as stack:  # the dead launcher's lock and pid files do not get in the way
        assert pg_fetchval(stack.endpoints.database_url, "SELECT 1") == 1


def test_restarting_s3_keeps_endpoint_and_data(stack: EmbeddedStack) -> None:
    ep = stack.endpoints
    s3_store(ep).put("survivor", b"still here")
    old_pid = stack.service_pids()["s3"]
    stack.stop_service("s3")
    assert "s3" not in stack.service_pids()
    assert not psutil.pid_exists(old_pid) or not alive(psutil.Process(old_pid))
    stack.start_service("s3")
    assert stack.service_pids()["s3"] != old_pid
    assert stack.endpoints == ep
    # This failed once in ~8 full-suite runs and never alone; keep the evidence if it recurs.
    try:
        survivor = bytes(s3_store(ep).get("survivor").bytes())
    except Exception as exc:
        log = (stack.data_dir / "logs" / "s3.log").read_text(errors="replace")[-4000:]
        raise AssertionError(f"read after S3 restart failed: {exc!r}\n--- s3.log tail ---\n{log}") from exc
    assert survivor == b"still here"
