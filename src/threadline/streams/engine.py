"""The stream engine one server instance runs: committer, reader, live hub, maintenance.

It owns the background tasks' lifetimes (``start`` in the app's lifespan, ``stop`` on shutdown
after in-flight appends drained) and exposes one thing to the API: :attr:`StreamEngine.service`,
the :class:`~threadline.streams.service.StreamService` every route uses.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from threadline.config import Settings
from threadline.db import ConnectionSource
from threadline.storage.objects import ObjectStore
from threadline.streams.cache import ChunkCache
from threadline.streams.committer import ActivitySink, GroupCommitter
from threadline.streams.live import LiveHub
from threadline.streams.maintenance import Maintenance
from threadline.streams.reader import StreamReader
from threadline.streams.service import StreamService
from threadline.streams.targets import AppendTargets

__all__ = ["StreamEngine"]

# Names whose (id, content type) the append path remembers: ~200 bytes each, so a few MiB.
_APPEND_TARGETS = 20_000


class StreamEngine:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool[Any],
        requests: ConnectionSource,
        objects: ObjectStore,
        activity: ActivitySink,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.objects = objects
        self.cache = ChunkCache(settings.chunk_cache_bytes)
        self.live = LiveHub(settings.database_url)
        self.targets = AppendTargets(_APPEND_TARGETS)
        self.committer = GroupCommitter(
            pool,
            objects,
            self.live,
            self.cache,
            activity,
            max_inflight=settings.commit_concurrency,
            statement_timeout=settings.commit_timeout_seconds,
            outcome_wait=settings.commit_outcome_wait_seconds,
        )
        # The request path (lookups, reads) borrows from ``requests`` (answers within the
        # dependency bound); the committer and maintenance keep the plain pool and their own bounds.
        self.reader = StreamReader(requests, objects, self.cache, max_read_bytes=settings.max_read_bytes)
        self.maintenance = Maintenance(settings, pool, objects.background())
        self.service = StreamService(
            requests,
            self.committer,
            self.reader,
            self.live,
            self.targets,
            live_read_bytes=settings.sse_max_buffered_bytes,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.committer.run(), name="threadline-committer"),
            asyncio.create_task(self.live.run(), name="threadline-live"),
            asyncio.create_task(self.maintenance.run(), name="threadline-maintenance"),
        ]
        # Live readers registered before the listener is up would miss other instances'
        # commits until the first resync; a short wait makes the common case exact.
        await self.live.wait_connected(5.0)

    async def stop(self, grace_seconds: float = 10.0) -> None:
        await self.committer.drain(grace_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
