"""What both SSE routes share: event framing, the response with heartbeats, and registering as a
live reader without missing a commit."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from typing import TypeVar, cast

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from threadline.api.state import AppState
from threadline.streams.heads import StreamHead, load_head_by_id
from threadline.streams.live import StreamTail, TailChange

__all__ = ["event_stream", "shared", "sse_event", "watching"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Distinct places a tail's readers can be at that get a shared frame; laggards past that build
# their own (they are reading history, which is rarer and not the fan-out case).
_MAX_SHARED = 32

T = TypeVar("T")


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


def event_stream(state: AppState, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> Response:
    """An SSE response with heartbeat comments (proxies drop idle connections) and a send
    timeout, so a reader that stops reading is dropped instead of holding buffers forever."""
    return EventSourceResponse(
        events,
        headers={"Cache-Control": "no-cache", "Content-Type": "text/event-stream", **headers},
        ping=state.settings.sse_heartbeat_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        sep="\n",
        send_timeout=state.settings.sse_send_timeout_seconds,
    )


@asynccontextmanager
async def watching(state: AppState, head: StreamHead) -> AsyncIterator[tuple[StreamHead, StreamTail]]:
    """Register as a live reader of ``head``'s stream, then re-read the head: a commit between
    the first read and the registration would otherwise be missed until the next one."""
    with state.streams.live.watch(head.id) as tail:
        async with state.pool.acquire() as conn:
            fresh = await load_head_by_id(conn, head.id)
        tail.apply(TailChange(fresh.id, fresh.next_offset, fresh.closed, None))
        yield fresh, tail


async def shared(tail: StreamTail, key: Hashable, build: Callable[[], Awaitable[T]]) -> T:
    """What ``build`` makes for ``key``, built once per tail version however many live readers
    ask: a thousand subscribers woken by one commit read and encode its records once, and each
    only writes the bytes. ``key`` must hold everything the result depends on besides the tail
    (the offset, the encoding, the cursor)."""
    version = tail.version
    found = tail.shared.get(key)
    if found is not None:
        return cast(T, found)
    value = await build()
    if tail.version == version and len(tail.shared) < _MAX_SHARED:
        tail.shared[key] = value
    return value
