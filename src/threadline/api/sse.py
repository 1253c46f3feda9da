"""Server-sent events for both SSE routes: event framing, and the response that sends them.

The response is paced by the reader's socket. Events are pulled from the route's iterator one at
a time, and the next one is produced only once the previous one is written; an event is written
in pieces of at most 64 KiB, each only while the connection's unsent bytes are under uvicorn's
flow-control mark. The route's iterator is :meth:`StreamService.follow`, which reads at most
``THREADLINE_SSE_MAX_BUFFERED_BYTES`` of records per step, so a reader far behind is caught up
step by step as fast as it takes bytes, never by buffering its backlog; a live reader that falls
behind simply reads on from storage. Per connection the server holds one event, at most about
the bound, plus the unsent pieces; the kernel's send buffer is capped at the bound too.

A reader that takes no bytes for ``THREADLINE_SSE_SEND_TIMEOUT_SECONDS`` while some wait is
dropped: one log line, ``threadline_sse_readers_dropped_total{reason}``, and the connection is
aborted (RST), which frees its buffers at once; a graceful close would wait for a reader that
does not read. The reader resumes from the last offset it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping

from prometheus_client import Counter
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from threadline.api.connection import SERVER_SEND, Connection, connection_of
from threadline.config import Settings
from threadline.errors import ApiError, DependencyUnavailable

__all__ = ["DROPPED", "EventStream", "event_stream", "sse_event"]

logger = logging.getLogger(__name__)

DROPPED = Counter("threadline_sse_readers_dropped_total", "SSE readers the server disconnected", ["reason"])

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_PING = b": ping\n\n"
# Events are written in pieces of this size, each when the transport has room (uvicorn pauses
# writes above 64 KiB unsent): a big catch-up event never sits in the transport whole.
_PIECE = 64 * 1024
# How often a blocked write checks whether the reader took anything.
_PROGRESS_CHECK_SECONDS = 1.0


def sse_event(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event. Every line of ``data`` gets its own ``data:`` line, so no byte of a record
    can end the event early."""
    head = ""
    if event_id is not None:
        head += f"id: {event_id}\n"
    if event is not None:
        head += f"event: {event}\n"
    lines = "".join(f"data:{line}\n" for line in _LINE_BREAK.split(data))
    return f"{head}{lines}\n".encode()


