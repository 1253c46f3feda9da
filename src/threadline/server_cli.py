"""The server side of the ``threadline`` command: the embedded dev stack, serve, migrations, keys,
environments. Needs the server's dependencies (``threadline[server]``); ``threadline.cli`` imports
this module only when one of these commands runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import asyncpg
import uvicorn

from threadline.auth.keys import (
    bootstrap_environment,
    create_api_key,
    list_api_keys,
    revoke_api_key,
    signing_secret,
)
from threadline.auth.tokens import mint_token
from threadline.config import DEV_ENDPOINTS_FILE, Settings, sql_dir
from threadline.db import MigrationError, apply_migrations
from threadline.logs import configure_logging

__all__ = ["run_server_command"]


def _settings() -> Settings:
    """Settings from the environment; falls back to a running ``threadline dev`` stack's endpoints."""
    base = Settings()
    endpoints = base.data_dir / DEV_ENDPOINTS_FILE
    if (
        "THREADLINE_DATABASE_URL" not in os.environ
        and "DATABASE_URL" not in os.environ
        and endpoints.is_file()
    ):
        return Settings(_env_file=endpoints)
    return base


@contextlib.asynccontextmanager
async def _connect(settings: Settings) -> AsyncIterator[asyncpg.Connection[Any]]:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SystemExit(
            f"error: cannot connect to Postgres ({exc}). Set THREADLINE_DATABASE_URL, "
            "or start `threadline dev` in this directory."
        ) from None
    try:
        yield conn
    finally:
        await conn.close()


async def _replication(args: argparse.Namespace, settings: Settings) -> None:
    """``status`` prints the slot; ``reset`` drops it. Dropping is safe at any time: the mirror's
    backfill marker is cleared first, so lists come from Postgres until the leading consumer has
    recreated the slot and copied every session again (deletes included)."""
    from threadline.replication import SLOT
    from threadline.replication.progress import slot_status

    async with _connect(settings) as conn:
        if args.replication_command == "reset":
            await conn.execute(
                "UPDATE replication_state SET backfilled_at = NULL, backfill_lsn = NULL, updated_at = now() "
                "WHERE slot_name = $1",
                SLOT,
            )
            for attempt in range(50):  # the consumer holds the slot only while it reads it
                try:
                    dropped = await conn.fetchval(
                        "SELECT count(*) FROM (SELECT pg_drop_replication_slot(slot_name) "
                        "FROM pg_replication_slots WHERE slot_name = $1) AS d",
                        SLOT,
                    )
                    break
                except asyncpg.ObjectInUseError:
                    if attempt == 49:
                        raise SystemExit(f"error: slot {SLOT} stayed in use; try again") from None
                    await asyncio.sleep(0.1)
            print(
                f"slot {SLOT} " + ("dropped" if dropped else "did not exist") + "; the consumer recreates it"
            )
            return
        status = await slot_status(conn)
    print(json.dumps({"slot": SLOT, **(asdict(status) if status else {"exists": False})}))


async def _migrate(settings: Settings) -> None:
    from threadline.storage.clickhouse import apply_clickhouse_schema, connect_clickhouse

    async with _connect(settings) as conn:
        applied = await apply_migrations(conn)
    print(f"postgres: {len(applied)} migration(s) applied" + (f": {', '.join(applied)}" if applied else ""))
    client = await connect_clickhouse(settings.clickhouse_url)
    try:
        files = await apply_clickhouse_schema(client, sql_dir("clickhouse_schema"))
    finally:
        await client.close()
    print(f"clickhouse: schema applied ({', '.join(files)})")


async def _keys(args: argparse.Namespace, settings: Settings) -> None:
    async with _connect(settings) as conn:
        await apply_migrations(conn)
        if args.keys_command == "create":
            environment = await bootstrap_environment(
                conn, organization=args.org, project=args.project, environment=args.env
            )
            key, plaintext = await create_api_key(conn, environment.id, args.name)
            print(
                json.dumps(
                    {"id": key.id, "environmentId": environment.id, "name": key.name, "key": plaintext}
                )
            )
            print("store this key now: it is not shown again", file=sys.stderr)
        elif args.keys_command == "list":
            for key in await list_api_keys(conn):
                print(
                    json.dumps(
                        {
                            "id": key.id,
                            "environmentId": key.environment_id,
                            "name": key.name,
                            "prefix": key.key_prefix,
                            "createdAt": key.created_at.isoformat(),
                            "lastUsedAt": key.last_used_at.isoformat() if key.last_used_at else None,
                            "revokedAt": key.revoked_at.isoformat() if key.revoked_at else None,
                        }
                    )
                )
        elif args.keys_command == "revoke":
            revoked = await revoke_api_key(conn, args.key_id)
            if revoked is None:
                raise SystemExit(f"error: no API key with id {args.key_id}")
            print(
                json.dumps(
                    {
                        "id": revoked.id,
                        "revokedAt": revoked.revoked_at.isoformat() if revoked.revoked_at else None,
                    }
                )
            )


