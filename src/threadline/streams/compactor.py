"""Compaction: a stream's small chunks in shared batch objects become one per-stream segment.

Group commit puts the records of many streams into one object per flush, which makes appends
cheap and replays expensive: reading a stream back touches one object per flush it was part of.
The compactor copies runs of a stream's batch chunks into a segment object (one PUT), then swaps
the index rows in one transaction. Readers holding the old chunk refs keep working until the
collector deletes the old objects after a grace period; a reader that is later still falls back
to the index (see ``StreamReader``).

Candidates are found without touching the append path: each pass counts, per stream, the chunks
of batch objects committed since the last pass (``compactor_progress``), into
``stream_compaction``. An object committed out of id order by another instance may be missed
by the count; its chunks are still compacted with the stream's next run.

A busy stream gets a segment per pass (every ``THREADLINE_MAINTENANCE_INTERVAL_SECONDS``), so its
segments are merged too: once it has ``_MERGE_MIN_SEGMENTS`` contiguous segments smaller than
``_SMALL_SEGMENT_BYTES``, they are rewritten as one (up to the 8 MiB read size). Each record is
copied at most twice more (60 KB segments become ~0.5 MB, those ~4 MB), and a full replay of a
day-long stream costs a few dozen GETs instead of one per pass it lived through.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence

from prometheus_client import Counter

from threadline.db import Conn
from threadline.storage.objects import ObjectStore
from threadline.streams.wire import ChunkRef

__all__ = ["Compactor"]

logger = logging.getLogger(__name__)

SEGMENTS = Counter("threadline_compactor_segments_total", "Segment objects written by the compactor")
COMPACTED_CHUNKS = Counter("threadline_compactor_chunks_total", "Batch chunks replaced by segments")

# A reader fetches a whole chunk; segments the size of one catch-up read keep that cheap.
_MAX_SEGMENT_BYTES = 8 * 1024 * 1024
_MAX_RUN_CHUNKS = 4096
_STREAMS_PER_PASS = 32
_FETCH_CONCURRENCY = 8
_SMALL_SEGMENT_BYTES = 1024 * 1024
_MERGE_MIN_SEGMENTS = 8


def plan_runs(chunks: Sequence[ChunkRef], max_bytes: int = _MAX_SEGMENT_BYTES) -> list[list[ChunkRef]]:
    """Contiguous runs of at least two chunks, each at most ``max_bytes`` (ordered by offset)."""
    runs: list[list[ChunkRef]] = []
    current: list[ChunkRef] = []
    size = 0
    for chunk in chunks:
        contiguous = current and current[-1].end == chunk.start
        if not contiguous or size + chunk.byte_length > max_bytes:
            if len(current) >= 2:
                runs.append(current)
            current, size = [], 0
        current.append(chunk)
        size += chunk.byte_length
    if len(current) >= 2:
        runs.append(current)
    return runs


class Compactor:
    def __init__(self, objects: ObjectStore, *, min_chunks: int, min_age_seconds: float) -> None:
        self._objects = objects
        self._min_chunks = min_chunks
        self._min_age_seconds = min_age_seconds

    async def run_pass(self, conn: Conn) -> int:
        """Count new batch chunks, then compact the streams with the most. Returns segments written."""
        await self._count_new_chunks(conn)
        stream_ids = await conn.fetch(
            """SELECT stream_id FROM stream_compaction WHERE batch_chunks >= $1
               ORDER BY batch_chunks DESC LIMIT $2""",
            self._min_chunks,
            _STREAMS_PER_PASS,
        )
        written = 0
        for row in stream_ids:
            written += await self.compact_stream(conn, row["stream_id"])
        return written

    async def _count_new_chunks(self, conn: Conn) -> None:
        async with conn.transaction():
            last = await conn.fetchval("SELECT last_object_id FROM compactor_progress FOR UPDATE")
            upto = await conn.fetchval("SELECT coalesce(max(id), 0) FROM stream_objects")
            if upto <= last:
                return
            await conn.execute(
                """INSERT INTO stream_compaction (stream_id, batch_chunks)
                   SELECT c.stream_id, count(*) FROM stream_chunks c
                   JOIN stream_objects o ON o.id = c.object_id AND o.kind = 'batch'
                   JOIN streams s ON s.id = c.stream_id AND s.deleted_at IS NULL
                   WHERE c.object_id > $1 AND c.object_id <= $2
                   GROUP BY c.stream_id
                   ON CONFLICT (stream_id) DO UPDATE
                   SET batch_chunks = stream_compaction.batch_chunks + excluded.batch_chunks""",
                last,
                upto,
            )
            await conn.execute("UPDATE compactor_progress SET last_object_id = $1", upto)

    async def compact_stream(self, conn: Conn, stream_id: int) -> int:
        """Rewrite the stream's old-enough batch chunks into segments. Returns segments written."""
        chunks = await _chunks(conn, stream_id, "batch", min_age_seconds=self._min_age_seconds)
        written = 0
        for run in plan_runs(chunks):
            if await self._rewrite(conn, stream_id, run):
                COMPACTED_CHUNKS.inc(len(run))
                written += 1
        written += await self._merge_segments(conn, stream_id)
        remaining = await conn.fetchval(
            """SELECT count(*) FROM stream_chunks c JOIN stream_objects o ON o.id = c.object_id
               WHERE c.stream_id = $1 AND o.kind = 'batch'""",
            stream_id,
        )
        await conn.execute(
            "UPDATE stream_compaction SET batch_chunks = $2 WHERE stream_id = $1", stream_id, remaining
        )
        return written

    async def _merge_segments(self, conn: Conn, stream_id: int) -> int:
        """Rewrite runs of the stream's small segments as one each. Returns segments written."""
        chunks = await _chunks(conn, stream_id, "segment", below_bytes=_SMALL_SEGMENT_BYTES)
        if len(chunks) < _MERGE_MIN_SEGMENTS:
            return 0
        written = 0
        for run in plan_runs(chunks):
            if len(run) >= _MERGE_MIN_SEGMENTS and await self._rewrite(conn, stream_id, run):
                written += 1
        return written

    async def _rewrite(self, conn: Conn, stream_id: int, run: list[ChunkRef]) -> bool:
        body = b"".join(await self._fetch(run))
        key = f"segments/{stream_id}/{run[0].start:016d}-{run[-1].end:016d}-{secrets.token_hex(6)}"
        await self._objects.put_new(key, body)
        try:
            async with conn.transaction():
                deleted = await conn.fetchval(
                    """WITH gone AS (
                           DELETE FROM stream_chunks c USING stream_objects o,
                                unnest($2::bigint[], $3::text[]) AS r (start_offset, key)
                           WHERE c.stream_id = $1 AND c.object_id = o.id
                             AND c.start_offset = r.start_offset AND o.key = r.key
                           RETURNING 1)
                       SELECT count(*) FROM gone""",
                    stream_id,
                    [chunk.start for chunk in run],
                    [chunk.object_key for chunk in run],
                )
                if deleted != len(run):
                    raise _Superseded  # trimmed, deleted or compacted elsewhere meanwhile
                await conn.execute(
                    """WITH obj AS (
                           INSERT INTO stream_objects (key, size, kind) VALUES ($1, $2, 'segment')
                           RETURNING id)
                       INSERT INTO stream_chunks (stream_id, start_offset, end_offset, object_id,
                                                  byte_start, byte_length)
                       SELECT $3, $4, $5, obj.id, 0, $2 FROM obj""",
                    key,
                    len(body),
                    stream_id,
                    run[0].start,
                    run[-1].end,
                )
        except _Superseded:
            await self._objects.delete([key])
            return False
        SEGMENTS.inc()
        return True

    async def _fetch(self, run: list[ChunkRef]) -> list[bytes]:
        """The run's bytes in order: one ranged GET per object, a few objects at a time."""
        by_key: dict[str, list[int]] = defaultdict(list)
        for index, chunk in enumerate(run):
            by_key[chunk.object_key].append(index)
        parts: list[bytes] = [b""] * len(run)
        limit = asyncio.Semaphore(_FETCH_CONCURRENCY)

        async def fetch(key: str, indexes: list[int]) -> None:
            async with limit:
                data = await self._objects.get_ranges(
                    key, [run[i].byte_start for i in indexes], [run[i].byte_length for i in indexes]
                )
            for i, part in zip(indexes, data, strict=True):
                parts[i] = part

        await asyncio.gather(*(fetch(key, indexes) for key, indexes in by_key.items()))
        return parts


