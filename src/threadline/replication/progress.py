"""How far replication into ClickHouse has got, for read-your-writes (``minLsn``).

The consumer confirms an LSN on its slot only after ClickHouse committed every row up to it
(SPEC §5), so the slot's ``confirmed_flush_lsn`` is exactly "ClickHouse has everything before
this". Readers ask Postgres rather than the consumer: any instance can answer, whichever one leads.
LSNs are compared as ``pg_lsn`` in SQL; as text ``0/A`` would sort after ``0/10``. They are sent as
text and cast (``$1::text::pg_lsn``): asyncpg's own ``pg_lsn`` codec wants an integer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from threadline.db import Conn, ConnectionSource
from threadline.replication import SLOT

__all__ = ["SlotStatus", "mirror_ready", "replicated_lsn", "slot_status", "wait_for_lsn"]


async def replicated_lsn(conn: Conn, *, slot: str = SLOT) -> str | None:
    """The slot's confirmed flush LSN as text, or None if the slot does not exist (yet)."""
    value = await conn.fetchval(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot
    )
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class SlotStatus:
    confirmed_lsn: str | None  # None once Postgres invalidated the slot
    lag_bytes: int | None  # WAL between the flush position and what the consumer confirmed
    retained_wal_bytes: int | None  # WAL Postgres keeps for the slot (what fills the disk)
    # reserved / extended: fine; unreserved: about to be invalidated; lost: invalidated.
    wal_status: str | None
    safe_wal_bytes: int | None  # WAL that may still be written before it is invalidated

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


async def slot_status(conn: Conn, *, slot: str = SLOT) -> SlotStatus | None:
    """Where the slot stands, or None if it does not exist (yet)."""
    row = await conn.fetchrow(
        """SELECT confirmed_flush_lsn::text AS confirmed,
                  pg_wal_lsn_diff(pg_current_wal_flush_lsn(), confirmed_flush_lsn)::bigint AS lag_bytes,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,
                  wal_status, safe_wal_size
           FROM pg_replication_slots WHERE slot_name = $1""",
        slot,
    )
    if row is None:
        return None
    return SlotStatus(
        row["confirmed"], row["lag_bytes"], row["retained"], row["wal_status"], row["safe_wal_size"]
    )


async def mirror_ready(conn: Conn, *, slot: str = SLOT) -> bool:
    """True once the slot exists and its backfill finished: before that ClickHouse may hold only
    part of the sessions, and lists must come from Postgres."""
    ready = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)
                  AND EXISTS (SELECT 1 FROM replication_state WHERE slot_name = $1 AND backfilled_at IS NOT NULL)""",
        slot,
    )
    return bool(ready)


async def _reached(pool: ConnectionSource, lsn: str, slot: str) -> bool:
    async with pool.acquire() as conn:
        reached = await conn.fetchval(
            """SELECT coalesce($1::text::pg_lsn <= confirmed_flush_lsn, false)
               FROM pg_replication_slots WHERE slot_name = $2""",
            lsn,
            slot,
        )
    return bool(reached)


# A bounded wait whose outcome is an answer (True/False), not an error, hence `timeout`.
async def wait_for_lsn(
    pool: ConnectionSource,
    lsn: str,
    *,
    timeout: float,  # noqa: ASYNC109
    interval: float = 0.05,
    slot: str = SLOT,
) -> bool:
    """Poll until the slot has confirmed ``lsn``; False if it has not within ``timeout`` seconds.

    A missing slot counts as not there yet (the consumer creates it on first start). The pool
    connection is returned between polls, so waiting readers do not starve the pool.
    """
    deadline = time.monotonic() + timeout
    while True:
        if await _reached(pool, lsn, slot):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval, remaining))
