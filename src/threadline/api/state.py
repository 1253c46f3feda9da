"""What the app holds for its lifetime, created in the lifespan and reached from handlers.

Routes see services only: the stream API, session lists, the authenticator. The stream engine's
parts and the ClickHouse client stay behind them.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from threadline.auth.authenticator import Authenticator
from threadline.config import Settings
from threadline.db import BoundedPool
from threadline.replication.consumer import ReplicationConsumer
from threadline.sessions.lists import SessionLists
from threadline.storage.objects import ObjectStore
from threadline.streams.service import StreamService
from threadline.subscriptions.service import SubscriptionService

__all__ = ["AppState", "app_state"]


@dataclass(slots=True)
class AppState:
    settings: Settings
    pool: BoundedPool
    authenticator: Authenticator
    objects: ObjectStore
    streams: StreamService
    lists: SessionLists
    subscriptions: SubscriptionService
    replication: ReplicationConsumer | None = None  # this instance's consumer (leader or standby)


def app_state(conn: HTTPConnection) -> AppState:
    state: AppState = conn.app.state.threadline
    return state
