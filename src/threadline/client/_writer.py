"""A batching, idempotent producer for one channel or stream.

``append`` only buffers; a background sender (an asyncio task, or a thread for the sync client)
sends one batch at a time as a JSON array, numbered with ``Producer-Id`` / ``-Epoch`` / ``-Seq``.
A batch whose fate is unknown (a timeout, a dropped connection, a 503) is sent again with the same
numbers until it is acknowledged, and the server answers a repeat of a batch it already has as a
duplicate without appending, so nothing is ever written twice.

Lifecycle: OPEN → CLOSING (``close()``: no more appends, the buffer drains) → CLOSED; or FAILED
(an error the server will not change its mind on, e.g. a closed session): buffered records are
dropped and every later call raises :class:`WriterFailed` with that error as its cause.

Backpressure: ``append`` waits while ``max_buffered_bytes`` are not yet acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from threadline.client._errors import ClientClosed, WriterFailed
from threadline.client._models import AppendResult
from threadline.client._requests import Producer, encode_batch, encode_record
from threadline.client._transport import is_retryable
from threadline.errors import RecordTooLarge

__all__ = ["AsyncWriter", "Writer", "WriterState"]

MAX_RECORD_BYTES = 1024 * 1024  # the server's limit per record
MAX_BATCH_BYTES = 4 * 1024 * 1024  # and per append


class WriterState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class _Batcher:
    """The writer's bookkeeping, shared by both writers: what is buffered, what is next to send."""

    def __init__(
        self,
        *,
        linger_ms: float,
        max_records: int,
        max_bytes: int,
        max_buffered_bytes: int,
        producer_id: str | None,
        epoch: int,
        retry_timeout: float,
    ) -> None:
        if not 1 <= max_records <= 1000:
            raise ValueError("max_records must be 1 to 1000 (the server's limit per append)")
        if not MAX_RECORD_BYTES <= max_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"max_bytes must be {MAX_RECORD_BYTES} to {MAX_BATCH_BYTES}")
        self.linger = linger_ms / 1000
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_buffered_bytes = max(max_buffered_bytes, max_bytes)
        self.retry_timeout = retry_timeout
        self.producer_id = producer_id or f"threadline-py-{uuid.uuid4().hex}"
        self.epoch = epoch
        self.seq = 0
        self.pending: deque[bytes] = deque()
        self.buffered_bytes = 0  # pending and in flight
        self.appended = 0
        self.acknowledged = 0
        self.flush_requested = False
        self.state = WriterState.OPEN
        self.error: BaseException | None = None
        self.last_result: AppendResult | None = None

    def check_open(self) -> None:
        if self.state is WriterState.FAILED:
            raise WriterFailed("the writer stopped on an error") from self.error
        if self.state is not WriterState.OPEN:
            raise ClientClosed("the writer is closed")

    def check_flushed(self) -> None:
        if self.state is WriterState.FAILED:
            raise WriterFailed("the writer stopped on an error") from self.error

    def encode(self, value: Any) -> bytes:
        record = encode_record(value)
        if len(record) > MAX_RECORD_BYTES:
            raise RecordTooLarge(
                f"a record is {len(record)} bytes serialized; the limit is {MAX_RECORD_BYTES}"
            )
        return record

    def has_room(self, size: int) -> bool:
        return self.buffered_bytes == 0 or self.buffered_bytes + size <= self.max_buffered_bytes

    def add(self, record: bytes) -> None:
        self.pending.append(record)
        self.buffered_bytes += len(record)
        self.appended += 1

    def full(self) -> bool:
        return len(self.pending) >= self.max_records or self._pending_bytes() >= self.max_bytes

    def _pending_bytes(self) -> int:
        # +1 per record for the array's commas and brackets
        return sum(len(record) + 1 for record in self.pending) + 1

    def send_now(self) -> bool:
        """Skip the linger: the batch is full, or someone is waiting for it."""
        return self.full() or self.flush_requested or self.state is not WriterState.OPEN

    def idle(self) -> bool:
        return not self.pending

    def take(self) -> tuple[list[bytes], Producer]:
        batch: list[bytes] = []
        size = 2
        while self.pending and len(batch) < self.max_records:
            record = self.pending[0]
            if batch and size + len(record) + 1 > self.max_bytes:
                break
            batch.append(self.pending.popleft())
            size += len(record) + 1
        producer = Producer(self.producer_id, self.epoch, self.seq)
        return batch, producer

    def acknowledged_batch(self, batch: list[bytes], result: AppendResult) -> None:
        self.seq += 1
        self.acknowledged += len(batch)
        self.buffered_bytes -= sum(len(record) for record in batch)
        self.last_result = result
        if not self.pending:
            self.flush_requested = False

    def fail(self, exc: BaseException) -> None:
        self.state = WriterState.FAILED
        self.error = exc
        self.pending.clear()
        self.buffered_bytes = 0

    def retry_delay(self, exc: BaseException, attempt: int, started: float) -> float:
        """How long to wait before sending the same batch again; raises when it must not be."""
        if not is_retryable(exc) or time.monotonic() - started > self.retry_timeout:
            raise exc
        return float(min(2.0, 0.05 * 2.0**attempt))


SendBatch = Callable[[bytes, Producer], AppendResult]
AsyncSendBatch = Callable[[bytes, Producer], Coroutine[Any, Any, AppendResult]]


