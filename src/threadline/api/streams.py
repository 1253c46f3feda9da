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
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.bodies import read_body, read_model
from threadline.api.sessions import authorized_session
from threadline.api.sse import event_stream, shared, sse_event, watching
from threadline.api.state import AppState, app_state
from threadline.auth.principal import Action, Principal
from threadline.errors import ApiError, Conflict, Forbidden, NotFound, ValidationFailed
from threadline.sessions.models import SessionView
from threadline.streams.committer import AppendOutcome, AppendRequest
from threadline.streams.errors import check_content_type
from threadline.streams.heads import (
    StreamHead,
    StreamSettings,
    create_stream,
    delete_stream,
    extend_ttl,
    load_head,
    trim_stream,
)
from threadline.streams.names import (
    SESSION_PREFIX,
    is_json,
    media_type,
    parse_session_channel,
    session_channel_name,
    validate_name,
)
from threadline.streams.offsets import Position, format_offset, parse_offset, read_start
from threadline.streams.producers import Producer
from threadline.streams.reader import ReadResult
from threadline.streams.records import MAX_BATCH_BYTES, check_batch, json_array, split_json
from threadline.streams.targets import AppendTarget

__all__ = ["STREAM_PREFIX", "routes"]

STREAM_PREFIX = "/v1/stream/"
TRIM_PATH = "/api/v1/streams/trim"

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CURSOR = "Stream-Cursor"
CLOSED = "Stream-Closed"

_INTEGER = re.compile(r"^(0|[1-9][0-9]{0,17})$")
# Cursors advance every 20 s, so CDN-cached long-poll responses expire with them (protocol §cursor).
_CURSOR_INTERVAL_MS = 20_000


@dataclass(frozen=True, slots=True)
class _Target:
    principal: Principal
    name: str
    session_id: str | None


async def _target(request: Request, action: Action, name: str | None = None) -> _Target:
    """Authenticate, resolve the stream name (the path's unless given), and check the caller may
    ``action`` it."""
    state = app_state(request)
    principal = await state.authenticator.authenticate(request, allow_query_token=request.method == "GET")
    name = validate_name(request.path_params["name"] if name is None else name)
    channel = parse_session_channel(name)
    if channel is None:
        if name.startswith(SESSION_PREFIX):
            raise NotFound(f"stream {name!r} not found", code="stream_not_found")
        if not principal.may_on_all_sessions(action):
            raise Forbidden(f"stand-alone streams need the environment-wide {action.value}:sessions scope")
        return _Target(principal, name, None)
    ref, io = channel
    session = await channel_session(state, principal, action, ref)
    return _Target(principal, session_channel_name(session.id, io), session.id)


async def channel_session(state: AppState, principal: Principal, action: Action, ref: str) -> SessionView:
    """The session owning a channel, if the caller may ``action`` its channels (403 / 404)."""
    if not principal.may_on_any_session(action):
        raise Forbidden(f"this credential lacks the {action.value}:sessions scope")
    async with state.pool.acquire() as conn:
        return await authorized_session(conn, principal, action, ref)


def _integer_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not _INTEGER.match(value):
        raise ValidationFailed(f"{name} must be a non-negative integer without sign or leading zeros")
    return int(value)


def _flag(request: Request, name: str) -> bool:
    value = request.headers.get(name)
    return value is not None and value.strip().lower() == "true"


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
    target = await _target(request, Action.WRITE)
    state = app_state(request)
    ttl = _integer_header(request, "Stream-TTL")
    expires_at = _expires_at(request)
    if ttl is not None and expires_at is not None:
        raise ValidationFailed("send Stream-TTL or Stream-Expires-At, not both")
    fork_from = request.headers.get("Stream-Forked-From")
    fork_offset_header = request.headers.get("Stream-Fork-Offset")
    sub_offset = _integer_header(request, "Stream-Fork-Sub-Offset") or 0
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
    closed = _flag(request, CLOSED)
    body = await read_body(request, MAX_BATCH_BYTES)

    if target.session_id is not None:
        return await _describe_session_channel(state, target, content_type)

    settings = StreamSettings(
        content_type=content_type,
        ttl_seconds=ttl,
        expires_at=expires_at,
        closed=closed,
        fork_source=_stream_path_name(fork_from) if fork_from is not None else None,
        fork_offset=fork_offset,
        fork_sub_offset=sub_offset,
    )
    async with state.pool.acquire() as conn:
        created = await create_stream(
            conn, target.principal.environment.id, target.name, settings, state.streams.reader.record_at
        )
    head = created.head
    if not created.created:
        return Response(status_code=200, headers=_head_headers(head))
    records: list[bytes] = [created.prefix] if created.prefix is not None else []
    if body:
        records.extend(split_json(body, allow_empty_array=True) if is_json(head.content_type) else [body])
    check_batch(records)
    next_offset, is_closed = head.next_offset, False
    if records or closed:
        outcome = await state.streams.committer.append(
            AppendRequest(head.id, records, content_type=None, close=closed)
        )
        next_offset, is_closed = outcome.next_offset, outcome.closed
    headers = _head_headers(head, next_offset, is_closed)
    headers["Location"] = _location(request)
    return Response(status_code=201, headers=headers)


