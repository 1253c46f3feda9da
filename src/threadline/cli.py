"""``threadline`` command line.

Server commands (``dev``, ``serve``, ``migrate``, ``replication``, ``keys``, ``env``, ``ui-link``) need the server's dependencies
(``pip install 'threadline[server]'``) and live in :mod:`threadline.server_cli`, imported only when
one runs. Client commands (``sessions``, ``tail``, ``append``, ``streams``) talk to a server over
HTTP with the SDK alone and live in :mod:`threadline.client._cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from threadline import __version__
from threadline.client._cli import CLIENT_COMMANDS, add_client_commands, run_client_command

__all__ = ["build_parser", "main"]

SERVER_INSTALL_HINT = "pip install 'threadline[server]'"


def _add_tenancy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--org", default="default", help="organization slug (default: default)")
    parser.add_argument("--project", default="default", help="project slug (default: default)")
    parser.add_argument("--env", default="dev", help="environment slug (default: dev)")


def _workers(value: str) -> int:
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError("must be 0 (one per CPU) or more")
    return count


def _add_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="server processes on the one port (default THREADLINE_WORKERS, else one per CPU; 0 = one per CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="threadline", description="Durable session streams for AI agents.")
    parser.add_argument("--version", action="version", version=f"threadline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="run the server on an embedded Postgres + S3 + ClickHouse stack")
    dev.add_argument(
        "--data-dir", type=Path, default=None, help="where the stack keeps its data (default .threadline)"
    )
    dev.add_argument("--fresh", action="store_true", help="wipe the data directory first")
    dev.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    dev.add_argument("--port", type=int, default=None, help="HTTP port (default 8080; 0 picks a free one)")
    _add_workers_arg(dev)
    dev.add_argument(
        "--instances",
        type=int,
        default=None,
        help="run N `threadline serve` processes behind HAProxy on --port instead of one in-process server",
    )

    serve = commands.add_parser("serve", help="run the server against THREADLINE_* configured services")
    _add_workers_arg(serve)
    commands.add_parser("migrate", help="apply Postgres migrations and the ClickHouse schema")
    replication = commands.add_parser("replication", help="the ClickHouse mirror's replication slot")
    replication_commands = replication.add_subparsers(dest="replication_command", required=True)
    replication_commands.add_parser(
        "status", help="slot position, retained WAL and whether it is still valid"
    )
    replication_commands.add_parser(
        "reset", help="drop the slot: the leading consumer recreates it and copies every session again"
    )

    keys = commands.add_parser("keys", help="manage secret API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key (shown once)")
    create.add_argument("--name", default="default", help="a label for the key")
    _add_tenancy_args(create)
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")

    env = commands.add_parser("env", help="environments")
    env_commands = env.add_subparsers(dest="env_command", required=True)
    _add_tenancy_args(
        env_commands.add_parser("bootstrap", help="create the org/project/environment if missing")
    )
    _add_tenancy_args(
        env_commands.add_parser("signing-secret", help="print the environment's JWT signing secret (HS256)")
    )
    ui_link = commands.add_parser(
        "ui-link", help="print a link to the session browser carrying a short-lived read-only token"
    )
    ui_link.add_argument("--ttl", type=int, default=3600, help="token lifetime in seconds (default 3600)")
    ui_link.add_argument("--url", default=None, help="the server's base URL (default http://HOST:PORT)")
    _add_tenancy_args(ui_link)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        sys.exit(run_client_command(args))
    try:
        from threadline.server_cli import run_server_command
    except ImportError as exc:
        raise SystemExit(
            f"error: `threadline {args.command}` runs the server and needs its dependencies "
            f"(missing: {exc.name}). Install them with: {SERVER_INSTALL_HINT}"
        ) from None
    run_server_command(args)
