"""``threadline dev``: the embedded stack plus the server in one foreground process.

Order matters for a clean exit: the HTTP server stops first (in-flight requests finish), then the
supervisor (which restarts a service that dies while dev runs), then the stack stops Postgres, S3
and ClickHouse. Children also carry a parent-death signal, so even a
``kill -9`` of this process leaves no service running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import uvicorn
from pydantic import SecretStr

from threadline import __version__
from threadline.auth.keys import bootstrap_environment, create_api_key, hash_key
from threadline.config import DEV_ENDPOINTS_FILE, Settings
from threadline.db import apply_migrations
from threadline.embedded.cluster import LocalCluster
from threadline.embedded.ports import ensure_port_free
from threadline.embedded.processes import StackError
from threadline.embedded.stack import EmbeddedStack, StackEndpoints
from threadline.embedded.supervisor import StackSupervisor

__all__ = ["run_dev", "run_dev_cluster", "settings_for_stack"]

DEV_KEY_FILE = "dev-key"


def settings_for_stack(settings: Settings, endpoints: StackEndpoints) -> Settings:
    """``settings`` pointed at a running embedded stack."""
    return settings.model_copy(
        update={
            "database_url": endpoints.database_url,
            "s3_endpoint": endpoints.s3_endpoint,
            "s3_bucket": endpoints.s3_bucket,
            "s3_region": endpoints.s3_region,
            "s3_access_key_id": endpoints.s3_access_key_id,
            "s3_secret_access_key": SecretStr(endpoints.s3_secret_access_key),
            "clickhouse_url": endpoints.clickhouse_url,
        }
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


async def _dev_key(settings: Settings) -> str:
    """Apply migrations, make sure the dev environment exists, and return a working secret key.

    The key is kept in the data dir so that every restart prints the same one.
    """
    key_file = settings.data_dir / DEV_KEY_FILE
    conn = await asyncpg.connect(settings.database_url)
    try:
        await apply_migrations(conn)
        environment = await bootstrap_environment(conn)
        if key_file.is_file():
            key = key_file.read_text().strip()
            live = await conn.fetchval(
                "SELECT 1 FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", hash_key(key)
            )
            if live:
                return key
        _, key = await create_api_key(conn, environment.id, "dev")
        _write_private(key_file, key + "\n")
        return key
    finally:
        await conn.close()


def _banner(settings: Settings, endpoints: StackEndpoints, key: str, port: int, started_in: float) -> str:
    base = f"http://{settings.host}:{port}"
    return f"""
Threadline {__version__} is running on the embedded stack (ready in {started_in:.1f} s)
  API         {base}
  Docs        {base}/docs
  Health      {base}/readyz
  Postgres    {endpoints.database_url.split("@")[-1]}
  S3          {endpoints.s3_endpoint} (bucket {endpoints.s3_bucket})
  ClickHouse  {endpoints.clickhouse_url.split("@")[-1]}
  Data dir    {settings.data_dir}
  API key     {key}

Create a session:
  curl -s -X POST {base}/api/v1/sessions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"type": "chat", "externalId": "my-first-chat"}}'

Ctrl-C stops the server and the stack.
"""


async def _serve(
    config: uvicorn.Config, settings: Settings, endpoints: StackEndpoints, key: str, started: float
) -> None:
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(_banner(settings, endpoints, key, port, time.perf_counter() - started), flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_dev(settings: Settings, *, fresh: bool) -> int:
    started = time.perf_counter()
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    # Until uvicorn installs its own handlers, SIGTERM must still unwind through `finally`.
    previous: Any = signal.signal(signal.SIGTERM, _raise_on_term)
    stack = EmbeddedStack(settings.data_dir, fresh=fresh)
    supervisor = StackSupervisor(stack)
    try:
        if settings.port:
            ensure_port_free(settings.host, settings.port)
        endpoints = stack.start()
        settings = settings_for_stack(settings, endpoints)
        env = endpoints.as_env()
        _write_private(settings.data_dir / DEV_ENDPOINTS_FILE, "".join(f"{k}={v}\n" for k, v in env.items()))
        key = asyncio.run(_dev_key(settings))
        supervisor.start()  # a service that dies from here on is reported and restarted
        from threadline.api.app import uvicorn_config
        from threadline.workers import run_workers, worker_count

        workers = worker_count(settings.workers)
        if workers > 1:

            def announce(port: int) -> None:
                print(_banner(settings, endpoints, key, port, time.perf_counter() - started), flush=True)

            return run_workers(settings, workers, on_ready=announce)

        config = uvicorn_config(settings)
        # The loop `threadline serve` runs on (uvloop when installed), so dev measures the same.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(_serve(config, settings, endpoints, key, started))
        return 0
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        (settings.data_dir / DEV_ENDPOINTS_FILE).unlink(missing_ok=True)
        supervisor.stop()  # before the stack: stopping a service is not a death to restart
        stack.stop()
        signal.signal(signal.SIGTERM, previous)


def _cluster_banner(cluster: LocalCluster, key: str, started_in: float) -> str:
    endpoints = cluster.endpoints
    instances = "\n".join(
        f"  {i.name:<11} {i.url}  (log {cluster.stack.logs_dir / i.name}.log)" for i in cluster.instances
    )
    return f"""
Threadline {__version__}: {len(cluster.instances)} instances behind HAProxy on the embedded stack (ready in {started_in:.1f} s)
  API         {cluster.url}   (the balancer; X-Threadline-Instance names who answered)
  Stats       {cluster.stats_url}/stats   (Prometheus: {cluster.stats_url}/metrics)
{instances}
  Config      {cluster.config_path}
  Postgres    {endpoints.database_url.split("@")[-1]}
  S3          {endpoints.s3_endpoint} (bucket {endpoints.s3_bucket})
  ClickHouse  {endpoints.clickhouse_url.split("@")[-1]}
  Data dir    {cluster.data_dir}
  API key     {key}

Try a crash: kill -9 one instance's pid (`ps -ef | grep "threadline serve"`); clients reconnect
through the balancer. Ctrl-C stops the balancer, the instances and the stack.
"""


def run_dev_cluster(settings: Settings, *, fresh: bool, instances: int) -> int:
    """``threadline dev --instances N``: the stack, N ``threadline serve`` processes and HAProxy on
    ``settings.port``, in the foreground until Ctrl-C or SIGTERM. A crashed instance is not
    restarted: the point of the mode is to watch what clients do when one goes away."""
    started = time.perf_counter()
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    previous: Any = signal.signal(signal.SIGTERM, _raise_on_term)
    cluster = LocalCluster(settings.data_dir, instances=instances, port=settings.port, fresh=fresh)
    try:
        if settings.port:
            ensure_port_free(settings.host, settings.port, service="the load balancer")
        # The key (and the migrations) before the instances start, so they do not race to migrate.
        endpoints = cluster.stack.start()
        key = asyncio.run(_dev_key(settings_for_stack(settings, endpoints)))
        env = endpoints.as_env()
        _write_private(settings.data_dir / DEV_ENDPOINTS_FILE, "".join(f"{k}={v}\n" for k, v in env.items()))
        cluster.start()
        print(_cluster_banner(cluster, key, time.perf_counter() - started), flush=True)
        while True:
            time.sleep(3600)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        (settings.data_dir / DEV_ENDPOINTS_FILE).unlink(missing_ok=True)
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
