"""The embedded stack's crash handling without starting a service: exit descriptions and the
stale ``postmaster.pid`` a killed Postgres leaves (dead, zombie or reused pid → removed; a live
postmaster of the same data dir → a clear error)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from threadline.embedded.postgres import EmbeddedPostgres
from threadline.embedded.processes import StackError
from threadline.embedded.supervisor import describe_exit


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-9) == "exit code -9 (killed by SIGKILL)"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-200) == "exit code -200 (killed by signal 200)"


@pytest.fixture
def postgres(tmp_path: Path) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(tmp_path / "pg", port=1, password="x", log_path=tmp_path / "pg.log")
    pg.data_dir.mkdir(parents=True)
    return pg


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed and reaped after it."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _write_pid(pg: EmbeddedPostgres, pid: int) -> Path:
    pidfile = pg.data_dir / "postmaster.pid"
    pidfile.write_text(f"{pid}\n{pg.data_dir}\n")
    return pidfile


def test_a_dead_pid_is_removed(postgres: EmbeddedPostgres) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile = _write_pid(postgres, gone.pid)
    postgres._check_stale_postmaster()
    assert not pidfile.exists()


def test_a_zombie_pid_is_removed(postgres: EmbeddedPostgres, child: list[subprocess.Popen[bytes]]) -> None:
    # What a killed postmaster is until its parent reaps it: its pid still exists, so Postgres
    # alone would refuse to start.
    zombie = subprocess.Popen(["true"])
    child.append(zombie)
    deadline = time.monotonic() + 10
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pidfile = _write_pid(postgres, zombie.pid)
    postgres._check_stale_postmaster()
    assert not pidfile.exists()


def test_a_reused_pid_is_removed(postgres: EmbeddedPostgres, child: list[subprocess.Popen[bytes]]) -> None:
    other = subprocess.Popen(["sleep", "60"])
    child.append(other)
    pidfile = _write_pid(postgres, other.pid)
    postgres._check_stale_postmaster()
    assert not pidfile.exists()


def test_a_live_postmaster_of_the_same_data_dir_is_a_clear_error(
    postgres: EmbeddedPostgres, child: list[subprocess.Popen[bytes]]
) -> None:
    # argv[0] "postgres" and the data dir in its command line: an orphan from an earlier run.
    orphan = subprocess.Popen(
        ["postgres", "-c", "import time; time.sleep(60)", "-D", str(postgres.data_dir)],
        executable=sys.executable,
    )
    child.append(orphan)
    deadline = time.monotonic() + 10
    while "-D" not in psutil.Process(orphan.pid).cmdline():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pidfile = _write_pid(postgres, orphan.pid)
    with pytest.raises(StackError, match=f"pid {orphan.pid}"):
        postgres._check_stale_postmaster()
    assert pidfile.exists()
