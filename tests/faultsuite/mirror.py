"""Postgres ``sessions`` against their ClickHouse copy ``sessions_v1``, field by field.

Replication promises that once it has caught up, ClickHouse holds every session exactly as
Postgres does. The comparison covers the fields a change can touch (tags, closing, activity
times) at microsecond precision, so a lost, stale or duplicated change shows as a difference.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import clickhouse_rows, pg_query
from threadline.embedded.stack import StackEndpoints

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


def _row(r: Any) -> Row:
    return (r[0], tuple(r[1] or ()), int(r[2]), int(r[3]), None if r[4] is None else int(r[4]))


def mirror_difference(endpoints: StackEndpoints, environment_id: str) -> dict[str, Any]:
    """What differs between Postgres and ClickHouse for one environment; empty when equal."""
    postgres = {r[0]: _row(r) for r in pg_query(endpoints.database_url, "fetch", _POSTGRES, environment_id)}
    clickhouse: dict[str, Row] = {}
    for r in clickhouse_rows(endpoints, _CLICKHOUSE, e=environment_id):
        if r[0] in clickhouse:  # FINAL keeps one row per session: a second one is a duplicate copy
            raise AssertionError(f"session {r[0]} appears twice in sessions_v1 FINAL")
        clickhouse[r[0]] = _row(r)
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
