"""The maintenance loop: one instance at a time compacts, collects garbage and retires expired
streams.

Leadership is a Postgres advisory lock taken for each pass (not held between passes), so any
instance can take over the moment the previous one dies; two instances never do the same pass at
once, and nothing breaks if they did (every step is idempotent and checked in its transaction).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from threadline.config import Settings
from threadline.storage.objects import ObjectStore, ObjectStoreUnavailable
from threadline.streams.collector import Collector
from threadline.streams.compactor import Compactor

__all__ = ["MAINTENANCE_LOCK_KEY", "Maintenance", "PassReport"]

logger = logging.getLogger(__name__)

MAINTENANCE_LOCK_KEY = 0x7468_7264_6C6E_0003


@dataclass(frozen=True, slots=True)
class PassReport:
    retired_streams: int
    segments_written: int
    objects_deleted: int
    orphans_deleted: int


class Maintenance:
    def __init__(self, settings: Settings, pool: asyncpg.Pool[Any], objects: ObjectStore) -> None:
        self._settings = settings
        self._pool = pool
        self.compactor = Compactor(
            objects,
            min_chunks=settings.compact_min_chunks,
            min_age_seconds=settings.compact_min_age_seconds,
        )
        self.collector = Collector(
            objects,
            grace_seconds=settings.gc_grace_seconds,
            orphan_min_age_seconds=settings.orphan_min_age_seconds,
        )

    async def run(self) -> None:
        next_sweep = time.monotonic() + self._settings.orphan_sweep_interval_seconds
        while True:
            await asyncio.sleep(self._settings.maintenance_interval_seconds)
            sweep = time.monotonic() >= next_sweep
            try:
                report = await self.run_pass(sweep=sweep)
            except Exception as exc:  # the loop must outlive any one pass
                expected = (OSError, TimeoutError, asyncpg.PostgresError, ObjectStoreUnavailable)
                logger.warning(
                    "maintenance pass failed",
                    extra={"error": str(exc)},
                    exc_info=not isinstance(exc, expected),
                )
                continue
            if report is not None and sweep:
                next_sweep = time.monotonic() + self._settings.orphan_sweep_interval_seconds
            if report is not None and any(dataclasses.astuple(report)):
                logger.info("maintenance pass", extra=dataclasses.asdict(report))

    async def run_pass(self, *, sweep: bool = False) -> PassReport | None:
        """One pass, if this instance gets the lock (None if another instance is mid-pass)."""
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_KEY):
                return None
            try:
                retired = await self.collector.retire_expired_streams(conn)
                segments = await self.compactor.run_pass(conn)
                deleted = await self.collector.delete_unreferenced(conn)
                orphans = await self.collector.sweep(conn) if sweep else 0
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
        return PassReport(retired, segments, deleted, orphans)
