"""The Durable Streams protocol at ``/v1/stream/<name>``: every session channel, and stand-alone
streams, speak it, so off-the-shelf Durable Streams clients work against Threadline.

    PUT     create (idempotent), optionally with a first body, closed, or as a fork
    POST    append (bytes or JSON mode), close, idempotent producers, Stream-Seq
    GET     catch-up read from an offset; live=long-poll; live=sse
    HEAD    metadata
    DELETE  delete (soft while forks read from it)

Access: a session's channels (``sessions/<session id or externalId>/out|in``) follow the session
scopes (``read:sessions:<id>`` reads, ``write:sessions:<id>`` appends); stand-alone streams need
environment-wide ``read:sessions`` / ``write:sessions`` (or a secret key).
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from typing import Any

import orjson
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.bodies import TrimBody, read_body, read_model
from threadline.api.params import STREAM_PREFIX, flag_header, integer_header, producer_headers, query_offset
from threadline.api.sse import event_stream, sse_event
from threadline.api.state import app_state
from threadline.auth.principal import Action
from threadline.errors import SessionChannel, ValidationFailed
from threadline.sessions.access import StreamAccess, stream_access
from threadline.streams.heads import StreamHead, StreamSettings
from threadline.streams.names import is_json, is_media_type, media_type, validate_name
from threadline.streams.offsets import format_offset, parse_offset
from threadline.streams.reader import ReadResult
from threadline.streams.records import MAX_BATCH_BYTES, json_array
from threadline.streams.service import Append, FollowStep

__all__ = ["routes"]

TRIM_PATH = "/api/v1/streams/trim"

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CURSOR = "Stream-Cursor"
CLOSED = "Stream-Closed"

# Cursors advance every 20 s, so CDN-cached long-poll responses expire with them (protocol §cursor).
_CURSOR_INTERVAL_MS = 20_000


async def _target(request: Request, action: Action, name: str | None = None) -> tuple[str, StreamAccess]:
    """Authenticate, resolve the stream name (the path's unless given), and check the caller may
    ``action`` it. Returns the caller's environment id and the stream."""
    state = app_state(request)
    principal = await state.authenticator.authenticate(request, allow_query_token=request.method == "GET")
    name = validate_name(request.path_params["name"] if name is None else name)
    access = await stream_access(state.pool, principal, action, name)
    return principal.environment.id, access


def _expires_at(request: Request) -> datetime | None:
    value = request.headers.get("Stream-Expires-At")
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValidationFailed("Stream-Expires-At must be an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise ValidationFailed("Stream-Expires-At needs a time zone (e.g. Z)")
    return parsed


def _stream_path_name(value: str) -> str:
    path = value.split("?", 1)[0]
    if path.startswith(STREAM_PREFIX):
        path = path[len(STREAM_PREFIX) :]
    return validate_name(path.lstrip("/"))


def _head_headers(
    head: StreamHead, next_offset: int | None = None, closed: bool | None = None
) -> dict[str, str]:
    headers = {
        "Content-Type": head.content_type,
        NEXT_OFFSET: format_offset(head.next_offset if next_offset is None else next_offset),
    }
    if head.closed if closed is None else closed:
        headers[CLOSED] = "true"
    return headers


def _location(request: Request) -> str:
    return str(request.url.replace(query=""))


# --- PUT -------------------------------------------------------------------------------------


async def put_stream(request: Request) -> Response:
    environment_id, target = await _target(request, Action.WRITE)
    ttl = integer_header(request, "Stream-TTL")
    expires_at = _expires_at(request)
    if ttl is not None and expires_at is not None:
        raise ValidationFailed("send Stream-TTL or Stream-Expires-At, not both")
    fork_from = request.headers.get("Stream-Forked-From")
    fork_offset_header = request.headers.get("Stream-Fork-Offset")
    sub_offset = integer_header(request, "Stream-Fork-Sub-Offset") or 0
    fork_offset: int | None = None
    if fork_offset_header is not None:
        position = parse_offset(fork_offset_header, name="Stream-Fork-Offset")
        if position == "now":
            raise ValidationFailed("Stream-Fork-Offset must be an offset (or -1)")
        fork_offset = 0 if position == "start" else position
    if fork_from is None and (
        fork_offset_header is not None or request.headers.get("Stream-Fork-Sub-Offset") is not None
    ):
        raise ValidationFailed("Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From")
    if sub_offset and fork_offset_header is None:
        raise ValidationFailed("Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
    content_type = request.headers.get("content-type") or None
    if content_type is not None and not is_media_type(content_type):
        raise ValidationFailed("Content-Type must be a media type such as text/plain (type/subtype, no *)")
    closed = flag_header(request, CLOSED)
    body = await read_body(request, MAX_BATCH_BYTES)
    streams = app_state(request).streams

    if target.session_id is not None:
        # A session's channels exist with the session: PUT confirms one (200) if the type fits.
        head = await streams.describe(environment_id, target.name, content_type)
        return Response(status_code=200, headers=_head_headers(head))

    settings = StreamSettings(
        content_type=content_type,
        ttl_seconds=ttl,
        expires_at=expires_at,
        closed=closed,
        fork_source=_stream_path_name(fork_from) if fork_from is not None else None,
        fork_offset=fork_offset,
        fork_sub_offset=sub_offset,
    )
    created = await streams.create(environment_id, target.name, settings, body)
    if not created.created:
        return Response(status_code=200, headers=_head_headers(created.head))
    headers = _head_headers(created.head, created.next_offset, created.closed)
    headers["Location"] = _location(request)
    return Response(status_code=201, headers=headers)


# --- POST ------------------------------------------------------------------------------------


async def post_stream(request: Request) -> Response:
    environment_id, target = await _target(request, Action.WRITE)
    close = flag_header(request, CLOSED)
    if close and target.session_id is not None:
        # Closing one channel would leave an ACTIVE session nobody can write to.
        raise SessionChannel(
            "a session's channels close with the session: POST /api/v1/sessions/{session}/close"
        )
    body = await read_body(request, MAX_BATCH_BYTES)
    producer = producer_headers(request)
    outcome = await app_state(request).streams.append(
        environment_id,
        target.name,
        Append(
            body,
            request.headers.get("content-type"),
            close=close,
            producer=producer,
            stream_seq=request.headers.get("Stream-Seq"),
        ),
    )
    headers = {NEXT_OFFSET: format_offset(outcome.next_offset)}
    if outcome.closed:
        headers[CLOSED] = "true"
    status = 204
    if producer is not None:
        headers["Producer-Epoch"] = str(outcome.producer_epoch)
        headers["Producer-Seq"] = str(outcome.producer_seq)
        status = 200 if outcome.appended else 204
    return Response(status_code=status, headers=headers)


# --- GET / HEAD ------------------------------------------------------------------------------


def _cursor(echoed: int | None) -> str:
    """Increasing cursors: the current 20 s interval, or past the client's echoed cursor (parsed
    once per request by :func:`_echoed_cursor`: an SSE response asks for one per event)."""
    current = int(time.time() * 1000) // _CURSOR_INTERVAL_MS
    if echoed is not None and echoed >= current:
        current = echoed + 1 + secrets.randbelow(3)
    return str(current)


def _echoed_cursor(request: Request) -> int | None:
    echoed = request.query_params.get("cursor")
    return int(echoed) if echoed is not None and echoed.isascii() and echoed.isdigit() else None


def _read_body(head: StreamHead, result: ReadResult) -> bytes:
    if is_json(head.content_type):
        return json_array(result.records)
    return b"".join(result.records)


def _etag(head: StreamHead, start: int, result: ReadResult, closed: bool) -> str:
    return f'"{head.id}.{start}.{result.next_offset}{".c" if closed else ""}"'


async def get_stream(request: Request) -> Response:
    position = query_offset(request)
    live = request.query_params.get("live")
    if live not in (None, "long-poll", "sse"):
        raise ValidationFailed("live must be long-poll or sse")
    if live is not None and position is None:
        raise ValidationFailed(f"live={live} needs an offset")
    if position is None:
        position = "start"
    environment_id, target = await _target(request, Action.READ)
    state = app_state(request)
    head, start = await state.streams.open_read(environment_id, target.name, position)
    if live == "sse":
        return _sse(request, head, start)
    if live == "long-poll":
        result = await state.streams.poll(head, start, state.settings.long_poll_timeout_seconds)
        return _long_poll_response(request, head, start, result)
    result = await state.streams.read(head, start)
    return _read_response(request, head, start, result, no_store=position == "now")


def _read_response(
    request: Request,
    head: StreamHead,
    start: int,
    result: ReadResult,
    *,
    no_store: bool,
    cursor: str | None = None,
) -> Response:
    closed_at_tail = result.closed and result.up_to_date
    headers = {"Content-Type": head.content_type, NEXT_OFFSET: format_offset(result.next_offset)}
    if result.up_to_date:
        headers[UP_TO_DATE] = "true"
    if closed_at_tail:
        headers[CLOSED] = "true"
    if cursor is not None:
        headers[CURSOR] = cursor
    etag = _etag(head, start, result, closed_at_tail)
    headers["ETag"] = etag
    # A read that reached the tail can grow; a read of history never changes.
    headers["Cache-Control"] = "no-store" if no_store or result.up_to_date else "private, max-age=60"
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(_read_body(head, result), status_code=200, headers=headers)


def _long_poll_response(request: Request, head: StreamHead, start: int, result: ReadResult) -> Response:
    if result.records:
        return _read_response(
            request, head, start, result, no_store=True, cursor=_cursor(_echoed_cursor(request))
        )
    headers = {
        NEXT_OFFSET: format_offset(max(start, result.tail_offset)),
        UP_TO_DATE: "true",
        "Cache-Control": "no-store",
    }
    if result.closed:
        headers[CLOSED] = "true"
    else:
        headers[CURSOR] = _cursor(_echoed_cursor(request))
    return Response(status_code=204, headers=headers)


def _sse(request: Request, head: StreamHead, start: int) -> Response:
    state = app_state(request)
    text = is_json(head.content_type) or media_type(head.content_type).startswith("text/")
    headers: dict[str, str] = {}
    if not text:
        headers["Stream-SSE-Data-Encoding"] = "base64"

    async def events() -> AsyncIterator[bytes]:
        steps = state.streams.follow(head, start, idle_seconds=state.settings.sse_heartbeat_seconds)
        announced = False
        echoed = _echoed_cursor(request)
        async for step in steps:
            if step.result.records or not announced:
                cursor = _cursor(echoed)
                # Data and its control event go out in one write: a reader never sees data
                # without the offset that resumes after it.
                yield step.frame(f"ds-sse:{int(text)}:{cursor}", partial(_sse_frame, head, text, cursor))
                announced = True

    return event_stream(state.settings, events(), headers)


def _sse_frame(head: StreamHead, text: bool, cursor: str, step: FollowStep) -> bytes:
    result = step.result
    frame = b""
    after = step.start
    if result.records:
        frame = sse_event(event="data", data=_sse_data(head, result, text))
        after = result.next_offset
    return frame + sse_event(event="control", data=_control(result, after, cursor))


def _sse_data(head: StreamHead, result: ReadResult, text: bool) -> str:
    if is_json(head.content_type):
        return json_array(result.records).decode()
    joined = b"".join(result.records)
    if text:
        return joined.decode("utf-8", errors="replace")
    return base64.b64encode(joined).decode()


def _control(result: ReadResult, position: int, cursor: str) -> str:
    control: dict[str, Any] = {"streamNextOffset": format_offset(position)}
    up_to_date = position >= result.tail_offset
    if result.closed and up_to_date:
        control["streamClosed"] = True
    else:
        control["streamCursor"] = cursor
    if up_to_date:
        control["upToDate"] = True
    return orjson.dumps(control).decode()


async def head_stream(request: Request) -> Response:
    environment_id, target = await _target(request, Action.READ)
    head = await app_state(request).streams.head(environment_id, target.name)
    headers = _head_headers(head)
    headers["Cache-Control"] = "no-store"
    if head.ttl_seconds is not None:
        headers["Stream-TTL"] = str(head.ttl_seconds)
    if head.expires_at is not None:
        headers["Stream-Expires-At"] = head.expires_at.isoformat().replace("+00:00", "Z")
    return Response(status_code=200, headers=headers)


# --- DELETE ----------------------------------------------------------------------------------


async def delete_stream_route(request: Request) -> Response:
    environment_id, target = await _target(request, Action.WRITE)
    if target.session_id is not None:
        raise SessionChannel("a session's channels are deleted with the session; close it instead")
    await app_state(request).streams.delete(environment_id, target.name)
    return Response(status_code=204)


# --- Trim (a Threadline extension; the protocol has no retention verb) ----------------------


async def trim_route(request: Request) -> Response:
    body = await read_model(request, TrimBody)
    environment_id, target = await _target(
        request, Action.WRITE, body.stream.removeprefix(STREAM_PREFIX).lstrip("/")
    )
    position = parse_offset(body.before, name="before")
    trim_offset, next_offset = await app_state(request).streams.trim(environment_id, target.name, position)
    return JSONResponse(
        {
            "stream": target.name,
            "trimOffset": format_offset(trim_offset),
            "nextOffset": format_offset(next_offset),
        }
    )


async def stream_endpoint(request: Request) -> Response:
    handler = {
        "GET": get_stream,
        "HEAD": head_stream,
        "PUT": put_stream,
        "POST": post_stream,
        "DELETE": delete_stream_route,
    }[request.method]
    return await handler(request)


class _StreamNameConvertor(Convertor[str]):
    """Starlette's ``path``, but over every character. ``path`` is ``.*``, which stops at a line
    break: a name holding one (``/v1/stream/a%0Ab``) matched no route (404 ``route_not_found``),
    and one ending in it was routed without it (``$`` matches before a final newline). Matched
    whole, every name reaches ``validate_name``, which refuses it: 400 ``invalid_stream_name``."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("stream_name", _StreamNameConvertor())

routes = [
    Route(TRIM_PATH, trim_route, methods=["POST"], name="streams_trim"),
    Route(
        STREAM_PREFIX + "{name:stream_name}",
        stream_endpoint,
        methods=["GET", "HEAD", "PUT", "POST", "DELETE"],
        name="streams",
    ),
]
