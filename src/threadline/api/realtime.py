"""Session-flavoured channel routes (SPEC §4), for clients written against the trigger.dev-style API.

    PUT  /realtime/v1/sessions/{session}/{io}          describe the channel and the URLs to use
    POST /realtime/v1/sessions/{session}/{io}/append   append JSON records
    GET  /realtime/v1/sessions/{session}/{io}          SSE: one event per record, ``id:`` = resume offset

They are a thin layer over the same streams as ``/v1/stream/sessions/<id>/<io>``: the same
records, offsets, producers and closure. What differs is the shape a browser wants: one SSE event
per record whose ``id:`` is the offset after it, so ``EventSource`` resumes by itself through
``Last-Event-ID``, and a bounded connection lifetime (``Timeout-Seconds``) after which the
browser reconnects where it left off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.bodies import read_body
from threadline.api.params import STREAM_PREFIX, producer_headers, query_offset
from threadline.api.sse import event_stream, sse_event
from threadline.api.state import app_state
from threadline.auth.principal import Action
from threadline.errors import ChannelNotFound, InvalidTimeout
from threadline.sessions.access import channel_session, refuse_appends_to
from threadline.sessions.models import SessionView
from threadline.streams.names import SESSION_CHANNEL_CONTENT_TYPE, session_channel_name
from threadline.streams.offsets import Position, format_offset, parse_offset
from threadline.streams.records import MAX_BATCH_BYTES
from threadline.streams.service import Append, FollowStep

__all__ = ["REALTIME_PREFIX", "routes"]

REALTIME_PREFIX = "/realtime/v1/sessions/"

TIMEOUT_HEADER = "Timeout-Seconds"
DEFAULT_TIMEOUT_SECONDS = 60
MAX_TIMEOUT_SECONDS = 600
# Tells EventSource how long to wait before reconnecting after a timed-out connection.
_RETRY_MS = 1000


@dataclass(frozen=True, slots=True)
class _Channel:
    session: SessionView
    io: str

    @property
    def stream_name(self) -> str:
        return session_channel_name(self.session.id, self.io)


async def _channel(request: Request, action: Action) -> _Channel:
    """Authenticate, load the session (404) and check the scope on it (403)."""
    state = app_state(request)
    principal = await state.authenticator.authenticate(request, allow_query_token=request.method == "GET")
    io = request.path_params["io"]
    if io not in ("out", "in"):
        raise ChannelNotFound(f"a session has channels out and in, not {io!r}")
    session = await channel_session(state.pool, principal, action, request.path_params["session"])
    return _Channel(session, io)


def _urls(request: Request, channel: _Channel) -> dict[str, str]:
    # Never built from the Host header when a public URL is configured (Host is the client's to set).
    public_url = app_state(request).settings.public_url
    base = (public_url or str(request.base_url)).rstrip("/")
    realtime = f"{base}{REALTIME_PREFIX}{channel.session.id}/{channel.io}"
    return {
        "subscribe": realtime,
        "append": f"{realtime}/append",
        "stream": f"{base}{STREAM_PREFIX}{channel.stream_name}",
    }


async def describe_channel(request: Request) -> Response:
    """The channel as it is now, and where to read and write it. Channels exist with their
    session, so there is nothing to create: the call is idempotent and needs only read scope."""
    channel = await _channel(request, Action.READ)
    view = channel.session.channels[channel.io]
    return JSONResponse(
        {
            "sessionId": channel.session.id,
            "io": channel.io,
            "sessionStatus": channel.session.status,
            "contentType": SESSION_CHANNEL_CONTENT_TYPE,
            **view.to_json(),
            "urls": _urls(request, channel),
        }
    )


async def append(request: Request) -> Response:
    """Append one JSON value, or each element of a JSON array, as records (atomically).

    The closed check here answers early with a clear code; the committer checks again under the
    stream's row lock, so an append racing a close is refused too (409 ``stream_closed``).
    """
    channel = await _channel(request, Action.WRITE)
    refuse_appends_to(channel.session)
    body = await read_body(request, MAX_BATCH_BYTES)
    producer = producer_headers(request)
    outcome = await app_state(request).streams.append(
        channel.session.environment_id,
        channel.stream_name,
        Append(
            body,
            request.headers.get("content-type") or SESSION_CHANNEL_CONTENT_TYPE,
            producer=producer,
            stream_seq=request.headers.get("Stream-Seq"),
        ),
    )
    payload: dict[str, object] = {
        "offset": format_offset(outcome.start_offset),
        "nextOffset": format_offset(outcome.next_offset),
        "records": outcome.appended,
    }
    headers = {"Stream-Next-Offset": format_offset(outcome.next_offset)}
    if producer is not None:
        payload["duplicate"] = outcome.duplicate
        headers["Producer-Epoch"] = str(outcome.producer_epoch)
        headers["Producer-Seq"] = str(outcome.producer_seq)
    return JSONResponse(payload, headers=headers)


def _timeout_seconds(request: Request) -> int:
    """``Timeout-Seconds`` (header, or ``?timeoutSeconds=`` for EventSource, which cannot set
    headers): how long this connection lives before the client should reconnect."""
    value = request.headers.get(TIMEOUT_HEADER) or request.query_params.get("timeoutSeconds")
    if value is None:
        return DEFAULT_TIMEOUT_SECONDS
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_TIMEOUT_SECONDS:
        raise InvalidTimeout(
            f"{TIMEOUT_HEADER} must be a whole number of seconds from 1 to {MAX_TIMEOUT_SECONDS}",
        )
    return int(value)


def _start(request: Request) -> Position:
    """Where to start: ``Last-Event-ID`` (a reconnecting EventSource) wins over ``?offset=``."""
    last_event_id = request.headers.get("last-event-id")
    if last_event_id:
        return parse_offset(last_event_id, name="Last-Event-ID")
    position = query_offset(request)
    return "start" if position is None else position


async def subscribe(request: Request) -> Response:
    """SSE: each record is one event (``data:`` its JSON, ``id:`` the offset after it). When the
    channel closes, an ``event: closed`` follows the last record and the response ends; a client
    reconnecting at the end of a closed channel gets 204, which stops EventSource retrying."""
    timeout_seconds = _timeout_seconds(request)
    position = _start(request)
    channel = await _channel(request, Action.READ)
    state = app_state(request)
    head, start = await state.streams.open_read(channel.session.environment_id, channel.stream_name, position)
    if head.closed and start >= head.next_offset:
        return Response(status_code=204, headers={"Stream-Next-Offset": format_offset(head.next_offset)})
    deadline = asyncio.get_running_loop().time() + timeout_seconds

    async def events() -> AsyncIterator[bytes]:
        yield f"retry: {_RETRY_MS}\n\n".encode()
        steps = state.streams.follow(
            head, start, idle_seconds=state.settings.sse_heartbeat_seconds, deadline=deadline
        )
        async for step in steps:
            if step.result.records:
                yield step.frame("realtime", _record_events)
            if step.finished:
                data = orjson.dumps({"nextOffset": format_offset(step.result.next_offset)}).decode()
                yield sse_event(data, event="closed")

    return event_stream(state.settings, events(), {})


def _record_events(step: FollowStep) -> bytes:
    """One event per record, ``id:`` the offset after it (what EventSource resumes from)."""
    frame = bytearray()
    for index, record in enumerate(step.result.records, start=step.start + 1):
        frame += sse_event(bytes(record).decode(), event_id=format_offset(index))
    return bytes(frame)


routes = [
    Route(REALTIME_PREFIX + "{session}/{io}", describe_channel, methods=["PUT"], name="realtime_describe"),
    Route(REALTIME_PREFIX + "{session}/{io}", subscribe, methods=["GET"], name="realtime_subscribe"),
    Route(REALTIME_PREFIX + "{session}/{io}/append", append, methods=["POST"], name="realtime_append"),
]
