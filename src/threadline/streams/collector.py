"""Garbage collection of stored records: expired streams, unreferenced objects, orphan objects.

- **Expired streams** (stand-alone streams past their TTL or expiry) are retired: deleted with
  their index, or kept soft-deleted while forks still read from them.
- **Unreferenced objects**: when the last chunk row pointing at an object goes (stream deleted,
  trimmed, compacted), a trigger marks the object; after ``grace_seconds`` it is deleted from the
  bucket, then its row. The grace lets readers that already hold a chunk ref finish.
- **Orphan objects**: an object written by a flush or compaction whose transaction never
  committed (a crash between the PUT and the COMMIT) has no row. A slow sweep lists the bucket's
  record prefixes and deletes keys no row knows once they are ``orphan_min_age_seconds`` old —
  longer than any flush may take from its PUT to its COMMIT (the committer gives up on a flush
  whose commit starts more than a minute after its PUT, and bounds each statement). The
  same sweep marks rows the trigger may have missed (two transactions removing an object's last
  chunks concurrently each still see the other's).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from threadline.db import Conn
from threadline.storage.objects import ObjectStore
from threadline.streams.heads import load_head_by_id, lock_name, retire

__all__ = ["RECORD_PREFIXES", "Collector"]

logger = logging.getLogger(__name__)

# Every object the engine writes lives under one of these (batches: group commits; segments:
# the compactor). Nothing else in the bucket is ever deleted by the collector.
RECORD_PREFIXES = ("batches/", "segments/")

DELETED_OBJECTS = Counter(
    "threadline_gc_deleted_objects_total", "Objects deleted from the bucket", ["reason"]
)
RETIRED_STREAMS = Counter("threadline_gc_retired_streams_total", "Expired streams retired by the janitor")

_BATCH = 500


class Collector:
    def __init__(self, objects: ObjectStore, *, grace_seconds: float, orphan_min_age_seconds: float) -> None:
        self._objects = objects
        self._grace = grace_seconds
        self._orphan_age = orphan_min_age_seconds

    async def retire_expired_streams(self, conn: Conn) -> int:
        rows = await conn.fetch(
            """SELECT id, environment_id, name FROM streams
               WHERE expires_at <= now() AND deleted_at IS NULL AND session_id IS NULL
               ORDER BY expires_at LIMIT $1""",
            _BATCH,
        )
        for row in rows:
            async with conn.transaction():
                # The same lock a PUT of this name takes, so a re-create never races the janitor.
                await lock_name(conn, row["environment_id"], row["name"])
                head = await load_head_by_id(conn, row["id"])
                if head.expired() and not head.deleted:
                    await retire(conn, head)
                    RETIRED_STREAMS.inc()
        return len(rows)

    async def delete_unreferenced(self, conn: Conn) -> int:
        rows = await conn.fetch(
            """SELECT id, key FROM stream_objects
               WHERE unreferenced_at < now() - $1 * interval '1 second'
               ORDER BY unreferenced_at LIMIT $2""",
            self._grace,
            _BATCH,
        )
        if not rows:
            return 0
        await self._objects.delete([row["key"] for row in rows])
        # Only rows still unreferenced: a row cannot gain a chunk again, but be exact anyway.
        await conn.execute(
            """DELETE FROM stream_objects o WHERE o.id = ANY($1::bigint[])
               AND NOT EXISTS (SELECT 1 FROM stream_chunks c WHERE c.object_id = o.id)""",
            [row["id"] for row in rows],
        )
        DELETED_OBJECTS.labels("unreferenced").inc(len(rows))
        return len(rows)

    async def sweep(self, conn: Conn) -> int:
        """Mark rows the trigger missed, and delete old objects no row knows. Returns deletions."""
        await conn.execute(
            """UPDATE stream_objects o SET unreferenced_at = now()
               WHERE o.unreferenced_at IS NULL
                 AND o.created_at < now() - $1 * interval '1 second'
                 AND NOT EXISTS (SELECT 1 FROM stream_chunks c WHERE c.object_id = o.id)""",
            self._grace,
        )
        cutoff = datetime.now(UTC) - timedelta(seconds=self._orphan_age)
        deleted = 0
        for prefix in RECORD_PREFIXES:
            page: list[str] = []
            async for info in self._objects.list(prefix):
                if info.last_modified < cutoff:
                    page.append(info.key)
                if len(page) >= _BATCH:
                    deleted += await self._delete_orphans(conn, page)
                    page = []
            if page:
                deleted += await self._delete_orphans(conn, page)
        return deleted

    async def _delete_orphans(self, conn: Conn, keys: list[str]) -> int:
        known = {
            row["key"]
            for row in await conn.fetch("SELECT key FROM stream_objects WHERE key = ANY($1::text[])", keys)
        }
        orphans = [key for key in keys if key not in known]
        if orphans:
            await self._objects.delete(orphans)
            DELETED_OBJECTS.labels("orphan").inc(len(orphans))
            logger.info("deleted orphan objects", extra={"count": len(orphans)})
        return len(orphans)
