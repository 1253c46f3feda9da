"""Server-sent events for both SSE routes: event framing, and the response with heartbeats."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from threadline.config import Settings

__all__ = ["event_stream", "sse_event"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


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


def event_stream(settings: Settings, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> Response:
    """An SSE response with heartbeat comments (proxies drop idle connections) and a send
    timeout, so a reader that stops reading is dropped instead of holding buffers forever."""
    return EventSourceResponse(
        events,
        headers={"Cache-Control": "no-cache", "Content-Type": "text/event-stream", **headers},
        ping=settings.sse_heartbeat_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        sep="\n",
        send_timeout=settings.sse_send_timeout_seconds,
    )
