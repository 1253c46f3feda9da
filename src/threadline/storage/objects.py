"""S3-compatible object storage through obstore.

obstore (Rust ``object_store``) is async-native and costs ~0.4 ms of client CPU per PUT against
~2.4 ms for botocore (SPEC §8), which matters because object PUTs sit on the append path.
Dependency errors are translated here, once, into :class:`ObjectStoreUnavailable`.

Retries are few and short on purpose: an append waits on its PUT, and SPEC §4 wants appends to
fail fast (503) while the store is down rather than hang for object_store's default 3 minutes.
On the request path every call is bounded by ``THREADLINE_DEPENDENCY_TIMEOUT_SECONDS``, so a
stalled store (accepting connections, never answering) is a 503 within it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import S3Store

from threadline.config import Settings
from threadline.errors import DependencyUnavailable
from threadline.metrics import count_dependency_error

__all__ = ["ObjectInfo", "ObjectStore", "ObjectStoreUnavailable"]

T = TypeVar("T")


class ObjectStoreUnavailable(DependencyUnavailable):
    """S3 did not answer, or not in time."""


class ObjectInfo:
    __slots__ = ("key", "last_modified", "size")

    def __init__(self, key: str, size: int, last_modified: datetime) -> None:
        self.key = key
        self.size = size
        self.last_modified = last_modified


class ObjectStore:
    """One bucket. With ``timeout`` (the request path: appends' PUTs, reads' GETs) every call answers
    within that many seconds, a stalled store raising :class:`ObjectStoreUnavailable` (503
    ``storage_unavailable``) rather than hanging; without it (background work: compaction, the
    orphan sweep) calls keep the client's own, longer timeouts."""

    def __init__(self, settings: Settings, *, timeout: float | None = None) -> None:
        self.bucket = settings.s3_bucket
        self._settings = settings
        self._timeout = timeout
        request_timeout = timedelta(seconds=10) if timeout is None else timedelta(seconds=timeout)
        # Retries happen only while this much of the call's time has passed: a refused connection
        # is retried, a request that timed out is not (that wait already used the bound).
        retry_timeout = timedelta(seconds=3) if timeout is None else request_timeout / 2
        self._store = S3Store(
            settings.s3_bucket,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
            allow_http=settings.s3_endpoint.startswith("http://"),
            client_options={
                "timeout": request_timeout,
                "connect_timeout": min(timedelta(seconds=2), request_timeout / 2),
            },
            retry_config={
                "max_retries": 2,
                "retry_timeout": retry_timeout,
                "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1)},
            },
        )

        self._reads = asyncio.Semaphore(settings.s3_max_concurrent_reads)
        # obstore starts a request when its awaitable is created, so reads are made (by the
        # factories below) only once they hold a slot.

    def background(self) -> ObjectStore:
        """The same bucket for background work: no request bound, the client's longer timeouts."""
        return ObjectStore(self._settings)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """``call``'s result within the bound; a store that fails or does not answer in time is
        unavailable. A missing object is an answer (FileNotFoundError / NotFoundError)."""
        return await self._bounded(what, lambda: call)

    async def _read(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """A GET, started once one of the read slots is free; the wait counts against the bound."""

        async def gated() -> T:
            async with self._reads:
                return await make()

        return await self._bounded(what, gated)

    async def _bounded(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout):  # None: no bound (background work)
                return await make()
        except (FileNotFoundError, NotFoundError):
            raise
        except TimeoutError as exc:
            count_dependency_error("s3")
            raise ObjectStoreUnavailable(f"{what}: no answer within {self._timeout:g}s") from exc
        except Exception as exc:
            count_dependency_error("s3")
            raise ObjectStoreUnavailable(f"{what} failed: {exc}") from exc

    async def ping(self) -> None:
        """Prove the bucket answers with our credentials (a missing key is a good answer)."""
        try:
            await self._call(
                f"object store {self.bucket!r}", obstore.head_async(self._store, ".threadline-ping")
            )
        except (FileNotFoundError, NotFoundError):
            return

    async def put_new(self, key: str, data: bytes) -> None:
        """Write an object that must not exist yet (keys are random; this guards against reuse)."""
        await self._call(f"PUT {key}", obstore.put_async(self._store, key, data, mode="create"))

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        data = await self._read(
            f"GET {key}", lambda: obstore.get_range_async(self._store, key, start=start, length=length)
        )
        return bytes(data)

    async def get_ranges(self, key: str, starts: Sequence[int], lengths: Sequence[int]) -> list[bytes]:
        parts = await self._read(
            f"GET {key}",
            lambda: obstore.get_ranges_async(self._store, key, starts=list(starts), lengths=list(lengths)),
        )
        return [bytes(part) for part in parts]

    async def delete(self, keys: Sequence[str]) -> None:
        try:
            await self._call("DELETE", obstore.delete_async(self._store, list(keys)))
        except (FileNotFoundError, NotFoundError):
            return

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        try:
            async for batch in obstore.list(self._store, prefix=prefix, chunk_size=1000):
                for meta in batch:
                    yield ObjectInfo(meta["path"], meta["size"], meta["last_modified"])
        except Exception as exc:
            count_dependency_error("s3")
            raise ObjectStoreUnavailable(f"LIST {prefix} failed: {exc}") from exc