async def _chunks(
    conn: Conn,
    stream_id: int,
    kind: str,
    *,
    min_age_seconds: float | None = None,
    below_bytes: int | None = None,
) -> list[ChunkRef]:
    """The stream's chunks in objects of ``kind`` that a rewrite may take, by offset: objects at
    least ``min_age_seconds`` old, chunks under ``below_bytes``, never wholly trimmed ones."""
    rows = await conn.fetch(
        """SELECT c.start_offset, c.end_offset, o.key, c.byte_start, c.byte_length
           FROM stream_chunks c JOIN stream_objects o ON o.id = c.object_id
           JOIN streams s ON s.id = c.stream_id
           WHERE c.stream_id = $1 AND o.kind = $2
             AND c.end_offset > s.trim_offset  -- never copy trimmed records into a new object
             AND ($3::float8 IS NULL OR o.created_at < now() - $3 * interval '1 second')
             AND ($4::bigint IS NULL OR c.byte_length < $4)
           ORDER BY c.start_offset LIMIT $5""",
        stream_id,
        kind,
        min_age_seconds,
        below_bytes,
        _MAX_RUN_CHUNKS,
    )
    return [ChunkRef(r[0], r[1], r[2], r[3], r[4]) for r in rows]


class _Superseded(Exception):
    pass
