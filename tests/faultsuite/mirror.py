"""Postgres ``sessions`` against their ClickHouse copy ``sessions_v1``, field by field.

Replication promises that once it has caught up, ClickHouse holds every session exactly as
Postgres does. The comparison covers the fields a change can touch (tags, closing, activity
times) at microsecond precision, so a lost, stale or duplicated change shows as a difference.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import clickhouse_connect

from threadline.storage.clickhouse import parse_clickhouse_url

Row = tuple[str, tuple[str, ...], int, int, int | None]

_POSTGRES = """
SELECT id, tags,
       (extract(epoch FROM updated_at) * 1000000)::bigint,
       (extract(epoch FROM last_active_at) * 1000000)::bigint,
       (extract(epoch FROM closed_at) * 1000000)::bigint
FROM sessions WHERE environment_id = $1
"""
_CLICKHOUSE = """
SELECT session_id, tags, toUnixTimestamp64Micro(updated_at), toUnixTimestamp64Micro(last_active_at),
       if(isNull(closed_at), NULL, toUnixTimestamp64Micro(assumeNotNull(closed_at)))
FROM sessions_v1 FINAL WHERE environment_id = {e:String}
"""


async def postgres_sessions(database_url: str, environment_id: str) -> dict[str, Row]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(_POSTGRES, environment_id)
    finally:
        await conn.close()
    return {
        r[0]: (r[0], tuple(r[1] or ()), int(r[2]), int(r[3]), None if r[4] is None else int(r[4]))
        for r in rows
    }


def clickhouse_sessions(clickhouse_url: str, environment_id: str) -> dict[str, Row]:
    target = parse_clickhouse_url(clickhouse_url)
    client = clickhouse_connect.get_client(
        host=target.host,
        port=target.port,
        username=target.username,
        password=target.password,
        database=target.database,
        autogenerate_session_id=False,
        connect_timeout=5,
        send_receive_timeout=30,
    )
    try:
        result: Any = client.query(_CLICKHOUSE, parameters={"e": environment_id}).result_rows
    finally:
        client.close()
    rows: dict[str, Row] = {}
    for r in result:
        if r[0] in rows:  # FINAL keeps one row per session: a second one is a duplicate copy
            raise AssertionError(f"session {r[0]} appears twice in sessions_v1 FINAL")
        rows[r[0]] = (r[0], tuple(r[1]), int(r[2]), int(r[3]), None if r[4] is None else int(r[4]))
    return rows


def mirror_difference(database_url: str, clickhouse_url: str, environment_id: str) -> dict[str, Any]:
    """What differs between Postgres and ClickHouse for one environment; empty when equal."""
    postgres = asyncio.run(postgres_sessions(database_url, environment_id))
    clickhouse = clickhouse_sessions(clickhouse_url, environment_id)
    missing = sorted(set(postgres) - set(clickhouse))
    extra = sorted(set(clickhouse) - set(postgres))
    changed = sorted(k for k in set(postgres) & set(clickhouse) if postgres[k] != clickhouse[k])
    if not (missing or extra or changed):
        return {}
    return {
        "postgres": len(postgres),
        "clickhouse": len(clickhouse),
        "missing": missing[:5],
        "extra": extra[:5],
        "changed": [(postgres[k], clickhouse[k]) for k in changed[:3]],
        "counts": (len(missing), len(extra), len(changed)),
    }
