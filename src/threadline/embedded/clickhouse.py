"""Embedded ClickHouse: the chDB HTTP sidecar (``threadline.embedded.chdb_server``).

chDB allows one process per data path, so one sidecar owns it and every server instance and
the replication consumer reach it over ClickHouse's HTTP interface — the same
clickhouse-connect code path as production.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from urllib.parse import quote

from threadline.embedded.ports import ensure_port_free
from threadline.embedded.processes import (
    ManagedProcess,
    ProcessService,
    StackError,
    child_env,
    http_call,
    setpriv_prefix,
)

__all__ = ["DATABASE", "USER", "EmbeddedClickHouse"]

HOST = "127.0.0.1"
USER = "threadline"
DATABASE = "threadline"
_MODULE = "threadline.embedded.chdb_server"
PASSWORD_ENV = "THREADLINE_CHDB_PASSWORD"


class EmbeddedClickHouse(ProcessService):
    """The sidecar process serving chDB data under ``root``."""

    name = "clickhouse"

    def __init__(self, root: Path, *, port: int, password: str, log_path: Path) -> None:
        self.root = root
        self.port = port
        self.password = password
        self.log_path = log_path
        self._process: ManagedProcess | None = None
        if importlib.util.find_spec("chdb") is None:
            raise StackError("chDB is not installed: install it with `pip install 'threadline[embedded]'`")

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{USER}:{quote(self.password, safe='')}@{HOST}:{self.port}/{DATABASE}"

    def start(self, timeout: float = 90.0) -> None:
        ensure_port_free(HOST, self.port, service="the ClickHouse sidecar")
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            *setpriv_prefix(death_signal=signal.SIGTERM),
            sys.executable,
            "-m",
            _MODULE,
            "--path",
            str(self.root),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--user",
            USER,
        ]
        # The password travels in the environment: argv is visible to every user in `ps`.
        env = child_env({PASSWORD_ENV: self.password})
        self._process = ManagedProcess("clickhouse", argv, log_path=self.log_path, env=env, cwd=self.root)
        self._process.start()
        self._process.wait_ready(self._pings, timeout)  # chDB's first import alone takes ~2 s
        self.query(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")

    def query(self, sql: str) -> bytes:
        """Run one statement as the stack's user; for setup and tests."""
        status, body = http_call(
            self.base_url + "/", data=sql.encode(), auth=(USER, self.password), timeout=30.0
        )
        if status != 200:
            raise StackError(f"ClickHouse sidecar refused `{sql}`: HTTP {status}: {body[:500]!r}")
        return body

    def stop(self, timeout: float = 20.0) -> None:
        if self._process is not None:
            self._process.stop(signal.SIGTERM, timeout)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    def _pings(self) -> bool:
        status, body = http_call(self.base_url + "/ping", timeout=2.0)
        return status == 200 and body.strip() == b"Ok."
