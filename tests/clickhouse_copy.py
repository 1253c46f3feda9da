"""Write sessions into ClickHouse ``sessions_v1`` directly, as the replication consumer would.

List tests need ClickHouse to hold exactly the rows they reason about, whether or not a replication
consumer is running. ``_version`` decides which copy of a row wins: ``version_now`` (the current WAL
position) beats every replicated copy of a change made before it, and ``TOP`` beats anything the
consumer will ever write, for rows that must stay as a test wrote them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from threadline.config import Settings
from threadline.replication.consumer import COLUMNS, SessionRow
from threadline.replication.pgoutput import parse_lsn
from threadline.storage.clickhouse import connect_clickhouse

TOP = 2**64 - 1


def version_now(db: Callable[..., Any]) -> int:
    """The current WAL flush position as a ``_version``: newer than every commit so far."""
    return parse_lsn(db("fetchval", "SELECT pg_current_wal_flush_lsn()::text"))


def v1_row(row: Mapping[str, Any], *, version: int, deleted: bool = False, **changes: Any) -> list[Any]:
    """A ``sessions_v1`` row from a Postgres ``sessions`` row (``SELECT *``), with ``changes``
    (Postgres column names), converted exactly as the replication consumer converts it."""
    return SessionRow({**row, **changes}, version, deleted).as_clickhouse()


def insert_v1(settings: Settings, rows: Sequence[list[Any]]) -> None:
    """Insert rows in one insert (one part) with the async client the server uses."""

    async def go() -> None:
        client = await connect_clickhouse(settings.clickhouse_url)
        try:
            await client.insert("sessions_v1", list(rows), column_names=COLUMNS)
        finally:
            await client.close()

    asyncio.run(go())


def session_rows(db: Callable[..., Any], *ids: str) -> list[dict[str, Any]]:
    rows = db("fetch", "SELECT * FROM sessions WHERE id = ANY($1::text[]) ORDER BY created_at", list(ids))
    return [dict(row) for row in rows]
