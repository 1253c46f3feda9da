"""The one place Threadline builds its ClickHouse client.

ClickHouse serves session lists (``sessions_v1``); it is never the source of truth. clickhouse-connect's
exceptions stop at this boundary and become ours: ``ClickHouseUnavailable`` when the server cannot be
reached (lists fall back to Postgres, replication pauses and retries) and ``ClickHouseError`` when it
answered but refused the statement (a bug or a misconfiguration, not something to retry blindly).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import clickhouse_connect
from clickhouse_connect.driver import exceptions as ch_exceptions
from clickhouse_connect.driver.asyncclient import AsyncClient

from threadline.errors import DependencyRefused, DependencyUnavailable
from threadline.metrics import count_dependency_error

__all__ = [
    "DEFAULT_DATABASE",
    "AsyncClient",
    "ClickHouseError",
    "ClickHouseTarget",
    "ClickHouseUnavailable",
    "apply_clickhouse_schema",
    "clickhouse_errors",
    "connect_clickhouse",
    "parse_clickhouse_url",
    "ping_clickhouse",
    "split_statements",
]

DEFAULT_DATABASE = "threadline"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)


class ClickHouseUnavailable(DependencyUnavailable):
    """ClickHouse could not be reached (refused, timed out, overloaded)."""


class ClickHouseError(DependencyRefused):
    """ClickHouse answered with an error; ``code`` is its exception code when it sent one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def clickhouse_errors(action: str) -> Iterator[None]:
    """Translate clickhouse-connect and transport errors raised inside the block into ours."""
    try:
        yield
    except (ClickHouseError, ClickHouseUnavailable):
        raise
    except ch_exceptions.StreamFailureError as exc:  # an error in the middle of a result
        count_dependency_error("clickhouse", "refused")
        raise ClickHouseError(f"ClickHouse failed while {action}: {exc}", code=exc.code) from exc
    except (ch_exceptions.OperationalError, aiohttp.ClientError, OSError) as exc:  # OSError: timeouts too
        count_dependency_error("clickhouse")
        raise ClickHouseUnavailable(f"ClickHouse is unavailable while {action}: {exc}") from exc
    except ch_exceptions.ClickHouseError as exc:
        count_dependency_error("clickhouse", "refused")
        code = getattr(exc, "code", None)
        raise ClickHouseError(
            f"ClickHouse refused {action}: {exc}", code=code if isinstance(code, int) else None
        ) from exc


@dataclass(frozen=True, slots=True)
class ClickHouseTarget:
    """Where ClickHouse is, parsed from ``http(s)://user:password@host:port/database``."""

    secure: bool
    host: str
    port: int
    username: str
    password: str
    database: str

    def __repr__(self) -> str:  # never print the password
        scheme = "https" if self.secure else "http"
        return f"ClickHouseTarget({scheme}://{self.username}@{self.host}:{self.port}/{self.database})"


def parse_clickhouse_url(url: str) -> ClickHouseTarget:
    """Parse the ClickHouse URL; the database defaults to ``threadline``. Raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"ClickHouse URL must start with http:// or https://, got {parts.scheme or url!r}")
    if not parts.hostname:
        raise ValueError("ClickHouse URL has no host")
    secure = parts.scheme == "https"
    database = unquote(parts.path.strip("/")) or DEFAULT_DATABASE
    if not _IDENTIFIER.match(database):
        raise ValueError(f"ClickHouse database name must be a plain identifier, got {database!r}")
    return ClickHouseTarget(
        secure=secure,
        host=parts.hostname,
        port=parts.port or (8443 if secure else 8123),
        username=unquote(parts.username) if parts.username else "default",
        password=unquote(parts.password) if parts.password else "",
        database=database,
    )


async def _client(target: ClickHouseTarget, database: str | None, connect_timeout: float) -> AsyncClient:
    return await clickhouse_connect.get_async_client(
        host=target.host,
        port=target.port,
        secure=target.secure,
        username=target.username,
        password=target.password,
        database=database,
        connect_timeout=connect_timeout,
        # One client serves concurrent requests; a session id would make ClickHouse (and
        # clickhouse-connect) refuse concurrent queries on it.
        autogenerate_session_id=False,
    )


async def connect_clickhouse(url: str, *, connect_timeout: float = 5.0) -> AsyncClient:
    """Create the database if it is missing, then return an async client bound to it."""
    await asyncio.to_thread(_import_optional_modules)
    target = parse_clickhouse_url(url)
    with clickhouse_errors(f"connecting to {target.host}:{target.port}"):
        # Connect without the database first: binding to a missing one fails at connect time.
        admin = await _client(target, None, connect_timeout)
        try:
            await admin.command(f"CREATE DATABASE IF NOT EXISTS `{target.database}`")
        finally:
            await admin.close()
        return await _client(target, target.database, connect_timeout)


def _import_optional_modules() -> None:
    """clickhouse-connect imports numpy and pandas (when installed, e.g. with chDB) on first use,
    from inside whatever call needs them: on the event loop, that import blocks it for hundreds of
    milliseconds (pandas reads time zone files). Resolve them here, in a thread, once."""
    from clickhouse_connect.driver import options

    for name in ("np", "pd"):
        getattr(options, name, None)


def split_statements(sql: str) -> list[str]:
    """Split a schema file on ``;`` at line ends, dropping blank and comment-only statements."""
    statements = []
    for chunk in _STATEMENT_END.split(sql):
        code = [line for line in chunk.splitlines() if line.strip() and not line.strip().startswith("--")]
        if code:
            statements.append(chunk.strip())
    return statements


async def apply_clickhouse_schema(client: AsyncClient, directory: Path) -> list[str]:
    """Run every ``*.sql`` file in name order; files are idempotent (``IF NOT EXISTS``).

    Returns the names of the files applied.
    """
    applied = []
    for name, text in await asyncio.to_thread(_read_schema_files, directory):
        for statement in split_statements(text):
            with clickhouse_errors(f"applying {name}"):
                await client.command(statement)
        applied.append(name)
    return applied


def _read_schema_files(directory: Path) -> list[tuple[str, str]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"ClickHouse schema directory {directory} does not exist")
    paths = sorted(directory.glob("*.sql"), key=lambda p: p.name)
    return [(path.name, path.read_text(encoding="utf-8")) for path in paths]


async def ping_clickhouse(client: AsyncClient) -> None:
    """Raise ClickHouseUnavailable unless ClickHouse answers ``/ping``."""
    with clickhouse_errors("pinging"):
        ok = await client.ping()
    if not ok:
        count_dependency_error("clickhouse")
        raise ClickHouseUnavailable("ClickHouse did not answer /ping")
