"""A bounded in-memory cache of chunk bytes, shared by every reader in the process.

Live readers all want the same few newest chunks: the committing instance puts them here as it
acknowledges them, other instances fetch each once (single flight) however many subscribers
wait, and catch-up readers of recent history hit it too. Chunks are immutable, so entries never
go stale; the byte budget evicts the least recently used.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import NamedTuple

__all__ = ["ChunkCache", "ChunkKey"]


class ChunkKey(NamedTuple):
    object_key: str
    byte_start: int
    byte_length: int


class ChunkCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ChunkKey, bytes] = OrderedDict()
        self._bytes = 0
        self._loading: dict[ChunkKey, asyncio.Future[bytes]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, key: ChunkKey, data: bytes) -> None:
        if len(data) > self.max_bytes // 4 or key in self._entries:
            return  # one huge chunk would flush everything else out
        self._entries[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def get(self, key: ChunkKey) -> bytes | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def lookup(self, key: ChunkKey) -> bytes | None:
        """The cached bytes, counted as a hit; None (not counted) when absent."""
        data = self.get(key)
        if data is not None:
            self.hits += 1
        return data

    async def get_or_load(self, key: ChunkKey, load: Callable[[ChunkKey], Awaitable[bytes]]) -> bytes:
        """The chunk's bytes, loaded once however many readers ask at the same time.

        The load runs as its own task, not in the first reader's: a reader that leaves (its
        subscriber disconnected, its request cancelled) neither cancels the others' wait nor
        wastes the GET, whose bytes still land in the cache."""
        data = self.lookup(key)
        if data is not None:
            return data
        loading = self._loading.get(key)
        if loading is None:
            self.misses += 1
            loading = asyncio.ensure_future(self._load(key, load))
            loading.add_done_callback(_retrieve)
            self._loading[key] = loading
        else:
            self.hits += 1
        return await asyncio.shield(loading)

    async def _load(self, key: ChunkKey, load: Callable[[ChunkKey], Awaitable[bytes]]) -> bytes:
        try:
            data = await load(key)
        finally:
            del self._loading[key]
        self.put(key, data)
        return data


def _retrieve(task: asyncio.Future[bytes]) -> None:
    """Mark a load's failure as seen: when every reader waiting for it has left, nobody else does."""
    if not task.cancelled():
        task.exception()
