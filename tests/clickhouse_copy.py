"""Write sessions into ClickHouse ``sessions_v1`` directly, as the replication consumer would.

List tests need ClickHouse to hold exactly the rows they reason about, whether or not a replication
consumer is running. ``_version`` decides which copy of a row wins: ``version_now`` (the current WAL
position) beats every replicated copy of a change made before it, and ``TOP`` beats anything the
consumer will ever write, for rows that must stay as a test wrote them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from threadline.config import Settings
from threadline.storage.clickhouse import connect_clickhouse

TOP = 2**64 - 1

COLUMNS = [
    "environment_id",
    "organization_id",
    "project_id",
    "session_id",
    "external_id",
    "type",
    "task_identifier",
    "tags",
    "metadata",
    "closed_at",
    "closed_reason",
    "expires_at",
    "created_at",
    "updated_at",
    "last_active_at",
    "_version",
    "_is_deleted",
]


def lsn_to_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def version_now(db: Callable[..., Any]) -> int:
    """The current WAL flush position as a ``_version``: newer than every commit so far."""
    return lsn_to_int(db("fetchval", "SELECT pg_current_wal_flush_lsn()::text"))


def v1_row(row: Mapping[str, Any], *, version: int, deleted: bool = False, **changes: Any) -> list[Any]:
    """A ``sessions_v1`` row from a Postgres ``sessions`` row (``SELECT *``), with ``changes``."""
    values = {
        "environment_id": row["environment_id"],
        "organization_id": row["organization_id"],
        "project_id": row["project_id"],
        "session_id": row["id"],
        "external_id": row["external_id"] or "",
        "type": row["type"],
        "task_identifier": row["task_identifier"] or "",
        "tags": list(row["tags"]),
        "metadata": row["metadata"] if isinstance(row["metadata"], str) else json.dumps(row["metadata"]),
        "closed_at": row["closed_at"],
        "closed_reason": row["closed_reason"] or "",
        "expires_at": row["expires_at"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "last_active_at": row["last_active_at"],
        "_version": version,
        "_is_deleted": int(deleted),
    }
    values.update(changes)
    return [values[column] for column in COLUMNS]


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
