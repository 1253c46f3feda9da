"""Channel handles: a session's ``out`` / ``in``, and stand-alone streams (forks included).

A handle is a name and a client; making one sends nothing. Session channels append and subscribe
through the realtime routes (JSON acknowledgements, one SSE event per record, ``Timeout-Seconds``);
stand-alone streams through the Durable Streams routes (a subscription long-polls). Catch-up reads
use the Durable Streams ``GET`` for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

from threadline.client import _requests as rq
from threadline.client._models import AppendResult, ReadResult, Record, StreamInfo
from threadline.client._requests import JSON, Producer, encode_record
from threadline.client._sse import EventDecoder, Resumer
from threadline.client._transport import AsyncTransport, SyncTransport
from threadline.client._writer import AsyncWriter, Writer

__all__ = ["AsyncChannel", "AsyncStreams", "Channel", "ChannelBase", "Streams"]


class ChannelBase:
    """What both handles share: the stream's name and how to address it."""

    def __init__(
        self, name: str, *, content_type: str = JSON, session: str | None = None, io: str | None = None
    ):
        self.name = name
        self.content_type = content_type
        self.session = session
        self.io = io

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def is_json(self) -> bool:
        return self.content_type.split(";")[0].strip().lower() == JSON

    def _append_request(self, body: bytes, producer: Producer | None) -> rq.Request:
        if self.session is not None and self.io is not None:
            return rq.realtime_append(self.session, self.io, body, producer)
        return rq.stream_append(self.name, body, self.content_type, producer)

    def _encode(self, value: Any) -> tuple[bytes, int | None]:
        """The body of an append and how many records it makes: a list is one record per element
        (atomically); bytes go as they are to a byte stream."""
        if isinstance(value, bytes | bytearray):
            if self.is_json:
                raise TypeError("a JSON channel takes JSON values, not bytes")
            return bytes(value), None
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("append at least one record")
            return rq.encode_batch(encode_record(item) for item in value), len(value)
        return encode_record(value), 1

    def _subscribe_request(self, resumer: Resumer, timeout_seconds: int | None) -> rq.Request:
        if self.session is not None and self.io is not None:
            return resumer.channel_request(self.session, self.io, timeout_seconds)
        return resumer.poll_request(self.name)


def _session_channel(session: str, io: str) -> dict[str, str]:
    return {"name": f"sessions/{session}/{io}", "session": session, "io": io}


