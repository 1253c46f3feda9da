"""Shared fixtures: one real embedded stack (Postgres, SeaweedFS, chDB sidecar) per test run, and
one real Threadline server on it, listening on a TCP port like in production.

Nothing here is mocked: tests that need a service get the real one from the same launcher that
`threadline dev` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
import uvicorn
from blockbuster import BlockBuster, blockbuster_ctx

from threadline.api.app import uvicorn_config
from threadline.auth.keys import bootstrap_environment, create_api_key
from threadline.config import Settings
from threadline.db import apply_migrations
from threadline.devserver import settings_for_stack
from threadline.embedded.ports import free_port
from threadline.embedded.stack import EmbeddedStack, StackEndpoints


@pytest.fixture(scope="session", autouse=True)
def no_blocking_calls_on_the_event_loop() -> Iterator[BlockBuster]:
    """Fail on blocking I/O (file, socket, sleep, os calls) made by Threadline's code while an
    event loop runs in that thread: in the test servers' loops, and in tests that run async code.

    Only stacks through ``threadline`` count; the embedded-stack launcher is synchronous by design
    (it runs before any server and in ``threadline dev``'s foreground, not on a serving loop).
    A blocking call raises ``BlockingError`` where it happens, which fails the request (500) or
    the test that made it.
    """
    with blockbuster_ctx("threadline", excluded_modules=["threadline.embedded"]) as blockbuster:
        for function in blockbuster.functions.values():
            # asyncpg looks for client certificates under ~/.postgresql (a stat) when it opens a
            # connection: once per pooled connection, never per request.
            function.can_block_in("asyncpg/connect_utils.py", {"_parse_connect_dsn_and_args"})
            # A module imported for the first time reads its file (clickhouse-connect imports
            # numpy/pandas lazily on its first query): once per process.
            function.can_block_in("<frozen importlib._bootstrap_external>", {"get_data", "path_stats"})
        yield blockbuster


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    with EmbeddedStack(data_dir) as running:
        yield running


@pytest.fixture(scope="session")
def stack(embedded_stack: EmbeddedStack) -> StackEndpoints:
    return embedded_stack.endpoints


def settings_for(endpoints: StackEndpoints, **overrides: Any) -> Settings:
    # No auth cache: tests revoke keys and expect the next request to see it.
    values: dict[str, Any] = {"port": 0, "auth_cache_seconds": 0.0, "log_format": "json", **overrides}
    return settings_for_stack(Settings(), endpoints).model_copy(update=values)


@pytest.fixture(scope="session")
def settings(stack: StackEndpoints) -> Settings:
    return settings_for(stack)


class ServerThread:
    """A real uvicorn server on a free port, in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.server = uvicorn.Server(uvicorn_config(settings, host="127.0.0.1", port=0))
        self.thread = threading.Thread(target=self.server.run, name="threadline-test-server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def base_url(settings: Settings) -> Iterator[str]:
    with ServerThread(settings) as url:
        yield url


class ServeProcess:
    """``threadline serve`` as a real child process (for kill -9 tests), on the given stack.

    ``workers`` > 1 runs the production multi-process server (a supervisor and its workers, in
    a process group of their own so that :meth:`kill` crashes all of them at once).
    """

    def __init__(
        self,
        endpoints: StackEndpoints,
        log: Path,
        *,
        port: int | None = None,
        workers: int = 1,
        **env: str,
    ) -> None:
        self.port = port or free_port()
        self.workers = workers
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threadline", "serve", "--workers", str(workers)],
            start_new_session=True,
            env={
                **os.environ,
                **endpoints.as_env(),
                "THREADLINE_PORT": str(self.port),
                "THREADLINE_REPLICATION_POLL_INTERVAL_SECONDS": "0.05",
                **env,
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        eventually(self._healthy, timeout=60)

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.name
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def is_leader(self) -> bool:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        match = re.search(r"^threadline_replication_leader (\S+)$", text, re.MULTILINE)
        return match is not None and float(match.group(1)) == 1.0

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (the supervisor's spawned children), or [] with one worker."""
        pids = []
        for child in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.Error):  # gone, or a zombie not yet reaped
                if any("spawn_main" in part for part in child.cmdline()):
                    pids.append(child.pid)
        return pids

    def kill(self) -> None:
        """SIGKILL to the supervisor and every worker: a crash, with no chance to finish anything."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        """SIGTERM, as a process manager stops a server: the graceful drain."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # leave nothing behind, even after a failure
                os.killpg(self.proc.pid, signal.SIGKILL)
            if not self.log.closed:
                self.log.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@dataclass(frozen=True)
class Tenant:
    environment_id: str
    key: str
    key_id: str


def pg_query(database_url: str, method: str, sql: str, *args: Any) -> Any:
    """Run one query on its own connection: ``pg_query(url, "fetchval", sql, *args)``."""

    async def go() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await getattr(conn, method)(sql, *args)
        finally:
            await conn.close()

    return run(go())


@pytest.fixture(scope="session")
def db(settings: Settings) -> Callable[..., Any]:
    """Run one query against the stack's Postgres: ``db("fetch", sql, *args)``."""

    def query(method: str, sql: str, *args: Any) -> Any:
        return pg_query(settings.database_url, method, sql, *args)

    return query


def make_tenant(settings: Settings, environment: str) -> Tenant:
    async def go() -> Tenant:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await apply_migrations(conn)
            env = await bootstrap_environment(
                conn, organization="tests", project="tests", environment=environment
            )
            key, plaintext = await create_api_key(conn, env.id, f"{environment} key")
            return Tenant(env.id, plaintext, key.id)
        finally:
            await conn.close()

    result: Tenant = run(go())
    return result


@pytest.fixture(scope="session")
def tenant(settings: Settings, base_url: str) -> Tenant:
    return make_tenant(settings, "main")


@pytest.fixture(scope="session")
def other_tenant(settings: Settings, base_url: str) -> Tenant:
    return make_tenant(settings, "other")


@pytest.fixture
def client(base_url: str, tenant: Tenant) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=30) as c:
        yield c


@pytest.fixture
def anon(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


REPO_ROOT = Path(__file__).resolve().parents[1]


def clickhouse_rows(endpoints: StackEndpoints, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
    """Run a query on the stack's ClickHouse with the real client (sync, one-off)."""
    import clickhouse_connect

    from threadline.storage.clickhouse import parse_clickhouse_url

    target = parse_clickhouse_url(endpoints.clickhouse_url)
    client = clickhouse_connect.get_client(
        host=target.host,
        port=target.port,
        username=target.username,
        password=target.password,
        database=target.database,
        autogenerate_session_id=False,
    )
    try:
        return [tuple(row) for row in client.query(sql, parameters=parameters).result_rows]
    finally:
        client.close()


def read_json_stream(client: httpx.Client, path: str) -> list[Any]:
    """Every JSON value in a stream, following Stream-Next-Offset until up to date."""
    values: list[Any] = []
    offset = "-1"
    while True:
        response = client.get(path, params={"offset": offset})
        assert response.status_code == 200, response.text
        values.extend(response.json())
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return values


def eventually(check: Any, *, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)
