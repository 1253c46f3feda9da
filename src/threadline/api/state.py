"""What the app holds for its lifetime, created in the lifespan and reached from handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from starlette.requests import HTTPConnection

from threadline.auth.authenticator import Authenticator
from threadline.config import Settings
from threadline.storage.objects import ObjectStore

__all__ = ["AppState", "app_state"]


@dataclass(slots=True)
class AppState:
    settings: Settings
    pool: asyncpg.Pool[Any]
    authenticator: Authenticator
    objects: ObjectStore
    clickhouse: Any | None  # clickhouse_connect AsyncClient, None while unreachable


def app_state(conn: HTTPConnection) -> AppState:
    state: AppState = conn.app.state.threadline
    return state