class Channel(ChannelBase):
    def __init__(self, transport: SyncTransport, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._t = transport

    @classmethod
    def of_session(cls, transport: SyncTransport, session: str, io: str) -> Channel:
        return cls(transport, **_session_channel(session, io))

    def append(self, value: Any, *, producer: Producer | None = None) -> AppendResult:
        """Append one record, or a list of records atomically. With ``producer`` (id, epoch,
        seq) the append is idempotent: the same seq sent again is acknowledged, not stored twice
        (how a worker that takes over a crashed one's turn writes each reply once)."""
        body, records = self._encode(value)
        return rq.append_result(self._t.send(self._append_request(body, producer)), records)

    def writer(self, **options: Any) -> Writer:
        """A batching idempotent producer (see :class:`Writer` for the options)."""
        return Writer(self._send_batch, **options)

    def _send_batch(self, body: bytes, producer: Producer) -> AppendResult:
        return rq.append_result(self._t.send(self._append_request(body, producer)), None)

    def read(self, from_: str = "-1") -> ReadResult:
        """One catch-up read from ``from_`` (``-1`` the start, ``now``, or an offset)."""
        return rq.read_result(self._t.send(rq.read_stream(self.name, from_)))

    def info(self) -> StreamInfo:
        return rq.stream_info(self.name, self._t.send(rq.head_stream(self.name)))

    def close(self) -> AppendResult:
        """Close the stream (no more appends). A session's channels close with the session."""
        return rq.append_result(
            self._t.send(rq.stream_append(self.name, b"", self.content_type, None, close=True)), 0
        )

    def delete(self) -> None:
        self._t.send(rq.delete_stream(self.name))

    def subscribe(
        self, from_: str = "-1", *, follow: bool = True, timeout_seconds: int | None = None
    ) -> Iterator[Record]:
        """Every record from ``from_``, each once and in order, across reconnects; ends when the
        channel closes (or, with ``follow=False``, once caught up). ``timeout_seconds`` bounds
        each connection on the server (the subscription reconnects where it left off)."""
        resumer = Resumer(from_, self._t.config.retry, self._t.config.reconnect_timeout)
        if not follow:
            while not resumer.done:
                result = self.read(resumer.offset)
                yield from resumer.on_read(result)
                resumer.done = resumer.done or result.up_to_date
            return
        while not resumer.done:
            try:
                yield from self._connection(resumer, timeout_seconds)
            except Exception as exc:
                time.sleep(resumer.after_failure(exc))

    def _connection(self, resumer: Resumer, timeout_seconds: int | None) -> Iterator[Record]:
        request = self._subscribe_request(resumer, timeout_seconds)
        if self.session is None:
            result = rq.read_result(self._t.send(request))
            yield from resumer.on_read(result)
            return
        with self._t.stream(request, refresh=resumer.refresh) as response:
            if response.status_code == 204:
                resumer.on_no_content()
                return
            decoder = EventDecoder()
            for line in response.iter_lines():
                event = decoder.feed(line)
                if event is not None:
                    record = resumer.on_event(event)
                    if record is not None:
                        yield record
                    if resumer.done:
                        return
        resumer.after_end()


class AsyncChannel(ChannelBase):
    def __init__(self, transport: AsyncTransport, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._t = transport

    @classmethod
    def of_session(cls, transport: AsyncTransport, session: str, io: str) -> AsyncChannel:
        return cls(transport, **_session_channel(session, io))

    async def append(self, value: Any, *, producer: Producer | None = None) -> AppendResult:
        """Append one record, or a list of records atomically (idempotently with ``producer``)."""
        body, records = self._encode(value)
        return rq.append_result(await self._t.send(self._append_request(body, producer)), records)

    def writer(self, **options: Any) -> AsyncWriter:
        """A batching idempotent producer (see :class:`AsyncWriter` for the options)."""
        return AsyncWriter(self._send_batch, **options)

    async def _send_batch(self, body: bytes, producer: Producer) -> AppendResult:
        return rq.append_result(await self._t.send(self._append_request(body, producer)), None)

    async def read(self, from_: str = "-1") -> ReadResult:
        """One catch-up read from ``from_`` (``-1`` the start, ``now``, or an offset)."""
        return rq.read_result(await self._t.send(rq.read_stream(self.name, from_)))

    async def info(self) -> StreamInfo:
        return rq.stream_info(self.name, await self._t.send(rq.head_stream(self.name)))

    async def close(self) -> AppendResult:
        """Close the stream (no more appends). A session's channels close with the session."""
        request = rq.stream_append(self.name, b"", self.content_type, None, close=True)
        return rq.append_result(await self._t.send(request), 0)

    async def delete(self) -> None:
        await self._t.send(rq.delete_stream(self.name))

    async def subscribe(
        self, from_: str = "-1", *, follow: bool = True, timeout_seconds: int | None = None
    ) -> AsyncIterator[Record]:
        """Every record from ``from_``, each once and in order, across reconnects; ends when the
        channel closes (or, with ``follow=False``, once caught up)."""
        resumer = Resumer(from_, self._t.config.retry, self._t.config.reconnect_timeout)
        if not follow:
            while not resumer.done:
                result = await self.read(resumer.offset)
                for record in resumer.on_read(result):
                    yield record
                resumer.done = resumer.done or result.up_to_date
            return
        while not resumer.done:
            try:
                async for record in self._connection(resumer, timeout_seconds):
                    yield record
            except Exception as exc:
                await asyncio.sleep(resumer.after_failure(exc))

    async def _connection(self, resumer: Resumer, timeout_seconds: int | None) -> AsyncIterator[Record]:
        request = self._subscribe_request(resumer, timeout_seconds)
        if self.session is None:
            result = rq.read_result(await self._t.send(request))
            for caught_up in resumer.on_read(result):
                yield caught_up
            return
        async with self._t.stream(request, refresh=resumer.refresh) as response:
            if response.status_code == 204:
                resumer.on_no_content()
                return
            decoder = EventDecoder()
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    record = resumer.on_event(event)
                    if record is not None:
                        yield record
                    if resumer.done:
                        return
        resumer.after_end()


def _create_request(
    name: str,
    *,
    content_type: str,
    ttl_seconds: int | None,
    expires_at: datetime | str | None,
    closed: bool,
    fork_from: ChannelBase | str | None,
    fork_offset: str | None,
    data: Any,
) -> rq.Request:
    body = None
    if data is not None:
        body = data if isinstance(data, bytes) else encode_record(data)
    return rq.create_stream(
        name,
        content_type=content_type,
        ttl_seconds=ttl_seconds,
        expires_at=expires_at,
        closed=closed,
        fork_from=fork_from.name if isinstance(fork_from, ChannelBase) else fork_from,
        fork_offset=fork_offset,
        body=body,
    )


class Streams:
    """Stand-alone Durable Streams: ``client.streams.create(name)``, ``client.streams.get(name)``."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def get(self, name: str, *, content_type: str = JSON) -> Channel:
        """A handle on an existing stream (sends nothing)."""
        return Channel(self._t, name, content_type=content_type)

    def create(
        self,
        name: str,
        *,
        content_type: str = JSON,
        ttl_seconds: int | None = None,
        expires_at: datetime | str | None = None,
        closed: bool = False,
        fork_from: ChannelBase | str | None = None,
        fork_offset: str | None = None,
        data: Any = None,
    ) -> Channel:
        """Create a stream (the same settings again is fine), or a fork of ``fork_from`` (a handle or
        a stream name, a session channel included) from ``fork_offset`` (default: its tail)."""
        self._t.send(
            _create_request(
                name,
                content_type=content_type,
                ttl_seconds=ttl_seconds,
                expires_at=expires_at,
                closed=closed,
                fork_from=fork_from,
                fork_offset=fork_offset,
                data=data,
            )
        )
        return self.get(name, content_type=content_type)


class AsyncStreams:
    """Stand-alone Durable Streams for :class:`AsyncThreadline`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    def get(self, name: str, *, content_type: str = JSON) -> AsyncChannel:
        return AsyncChannel(self._t, name, content_type=content_type)

    async def create(
        self,
        name: str,
        *,
        content_type: str = JSON,
        ttl_seconds: int | None = None,
        expires_at: datetime | str | None = None,
        closed: bool = False,
        fork_from: ChannelBase | str | None = None,
        fork_offset: str | None = None,
        data: Any = None,
    ) -> AsyncChannel:
        await self._t.send(
            _create_request(
                name,
                content_type=content_type,
                ttl_seconds=ttl_seconds,
                expires_at=expires_at,
                closed=closed,
                fork_from=fork_from,
                fork_offset=fork_offset,
                data=data,
            )
        )
        return self.get(name, content_type=content_type)
