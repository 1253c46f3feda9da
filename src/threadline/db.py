"""Postgres connections and forward-only migrations.

Migrations are plain numbered SQL files (``pg_migrations/NNNN_name.sql``). Each runs in its own
transaction; an advisory lock serialises servers that start at the same time, and a checksum
refuses to run against a database whose applied migrations were edited afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import asyncpg

from threadline.config import sql_dir
from threadline.errors import EngineError
from threadline.metrics import count_dependency_error

__all__ = [
    "POSTGRES_UNAVAILABLE",
    "BoundedPool",
    "Conn",
    "ConnectionSource",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "create_pool",
    "discarding_on_failure",
    "load_migrations",
]

# A bare connection or one borrowed from a pool; quoted because asyncpg's classes are only
# generic in its type stubs.
Conn: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"

logger = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every Threadline process.
_MIGRATION_LOCK_KEY = 0x7468_7264_6C6E_0001
_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(EngineError):
    """The database's applied migrations do not match the files (edited, or from the future)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


# What asyncpg raises when Postgres is down, stalled, restarting or out of connections (and
# the socket errors and timeouts under them): an outage to answer 503 for, never a bug.
POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (pool.acquire, command_timeout) too
    asyncpg.InterfaceError,  # the connection is closed or busy
    asyncpg.InternalClientError,  # a connection left mid-operation by a timeout
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutdown, cannot connect now, statement timeout
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
)


@asynccontextmanager
async def discarding_on_failure(pool: asyncpg.Pool[Any], *, acquire_timeout: float) -> AsyncIterator[Conn]:
    """A pooled connection that never goes back to the pool in a state the next user would trip
    on. After an outage-like failure or a cancellation (a timeout mid-statement, a lost socket)
    its protocol state is unknown, and reusing it fails with "another operation is in progress":
    it is closed. After any other error it is usable, but a transaction opened by hand
    (``BEGIN``) may still be open: it is rolled back here (closed if even that fails)."""
    try:
        conn = await pool.acquire(timeout=acquire_timeout)
    except POSTGRES_UNAVAILABLE:
        count_dependency_error("postgres")
        raise
    try:
        yield conn
    except BaseException as exc:
        if isinstance(exc, POSTGRES_UNAVAILABLE):
            count_dependency_error("postgres")
        await _settle(conn, exc, rollback_timeout=acquire_timeout)
        raise
    finally:
        await pool.release(conn)


async def _settle(conn: Conn, exc: BaseException, *, rollback_timeout: float) -> None:
    try:
        if isinstance(exc, POSTGRES_UNAVAILABLE) or not isinstance(exc, Exception):
            conn.terminate()
        elif conn.is_in_transaction():
            try:
                await conn.execute("ROLLBACK", timeout=rollback_timeout)
            except Exception:
                conn.terminate()
    except asyncpg.InterfaceError:
        pass  # asyncpg closed and released it already


class ConnectionSource(Protocol):
    """Where a service borrows connections: a :class:`BoundedPool` on the request path, or a
    plain pool (background work, tests)."""

    def acquire(self) -> AbstractAsyncContextManager[Conn]: ...


class BoundedPool:
    """The pool as the request path sees it: every borrowing, the wait for a connection and the
    statements run on it included, answers within ``timeout`` seconds
    (``THREADLINE_DEPENDENCY_TIMEOUT_SECONDS``) or raises :class:`TimeoutError` (503
    ``database_unavailable``), so a stalled Postgres costs a request that long, not a hang.

    Connections are borrowed through :func:`discarding_on_failure`: one whose block ended in a
    timeout, a cancellation or a connection error is closed rather than reused; one whose block
    raised an ordinary error (a 404, a Postgres error) goes back to the pool as usual. Background work (commits,
    maintenance, replication) keeps the plain pool and its own, longer bounds."""

    def __init__(self, pool: asyncpg.Pool[Any], *, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    def acquire(self) -> AbstractAsyncContextManager[Conn]:
        return _bounded_connection(self.pool, self.timeout)


@asynccontextmanager
async def _bounded_connection(pool: asyncpg.Pool[Any], seconds: float) -> AsyncIterator[Conn]:
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline, discarding_on_failure(pool, acquire_timeout=seconds) as conn:
            yield conn
    except TimeoutError as exc:
        if deadline.expired():
            # The bound cancelled the block, which discarding_on_failure does not count.
            count_dependency_error("postgres")
            raise TimeoutError(f"Postgres did not answer within {seconds:g}s") from exc
        raise


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _skip_session_reset(conn: asyncpg.Connection[Any]) -> None:
    """Pooled connections never keep session state (SET, LISTEN, advisory locks, cursors), so
    asyncpg's default reset query on every release would be a wasted round trip on the hot
    path. asyncpg still rolls back any open transaction before calling this."""


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool[Any]:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_skip_session_reset,
        command_timeout=30,
    )
    assert pool is not None  # create_pool only returns None when used as a context manager
    return pool


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir("pg_migrations")
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_PATTERN.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files must be named NNNN_snake_case.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {directory}")
    return migrations


async def apply_migrations(conn: Conn, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names of those applied now."""
    migrations = await asyncio.to_thread(load_migrations, directory)
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {row["version"]: row for row in rows}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(
                f"database has migrations {unknown} that this build does not know: "
                "it was migrated by a newer Threadline"
            )
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was edited after it was "
                        "applied; migrations are forward-only, add a new file instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            label = f"{migration.version:04d}_{migration.name}"
            logger.info("migration applied", extra={"migration": label})
            applied_now.append(label)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    return applied_now
