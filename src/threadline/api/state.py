"""What the app holds for its lifetime, created in the lifespan and reached from handlers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from starlette.requests import HTTPConnection

from threadline.auth.authenticator import Authenticator
from threadline.config import Settings
from threadline.replication.consumer import ReplicationConsumer
from threadline.storage.objects import ObjectStore
from threadline.streams.engine import StreamEngine

__all__ = ["AppState", "ListSourceState", "app_state"]


@dataclass(slots=True)
class ListSourceState:
    """What list/count remember between requests about where to read (``api/list_source.py``).

    Times are ``time.monotonic()``. Both caches keep a down ClickHouse, or a deployment without
    replication, from costing every list request a failed connect or an extra Postgres query.
    """

    clickhouse_retry_at: float = 0.0  # no ClickHouse (connect or query) before this
    mirror_checked_at: float | None = None
    mirror_ready: bool = False
    connect_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class AppState:
    settings: Settings
    pool: asyncpg.Pool[Any]
    authenticator: Authenticator
    objects: ObjectStore
    streams: StreamEngine
    clickhouse: Any | None  # clickhouse_connect AsyncClient, None while unreachable
    replication: ReplicationConsumer | None = None  # this instance's consumer (leader or standby)
    lists: ListSourceState = field(default_factory=ListSourceState)


def app_state(conn: HTTPConnection) -> AppState:
    state: AppState = conn.app.state.threadline
    return state
