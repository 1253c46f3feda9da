"""``lastActiveAt`` of sessions, written at most once per second per session.

Every session row change is replicated to ClickHouse, so a chatty agent appending hundreds of
records a second must not rewrite its session row each time (SPEC §4). Appends mark the session
here; once a second one UPDATE moves every marked session's ``last_active_at`` to the time of
its latest append. Kept out of the append transaction so that appends never wait on, or lock,
session rows. Closing a session folds its streams' last record time in, so the value is exact
once the session is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg

__all__ = ["SessionActivity"]

logger = logging.getLogger(__name__)


class SessionActivity:
    def __init__(self, pool: asyncpg.Pool[Any], *, interval: float = 1.0) -> None:
        self._pool = pool
        self._interval = interval
        self._marked: dict[str, datetime] = {}

    def touch(self, session_id: str, at: datetime | None = None) -> None:
        self._marked[session_id] = at or datetime.now(UTC)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._marked:
            return
        marked, self._marked = self._marked, {}
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    """UPDATE sessions s SET last_active_at = u.at
                       FROM unnest($1::text[], $2::timestamptz[]) AS u (id, at)
                       WHERE s.id = u.id AND s.closed_at IS NULL AND s.last_active_at < u.at""",
                    list(marked),
                    list(marked.values()),
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("could not record session activity", extra={"error": str(exc)})
            for session_id, at in marked.items():  # try again next second; keep the newest time
                if self._marked.get(session_id, at) <= at:
                    self._marked[session_id] = at

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