async def _env(args: argparse.Namespace, settings: Settings) -> None:
    async with _connect(settings) as conn:
        await apply_migrations(conn)
        environment = await bootstrap_environment(
            conn, organization=args.org, project=args.project, environment=args.env
        )
        out: dict[str, Any] = {
            "environmentId": environment.id,
            "projectId": environment.project_id,
            "organizationId": environment.organization_id,
        }
        if args.env_command == "signing-secret":
            out["signingSecret"] = await signing_secret(conn, environment.id)
        print(json.dumps(out))


# What a browser link may do: list, get and tail every session of the environment, nothing else.
UI_LINK_SCOPES = ["read:sessions"]


async def _ui_link(args: argparse.Namespace, settings: Settings) -> None:
    """Print a link to /ui that signs in with a short-lived read-only token. The token rides in
    the URL fragment, which browsers never send to a server; the page moves it to sessionStorage."""
    if not 60 <= args.ttl <= settings.session_token_max_ttl_seconds:
        raise SystemExit(f"error: --ttl must be 60 to {settings.session_token_max_ttl_seconds} seconds")
    async with _connect(settings) as conn:
        await apply_migrations(conn)
        environment = await bootstrap_environment(
            conn, organization=args.org, project=args.project, environment=args.env
        )
        secret = await signing_secret(conn, environment.id)
    token, exp = mint_token(
        secret=secret,
        environment_id=environment.id,
        scopes=UI_LINK_SCOPES,
        ttl_seconds=args.ttl,
        subject="ui-link",
    )
    base = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    print(f"{base}/ui#token={token}")
    expires = datetime.fromtimestamp(exp, UTC).isoformat(timespec="seconds")
    print(f"read-only (list, get, live tail) until {expires}; anyone with the link can read", file=sys.stderr)


def _serve(settings: Settings) -> int:
    from threadline.api.app import uvicorn_config
    from threadline.workers import run_workers, worker_count

    workers = worker_count(settings.workers)
    if workers > 1:
        return run_workers(settings, workers)
    uvicorn.Server(uvicorn_config(settings)).run()
    return 0


def run_server_command(args: argparse.Namespace) -> None:
    base = Settings()
    configure_logging(base.log_level, base.log_format)
    try:
        if args.command == "dev":
            from threadline.devserver import run_dev

            overrides: dict[str, Any] = {}
            if args.data_dir is not None:
                overrides["data_dir"] = args.data_dir
            if args.host is not None:
                overrides["host"] = args.host
            if args.port is not None:
                overrides["port"] = args.port
            if args.workers is not None:
                overrides["workers"] = args.workers
            settings = base.model_copy(update=overrides)
            if args.instances is not None:
                if args.instances < 1:
                    raise SystemExit("error: --instances must be at least 1")
                if args.host is not None:
                    raise SystemExit(
                        "error: --host does not apply to --instances: the cluster listens on 127.0.0.1"
                    )
                if args.workers is not None:
                    raise SystemExit(
                        "error: --workers does not apply to --instances: each instance is one process"
                    )
                from threadline.devserver import run_dev_cluster

                sys.exit(run_dev_cluster(settings, fresh=args.fresh, instances=args.instances))
            sys.exit(run_dev(settings, fresh=args.fresh))
        elif args.command == "serve":
            sys.exit(
                _serve(base if args.workers is None else base.model_copy(update={"workers": args.workers}))
            )
        elif args.command == "replication":
            asyncio.run(_replication(args, _settings()))
        elif args.command == "migrate":
            asyncio.run(_migrate(_settings()))
        elif args.command == "keys":
            asyncio.run(_keys(args, _settings()))
        elif args.command == "ui-link":
            asyncio.run(_ui_link(args, _settings()))
        elif args.command == "env":
            asyncio.run(_env(args, _settings()))
    except MigrationError as exc:
        raise SystemExit(f"error: {exc}") from None