class SlowReader(Exception):
    """The reader stopped taking bytes: drop it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Writer:
    """Writes to one connection, one event at a time, each as fast as the reader takes it."""

    def __init__(self, send: Send, connection: Connection | None, send_timeout: float) -> None:
        self._send = send
        self._connection = connection
        self._send_timeout = send_timeout
        self._check = min(_PROGRESS_CHECK_SECONDS, send_timeout / 4)
        self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._time = loop.time
        self.last_write = loop.time()
        self.written = 0

    async def write(self, data: bytes, *, idle_for: float | None = None) -> None:
        """Write ``data`` (with ``idle_for``: only if nothing was written for that long)."""
        async with self._lock:
            if idle_for is not None and self._time() < self.last_write + idle_for:
                return
            if len(data) <= _PIECE:
                await self._write(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), _PIECE):
                    await self._write(bytes(view[start : start + _PIECE]))
            self.last_write = self._time()

    async def finish(self) -> None:
        """End the response (the last chunk), as paced as any write."""
        async with self._lock:
            await self._write(b"", more_body=False)

    async def _write(self, piece: bytes, *, more_body: bool = True) -> None:
        message: Message = {"type": "http.response.body", "body": piece, "more_body": more_body}
        connection = self._connection
        if connection is not None and connection.unsent_bytes() == 0:
            # Nothing waits: uvicorn writes at once (the live fan-out path, no timer).
            await self._send(message)
            self.written += len(piece)
            return
        # uvicorn's send waits while the transport's unsent bytes are over its mark, then writes
        # (nothing is written if the wait is cancelled). Between checks, see whether the reader
        # took anything; only a reader that took nothing for the whole timeout is dropped.
        unsent = connection.unsent_bytes() if connection is not None else 0
        progress_at = self._time()
        while True:
            try:
                async with asyncio.timeout(self._check):
                    await self._send(message)
                self.written += len(piece)
                return
            except TimeoutError:
                now = self._time()
                if connection is not None and connection.unsent_bytes() < unsent:
                    unsent = connection.unsent_bytes()
                    progress_at = now
                elif now - progress_at >= self._send_timeout:
                    raise SlowReader(
                        "send_timeout", f"the reader took no bytes for {self._send_timeout:g} s"
                    ) from None


class EventStream(StreamingResponse):
    """``text/event-stream`` from ``events``, with heartbeat comments while idle (proxies drop
    idle connections), paced by the reader's socket; see the module docstring."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        *,
        heartbeat_seconds: float,
        send_timeout_seconds: float,
        max_buffered_bytes: int,
    ) -> None:
        super().__init__(
            events,
            headers={
                "Cache-Control": "no-cache",
                "Content-Type": "text/event-stream",
                "X-Accel-Buffering": "no",
                **headers,
            },
        )
        self._events = events
        self._heartbeat = heartbeat_seconds
        self._send_timeout = send_timeout_seconds
        self._max_buffered = max_buffered_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = connection_of(scope)
        if connection is not None:
            connection.limit_kernel_buffer(self._max_buffered)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # The body goes straight to the server (see SERVER_SEND): the wrappers saw the start.
        writer = _Writer(scope.get(SERVER_SEND, send), connection, self._send_timeout)
        pump: asyncio.Task[object] = asyncio.create_task(self._pump(writer))
        tasks: set[asyncio.Task[object]] = {
            pump,
            asyncio.create_task(self._heartbeats(writer)),
            asyncio.create_task(_disconnected(receive)),
        }
        if connection is not None:
            tasks.add(asyncio.create_task(connection.closing.wait()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        slow = next(
            (
                error
                for task in done
                if not task.cancelled() and isinstance(error := task.exception(), SlowReader)
            ),
            None,
        )
        if pump in done and slow is None and not pump.cancelled():
            failure = pump.exception()
            if isinstance(failure, ApiError | DependencyUnavailable):
                # After the 200 went out (S3 or Postgres down mid-stream, the stream deleted) no
                # error status can be sent: end the stream; the reader resumes by offset.
                logger.warning(
                    "SSE stream ended early",
                    extra={
                        "error": failure.code if isinstance(failure, ApiError) else type(failure).__name__,
                        "detail": str(failure),
                        "path": scope.get("path"),
                    },
                )
            elif failure is not None:
                raise failure  # a bug: the server's to report
        if (
            slow is None
            and connection is not None
            and connection.closing.is_set()
            and connection.unsent_bytes()
        ):
            connection.abort()  # shutting down: no waiting for a reader that is behind
            return
        if slow is None:
            # The stream ended, the server is shutting down, or the reader went away (then
            # uvicorn ignores the write): end the response.
            try:
                await writer.finish()
                return
            except SlowReader as exc:
                slow = exc
        assert isinstance(slow, SlowReader)
        await self._drop(scope, receive, connection, writer, slow)

    async def _pump(self, writer: _Writer) -> None:
        try:
            async for event in self._events:
                await writer.write(event)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _heartbeats(self, writer: _Writer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = writer.last_write + self._heartbeat
            if loop.time() >= due:
                await writer.write(_PING, idle_for=self._heartbeat)
            else:
                await asyncio.sleep(due - loop.time())

    async def _drop(
        self, scope: Scope, receive: Receive, connection: Connection | None, writer: _Writer, slow: SlowReader
    ) -> None:
        DROPPED.labels(slow.reason).inc()
        client = scope.get("client")
        logger.warning(
            "dropped a slow SSE reader",
            extra={
                "reason": slow.reason,
                "detail": str(slow),
                "path": scope.get("path"),
                "client": f"{client[0]}:{client[1]}" if client else None,
                "bytes_sent": writer.written,
                "unsent_bytes": connection.unsent_bytes() if connection is not None else None,
            },
        )
        if connection is None:
            raise slow  # not served by our protocol: the server closes it as it can
        connection.abort()
        # Return once uvicorn has seen the connection go, so it does not report an unfinished
        # response (ASGI has no "abort"; a disconnected connection is what it expects).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await _disconnected(receive)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def event_stream(settings: Settings, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> EventStream:
    """The SSE response of both SSE routes."""
    return EventStream(
        events,
        headers,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        send_timeout_seconds=settings.sse_send_timeout_seconds,
        max_buffered_bytes=settings.sse_max_buffered_bytes,
    )
