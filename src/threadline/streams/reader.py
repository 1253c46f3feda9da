"""Reads: from an offset, through the chunk index (or a live tail's recent chunks), the chunk
cache and the object store.

A fork reads offsets below its fork point from its source (and that one from its own source),
so a fork shares its source's history without copying a byte.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from threadline.db import ConnectionSource
from threadline.storage.objects import ObjectStore, ObjectStoreUnavailable
from threadline.streams.cache import ChunkCache, ChunkKey
from threadline.streams.heads import StreamHead
from threadline.streams.live import StreamTail
from threadline.streams.records import blob_at, iter_records
from threadline.streams.wire import ChunkRef

__all__ = ["ReadResult", "StreamReader"]

_INDEX_PAGE = 512


@dataclass(frozen=True, slots=True)
class ReadResult:
    records: list[memoryview]
    next_offset: int  # the offset after the last record returned
    tail_offset: int  # the stream's tail as far as this read knows
    closed: bool  # the stream is closed (readers at the tail are done)

    @property
    def up_to_date(self) -> bool:
        return self.next_offset >= self.tail_offset


class ObjectReplaced(ObjectStoreUnavailable):
    """A chunk's object is gone: compacted and collected after the chunk ref was read."""


class StreamReader:
    def __init__(
        self, pool: ConnectionSource, objects: ObjectStore, cache: ChunkCache, *, max_read_bytes: int
    ) -> None:
        self._pool = pool
        self._objects = objects
        self._cache = cache
        self.max_read_bytes = max_read_bytes

    async def read(
        self,
        head: StreamHead,
        offset: int,
        *,
        tail: StreamTail | None = None,
        max_bytes: int | None = None,
        retried: bool = False,
    ) -> ReadResult:
        """Records from ``offset`` up to the tail, at most about ``max_bytes`` of them (at least one)."""
        budget = max_bytes or self.max_read_bytes
        tail_offset = head.next_offset
        closed = head.closed
        if tail is not None and tail.next_offset >= tail_offset:
            tail_offset, closed = tail.next_offset, tail.closed or closed
        head.check_readable(offset)
        if offset >= tail_offset:
            return ReadResult([], offset, tail_offset, closed)
        chunks: list[tuple[ChunkRef, int]] = []  # (chunk, upper bound for this stream's part)
        recent = tail.chunks_from(offset) if tail is not None and offset >= head.fork_offset else None
        if recent is not None:
            chunks = [(chunk, tail_offset) for chunk in recent]
        else:
            chunks = await self._locate(head, offset, tail_offset, budget)
        selected: list[tuple[ChunkRef, int]] = []
        size = 0
        for chunk, bound in chunks:
            if selected and size + chunk.byte_length > budget:
                break
            selected.append((chunk, bound))
            size += chunk.byte_length
        try:
            blobs = await self._chunks_bytes([chunk for chunk, _ in selected])
        except ObjectReplaced:
            if retried:
                raise
            # The compactor rewrote these chunks and the collector deleted the old objects while
            # we held refs to them: forget the tail's refs and ask the index.
            if tail is not None:
                tail.recent.clear()
            return await self.read(head, offset, tail=tail, max_bytes=max_bytes, retried=True)
        records: list[memoryview] = []
        position = offset
        for (chunk, bound), data in zip(selected, blobs, strict=True):
            for record in iter_records(data, chunk.start, position, bound):
                records.append(record)
            position = min(chunk.end, bound)
        return ReadResult(records, max(position, offset), tail_offset, closed)

    async def record_at(self, head: StreamHead, offset: int) -> tuple[bytes, int, int]:
        """``(record, first offset of its append, records in that append)`` at ``offset``."""
        located = await self._locate(head, offset, offset + 1, 1)
        if not located:
            raise LookupError(f"no record at offset {offset}")
        chunk, _ = located[0]
        return blob_at(await self._chunk_bytes(chunk), chunk.start, offset)

    async def _locate(
        self, head: StreamHead, offset: int, tail_offset: int, budget: int
    ) -> list[tuple[ChunkRef, int]]:
        """Chunks covering ``[offset, …)``, following the fork chain below each fork point."""
        located: list[tuple[ChunkRef, int]] = []
        size = 0
        async with self._pool.acquire() as conn:
            for stream_id, low, high in head.lineage:
                if offset >= high or size >= budget:
                    continue
                start = max(offset, low)
                rows = await conn.fetch(
                    """SELECT c.start_offset, c.end_offset, o.key, c.byte_start, c.byte_length
                       FROM stream_chunks c JOIN stream_objects o ON o.id = c.object_id
                       WHERE c.stream_id = $1 AND c.end_offset > $2 AND c.start_offset < $3
                       ORDER BY c.start_offset LIMIT $4""",
                    stream_id,
                    start,
                    min(high, tail_offset),
                    _INDEX_PAGE,
                )
                for row in rows:
                    chunk = ChunkRef(row[0], row[1], row[2], row[3], row[4])
                    located.append((chunk, min(high, tail_offset)))
                    size += chunk.byte_length
                    if size >= budget:
                        break
                if rows and rows[-1][1] < min(high, tail_offset):
                    break  # this page did not reach the end of this part: the caller reads on later
        return located

    async def _chunks_bytes(self, chunks: list[ChunkRef]) -> list[bytes]:
        """The chunks' bytes, from the cache where it has them. A live tail's chunks are almost
        always cached, and a thousand subscribers waking at once then read without a task or a
        suspension each; only misses go to the object store, concurrently."""
        blobs: list[bytes | None] = [
            self._cache.lookup(ChunkKey(chunk.object_key, chunk.byte_start, chunk.byte_length))
            for chunk in chunks
        ]
        missing = [index for index, blob in enumerate(blobs) if blob is None]
        if len(missing) == 1:
            blobs[missing[0]] = await self._chunk_bytes(chunks[missing[0]])
        elif missing:
            loaded = await asyncio.gather(*(self._chunk_bytes(chunks[index]) for index in missing))
            for index, blob in zip(missing, loaded, strict=True):
                blobs[index] = blob
        return [blob for blob in blobs if blob is not None]

    async def _chunk_bytes(self, chunk: ChunkRef) -> bytes:
        key = ChunkKey(chunk.object_key, chunk.byte_start, chunk.byte_length)
        return await self._cache.get_or_load(key, self._load)

    async def _load(self, key: ChunkKey) -> bytes:
        try:
            return await self._objects.get_range(key.object_key, key.byte_start, key.byte_length)
        except FileNotFoundError as exc:
            # The compactor replaced this object after we read the index; the caller retries.
            raise ObjectReplaced(f"object {key.object_key} was replaced; retry") from exc