class _WriterBase:
    """Options and state both writers share (documented on :class:`AsyncWriter`)."""

    def __init__(
        self,
        *,
        linger_ms: float = 5,
        max_records: int = 1000,
        max_bytes: int = MAX_RECORD_BYTES,
        max_buffered_bytes: int = 16 * 1024 * 1024,
        producer_id: str | None = None,
        epoch: int = 0,
        retry_timeout: float = 120.0,
    ) -> None:
        self._b = _Batcher(
            linger_ms=linger_ms,
            max_records=max_records,
            max_bytes=max_bytes,
            max_buffered_bytes=max_buffered_bytes,
            producer_id=producer_id,
            epoch=epoch,
            retry_timeout=retry_timeout,
        )

    @property
    def producer_id(self) -> str:
        return self._b.producer_id

    @property
    def state(self) -> WriterState:
        return self._b.state

    @property
    def last_result(self) -> AppendResult | None:
        """The acknowledgement of the last batch sent (its ``next_offset`` is where the channel ends)."""
        return self._b.last_result


class AsyncWriter(_WriterBase):
    """Batches appends to one channel; use ``async with channel.writer() as w: await w.append(x)``.

    ``linger_ms``: how long a batch waits for more records (default 5). ``max_records`` (≤ 1000)
    and ``max_bytes`` (≤ 4 MiB): the most one append carries. ``max_buffered_bytes``: backpressure.
    ``producer_id``/``epoch``: reuse them (bumping ``epoch``) to fence an older writer of the
    same producer. ``retry_timeout``: how long a batch is resent before the writer fails.
    """

    def __init__(self, send: AsyncSendBatch, **options: Any) -> None:
        super().__init__(**options)
        self._send = send
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def append(self, value: Any) -> None:
        """Buffer one record (any JSON value); waits while the buffer is full."""
        self._b.check_open()
        record = self._b.encode(value)
        async with self._changed:
            await self._changed.wait_for(lambda: self._b.has_room(len(record)) or self._b.error is not None)
            self._b.check_open()
            self._b.add(record)
            self._changed.notify_all()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"threadline-writer-{self.producer_id}")

    async def flush(self) -> None:
        """Wait until every record appended so far is acknowledged."""
        async with self._changed:
            target = self._b.appended
            self._b.flush_requested = target > self._b.acknowledged
            self._changed.notify_all()
            await self._changed.wait_for(lambda: self._b.acknowledged >= target or self._b.error is not None)
        self._b.check_flushed()

    async def close(self) -> None:
        """Send what is buffered, then stop. Raises :class:`WriterFailed` if that failed."""
        if self._b.state is WriterState.OPEN:
            self._b.state = WriterState.CLOSING
        async with self._changed:
            self._changed.notify_all()
        if self._task is not None:
            await self._task
        self._b.check_flushed()
        self._b.state = WriterState.CLOSED

    async def __aenter__(self) -> AsyncWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self) -> None:
        b = self._b
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: not b.idle() or b.state is not WriterState.OPEN)
                if b.idle():
                    return
                if not b.send_now():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait_for(b.send_now), b.linger)
                batch, producer = b.take()
            try:
                result = await self._send_with_retries(batch, producer)
            except Exception as exc:
                async with self._changed:
                    b.fail(exc)
                    self._changed.notify_all()
                return
            async with self._changed:
                b.acknowledged_batch(batch, result)
                self._changed.notify_all()

    async def _send_with_retries(self, batch: list[bytes], producer: Producer) -> AppendResult:
        body = encode_batch(batch)
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return await self._send(body, producer)
            except Exception as exc:
                await asyncio.sleep(self._b.retry_delay(exc, attempt, started))
                attempt += 1


class Writer(_WriterBase):
    """The sync client's writer: the same batching, with the sender on a thread. ``with
    channel.writer() as w: w.append(x)``; options as for :class:`AsyncWriter`."""

    def __init__(self, send: SendBatch, **options: Any) -> None:
        super().__init__(**options)
        self._send = send
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def append(self, value: Any) -> None:
        self._b.check_open()
        record = self._b.encode(value)
        with self._changed:
            self._changed.wait_for(lambda: self._b.has_room(len(record)) or self._b.error is not None)
            self._b.check_open()
            self._b.add(record)
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"threadline-writer-{self.producer_id}", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        with self._changed:
            target = self._b.appended
            self._b.flush_requested = target > self._b.acknowledged
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._b.acknowledged >= target or self._b.error is not None)
        self._b.check_flushed()

    def close(self) -> None:
        with self._changed:
            if self._b.state is WriterState.OPEN:
                self._b.state = WriterState.CLOSING
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._b.check_flushed()
        self._b.state = WriterState.CLOSED

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        b = self._b
        while True:
            with self._changed:
                self._changed.wait_for(lambda: not b.idle() or b.state is not WriterState.OPEN)
                if b.idle():
                    return
                self._changed.wait_for(b.send_now, timeout=b.linger)
                batch, producer = b.take()
            try:
                result = self._send_with_retries(batch, producer)
            except Exception as exc:
                with self._changed:
                    b.fail(exc)
                    self._changed.notify_all()
                return
            with self._changed:
                b.acknowledged_batch(batch, result)
                self._changed.notify_all()

    def _send_with_retries(self, batch: list[bytes], producer: Producer) -> AppendResult:
        body = encode_batch(batch)
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return self._send(body, producer)
            except Exception as exc:
                time.sleep(self._b.retry_delay(exc, attempt, started))
                attempt += 1
