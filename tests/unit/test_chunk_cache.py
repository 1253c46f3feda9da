"""The chunk cache's single-flight loads: threadline.streams.cache.ChunkCache."""

from __future__ import annotations

import asyncio

import pytest

from threadline.streams.cache import ChunkCache, ChunkKey

KEY = ChunkKey("batches/a", 0, 5)


class SlowLoad:
    """A load that waits until released, counting its calls."""

    def __init__(self, result: bytes | Exception = b"hello") -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.result = result

    async def __call__(self, key: ChunkKey) -> bytes:
        self.calls += 1
        await self.release.wait()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_a_reader_that_leaves_does_not_cancel_the_others_wait() -> None:
    async def scenario() -> None:
        cache = ChunkCache(1 << 20)
        load = SlowLoad()
        first = asyncio.create_task(cache.get_or_load(KEY, load))
        second = asyncio.create_task(cache.get_or_load(KEY, load))
        await asyncio.sleep(0)
        first.cancel()  # the reader that started the load goes away
        await asyncio.sleep(0)
        load.release.set()
        assert await second == b"hello"
        assert first.cancelled()
        assert load.calls == 1
        assert cache.get(KEY) == b"hello"  # the GET was not wasted

    asyncio.run(scenario())


def test_a_load_whose_readers_all_left_still_fills_the_cache() -> None:
    async def scenario() -> None:
        cache = ChunkCache(1 << 20)
        load = SlowLoad()
        only = asyncio.create_task(cache.get_or_load(KEY, load))
        await asyncio.sleep(0)
        only.cancel()
        load.release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert cache.get(KEY) == b"hello"
        assert await cache.get_or_load(KEY, load) == b"hello"
        assert load.calls == 1

    asyncio.run(scenario())


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    async def scenario() -> None:
        cache = ChunkCache(1 << 20)
        load = SlowLoad(OSError("store down"))
        waiters = [asyncio.create_task(cache.get_or_load(KEY, load)) for _ in range(3)]
        await asyncio.sleep(0)
        load.release.set()
        for waiter in waiters:
            with pytest.raises(OSError, match="store down"):
                await waiter
        assert load.calls == 1
        assert cache.get(KEY) is None
        load.result = b"again"
        assert await cache.get_or_load(KEY, load) == b"again"  # the next read tries again
        assert load.calls == 2

    asyncio.run(scenario())