async def _describe_session_channel(state: AppState, target: _Target, content_type: str | None) -> Response:
    """A session's channels exist with the session: PUT confirms one (200) if the type fits."""
    async with state.pool.acquire() as conn:
        head = await load_head(conn, target.principal.environment.id, target.name)
    if content_type is not None and media_type(content_type) != media_type(head.content_type):
        raise Conflict(f"session channels are {head.content_type} streams", code="content_type_mismatch")
    return Response(status_code=200, headers=_head_headers(head))


# --- POST ------------------------------------------------------------------------------------


def _producer(request: Request) -> Producer | None:
    producer_id = request.headers.get("Producer-Id")
    epoch = request.headers.get("Producer-Epoch")
    seq = request.headers.get("Producer-Seq")
    given = [value is not None for value in (producer_id, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise ValidationFailed("Producer-Id, Producer-Epoch and Producer-Seq go together")
    if not producer_id or not producer_id.strip():
        raise ValidationFailed("Producer-Id must not be empty")
    parsed_epoch = _integer_header(request, "Producer-Epoch")
    parsed_seq = _integer_header(request, "Producer-Seq")
    assert parsed_epoch is not None
    assert parsed_seq is not None
    return Producer(producer_id, parsed_epoch, parsed_seq)


# A cached append target that yields one of these from the commit may be stale (the row is gone
# or a new stream took the name): resolve the name again and retry once. The append was refused,
# so nothing was written.
_STALE_TARGET_CODES = frozenset({"stream_not_found", "stream_gone", "content_type_mismatch"})


async def append_to(
    state: AppState,
    environment_id: str,
    name: str,
    request: Request,
    body: bytes,
    *,
    close: bool,
    default_content_type: str | None = None,
) -> tuple[AppendOutcome, Producer | None]:
    """Append the request's records to the stream ``name`` and wait for the commit.

    The name resolves through :class:`~threadline.streams.targets.AppendTargets`, so a steady
    appender costs no Postgres lookup of its own; the committer is the authority on everything
    else. ``default_content_type`` stands in for a missing Content-Type (the protocol demands
    one; the session routes assume JSON)."""
    producer = _producer(request)
    targets = state.streams.targets
    cached = targets.get(environment_id, name)
    if cached is not None:
        try:
            return await _append(
                state, cached, request, body, producer, close, default_content_type
            ), producer
        except ApiError as exc:
            if exc.code not in _STALE_TARGET_CODES:
                raise
            targets.forget(environment_id, name)
    async with state.pool.acquire() as conn:
        head = await load_head(conn, environment_id, name)
    target = targets.remember(environment_id, name, head.id, head.content_type)
    return await _append(state, target, request, body, producer, close, default_content_type), producer


async def _append(
    state: AppState,
    target: AppendTarget,
    request: Request,
    body: bytes,
    producer: Producer | None,
    close: bool,
    default_content_type: str | None,
) -> AppendOutcome:
    content_type = request.headers.get("content-type") or default_content_type
    records: list[bytes] = []
    if body:
        if not content_type:
            raise ValidationFailed("an append needs a Content-Type")
        check_content_type(content_type, target.content_type)
        records = split_json(body, allow_empty_array=False) if is_json(target.content_type) else [body]
        check_batch(records)
    elif not close:
        raise ValidationFailed("an append needs a body (or Stream-Closed: true)", code="empty_append")
    return await state.streams.committer.append(
        AppendRequest(
            target.id,
            records,
            content_type=content_type if records else None,
            close=close,
            producer=producer,
            stream_seq=request.headers.get("Stream-Seq"),
        )
    )


async def post_stream(request: Request) -> Response:
    target = await _target(request, Action.WRITE)
    state = app_state(request)
    body = await read_body(request, MAX_BATCH_BYTES)
    outcome, producer = await append_to(
        state, target.principal.environment.id, target.name, request, body, close=_flag(request, CLOSED)
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


def query_offset(request: Request) -> Position | None:
    """The request's ``?offset=``, parsed (None when absent; more than one is a 400)."""
    offsets = request.query_params.getlist("offset")
    if len(offsets) > 1:
        raise ValidationFailed("send one offset")
    return parse_offset(offsets[0]) if offsets else None


def _cursor(request: Request) -> str:
    """Increasing cursors: the current 20 s interval, or past the client's echoed cursor."""
    current = int(time.time() * 1000) // _CURSOR_INTERVAL_MS
    echoed = request.query_params.get("cursor")
    if echoed is not None and echoed.isdigit() and int(echoed) >= current:
        current = int(echoed) + 1 + secrets.randbelow(3)
    return str(current)


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
    target = await _target(request, Action.READ)
    state = app_state(request)
    async with state.pool.acquire() as conn:
        head = await load_head(conn, target.principal.environment.id, target.name)
        await extend_ttl(conn, head)
    start = head.read_start(position)
    if live == "sse":
        return _sse(request, state, head, start)
    if live == "long-poll":
        return await _long_poll(request, state, head, start)
    result = await state.streams.reader.read(head, start)
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


async def _long_poll(request: Request, state: AppState, head: StreamHead, start: int) -> Response:
    async with watching(state, head) as (head, tail):
        if start >= tail.next_offset and not tail.closed:
            await tail.wait_beyond(start, state.settings.long_poll_timeout_seconds)
        if start < tail.next_offset:
            result = await state.streams.reader.read(head, start, tail=tail)
            return _read_response(request, head, start, result, no_store=True, cursor=_cursor(request))
    headers = {
        NEXT_OFFSET: format_offset(max(start, tail.next_offset)),
        UP_TO_DATE: "true",
        "Cache-Control": "no-store",
    }
    if tail.closed:
        headers[CLOSED] = "true"
    else:
        headers[CURSOR] = _cursor(request)
    return Response(status_code=204, headers=headers)


def _sse(request: Request, state: AppState, head: StreamHead, start: int) -> Response:
    text = is_json(head.content_type) or media_type(head.content_type).startswith("text/")
    headers: dict[str, str] = {}
    if not text:
        headers["Stream-SSE-Data-Encoding"] = "base64"

    async def events() -> AsyncIterator[bytes]:
        position = start
        async with watching(state, head) as (fresh, tail):
            announced = False
            while True:
                fresh.check_readable(position)
                cursor = _cursor(request)

                async def build(at: int = position, cursor: str = cursor) -> tuple[ReadResult, bytes]:
                    result = await state.streams.reader.read(fresh, at, tail=tail)
                    # Data and its control event go out in one write: a reader never sees data
                    # without the offset that resumes after it.
                    frame = b""
                    after = at
                    if result.records:
                        frame = sse_event(event="data", data=_sse_data(fresh, result, text))
                        after = result.next_offset
                    return result, frame + sse_event(event="control", data=_control(result, after, cursor))

                result, frame = await shared(tail, ("ds", position, text, cursor), build)
                if result.records:
                    position = result.next_offset
                if result.records or not announced:
                    yield frame
                    announced = True
                if result.closed and position >= result.tail_offset:
                    return
                if position >= result.tail_offset:
                    await tail.wait_beyond(position, state.settings.sse_heartbeat_seconds)

    return event_stream(state, events(), headers)


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
    target = await _target(request, Action.READ)
    state = app_state(request)
    async with state.pool.acquire() as conn:
        head = await load_head(conn, target.principal.environment.id, target.name)
    headers = _head_headers(head)
    headers["Cache-Control"] = "no-store"
    if head.ttl_seconds is not None:
        headers["Stream-TTL"] = str(head.ttl_seconds)
    if head.expires_at is not None:
        headers["Stream-Expires-At"] = head.expires_at.isoformat().replace("+00:00", "Z")
    return Response(status_code=200, headers=headers)


# --- DELETE ----------------------------------------------------------------------------------


async def delete_stream_route(request: Request) -> Response:
    target = await _target(request, Action.WRITE)
    if target.session_id is not None:
        raise Conflict(
            "a session's channels are deleted with the session; close it instead", code="session_channel"
        )
    state = app_state(request)
    async with state.pool.acquire() as conn:
        head = await load_head(conn, target.principal.environment.id, target.name)
        await delete_stream(conn, head)
    state.streams.targets.forget(target.principal.environment.id, target.name)
    return Response(status_code=204)


# --- Trim (a Threadline extension; the protocol has no retention verb) ----------------------


class TrimBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    stream: str = Field(description="Stream name below /v1/stream/, e.g. sessions/<id>/out")
    before: str = Field(description="Records before this offset are removed; -1 is a no-op, now the tail")


async def trim_route(request: Request) -> Response:
    body = await read_model(request, TrimBody)
    target = await _target(request, Action.WRITE, body.stream.removeprefix(STREAM_PREFIX).lstrip("/"))
    state = app_state(request)
    position = parse_offset(body.before, name="before")
    async with state.pool.acquire() as conn:
        head = await load_head(conn, target.principal.environment.id, target.name)
        before = read_start(position, trim_offset=0, next_offset=head.next_offset)
        trim_offset, next_offset = await trim_stream(conn, head, before)
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


routes = [
    Route(TRIM_PATH, trim_route, methods=["POST"], name="streams_trim"),
    Route(
        STREAM_PREFIX + "{name:path}",
        stream_endpoint,
        methods=["GET", "HEAD", "PUT", "POST", "DELETE"],
        name="streams",
    ),
]
