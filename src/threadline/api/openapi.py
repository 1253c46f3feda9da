"""The OpenAPI document (``/openapi.json``) and the docs page (``/docs``).

Every route the app registers is described here; ``tests/test_openapi.py`` checks that against
the app's route table and validates the document. Request schemas come from the pydantic models
that validate bodies, list filters from :data:`threadline.sessions.fields.FILTER_PARAMS`, and
every error response names the ``code`` values it may carry from the catalogue in
:mod:`threadline.errors`, so none of them is written twice.

``/docs`` renders with Redoc, served by Threadline itself (``threadline.ui``): no CDN.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from threadline import __version__
from threadline.api.bodies import TrimBody
from threadline.api.openapi_subscriptions import WAKE_TOKEN_SCHEME, subscription_paths, subscription_schemas
from threadline.errors import (
    ApiError,
    BatchTooLarge,
    ChannelNotFound,
    ContentTypeMismatch,
    DatabaseUnavailable,
    EmptyAppend,
    ExternalIdConflict,
    Forbidden,
    ForkSourceDeleted,
    ForkSourceNotFound,
    InvalidCursor,
    InvalidForkOffset,
    InvalidJson,
    InvalidOffset,
    InvalidStreamName,
    InvalidTimeout,
    OffsetOutOfRange,
    OffsetTrimmed,
    OutcomeUnknown,
    PayloadTooLarge,
    ProducerEpochSeq,
    ProducerFenced,
    ProducerSeqGap,
    RecordTooLarge,
    ReplicationLagging,
    SessionChannel,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
    ShuttingDown,
    StorageUnavailable,
    StreamClosed,
    StreamDeleted,
    StreamExists,
    StreamGone,
    StreamNotFound,
    StreamSeqConflict,
    Unauthorized,
    UnknownParameter,
    ValidationFailed,
    api_error_classes,
)
from threadline.sessions.fields import FILTER_PARAMS, STATUSES
from threadline.sessions.models import (
    CloseSessionBody,
    CreateSessionBody,
    ForkSessionBody,
    MintTokenBody,
    PatchSessionBody,
)
from threadline.ui import asset_url

__all__ = ["build_openapi", "routes"]

_SCHEMAS = "#/components/schemas/"
_SESSION = {"$ref": f"{_SCHEMAS}Session"}

# --- Parameters --------------------------------------------------------------------------------

_SESSION_PARAM = {
    "name": "session",
    "in": "path",
    "required": True,
    "description": "A session id (`session_…`) or the session's externalId.",
    "schema": {"type": "string"},
}
# On the channel routes the example names a session by its externalId (as the README's examples
# do), so the example reaches a real channel wherever that session exists (the fuzz test makes it).
_CHANNEL_SESSION_PARAM = {**_SESSION_PARAM, "example": "conv-42"}
_IO_PARAM = {
    "name": "io",
    "in": "path",
    "required": True,
    "description": "The channel: `out` (agent → clients) or `in` (clients → agent).",
    "schema": {"type": "string", "enum": ["out", "in"]},
}
_STREAM_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The stream name; may contain `/`. A session's channels are `sessions/<session>/out|in`.",
    "schema": {"type": "string"},
}
_OFFSET_SCHEMA = {
    "type": "string",
    "pattern": "^(-1|now|[0-9]{16}_[0-9]{16})$",
    "example": "0000000000000000_0000000000000042",
}
_OFFSET_PARAM = {
    "name": "offset",
    "in": "query",
    "description": "Where to start: `-1` (the first kept record), `now` (the tail) or an offset this "
    "server returned. Offsets compare as strings.",
    "schema": _OFFSET_SCHEMA,
}
_TOKEN_PARAM = {
    "name": "token",
    "in": "query",
    "description": "A JWT, for clients that cannot send headers (`EventSource`). Only on GET; never a "
    "secret key.",
    "schema": {"type": "string"},
}
# The list filters are described where they are defined (sessions.fields).
_FILTER_PARAMS = [param.openapi() for param in FILTER_PARAMS] + [
    {
        "name": "minLsn",
        "in": "query",
        "schema": {"type": "string"},
        "description": "Read-your-writes: a `Threadline-Lsn` from a write; the list waits until "
        "the list store holds it (503 `replication_lagging` after the configured wait).",
    }
]


def _header_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "header", "description": description, "schema": schema or {"type": "string"}}


_PRODUCER_PARAMS = [
    _header_param(
        "Producer-Id", "Idempotent producer id; Producer-Id, -Epoch and -Seq are sent together or not at all."
    ),
    _header_param(
        "Producer-Epoch",
        "The producer's epoch; a higher one fences older ones (403 `producer_fenced`).",
        {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"},
    ),
    _header_param(
        "Producer-Seq",
        "The producer's sequence number within the epoch: a repeat is a duplicate, a gap is 409.",
        {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"},
    ),
]
_STREAM_SEQ_PARAM = _header_param(
    "Stream-Seq", "Writer coordination: must be greater (as a string) than the last one sent (409 otherwise)."
)

# --- Response headers --------------------------------------------------------------------------

_HEADERS: dict[str, dict[str, Any]] = {
    "StreamNextOffset": {
        "description": "The offset after the last record returned or written: resume from it.",
        "schema": _OFFSET_SCHEMA,
    },
    "StreamClosed": {
        "description": "`true` when the stream is closed (and, on reads, the reader is at its end).",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "StreamUpToDate": {
        "description": "`true` when the read reached the tail.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "StreamCursor": {
        "description": "Echo as `?cursor=` on the next long-poll: keeps cached responses apart.",
        "schema": {"type": "string"},
    },
    "StreamTTL": {
        "description": "The stream's sliding time to live, in seconds.",
        "schema": {"type": "string"},
    },
    "StreamExpiresAt": {"description": "The stream's fixed expiry (RFC 3339).", "schema": {"type": "string"}},
    "ProducerEpoch": {
        "description": "The producer epoch the append was taken under.",
        "schema": {"type": "string"},
    },
    "ProducerSeq": {
        "description": "The producer sequence number acknowledged.",
        "schema": {"type": "string"},
    },
    "ETag": {"description": "Send back as `If-None-Match` to get a 304.", "schema": {"type": "string"}},
    "Location": {"description": "The new stream's URL.", "schema": {"type": "string"}},
    "ThreadlineLsn": {
        "description": "Postgres WAL position after this write; pass as `minLsn` to a list to read it.",
        "schema": {"type": "string"},
    },
    "ThreadlineListSource": {
        "description": "Which store answered: `clickhouse`, or `postgres` (fallback or configured).",
        "schema": {"type": "string", "enum": ["clickhouse", "postgres"]},
    },
    "RetryAfter": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}},
    "WWWAuthenticate": {"description": '`Bearer realm="threadline"`.', "schema": {"type": "string"}},
    "StreamSSEDataEncoding": {
        "description": "`base64` when a binary stream's SSE `data` events carry base64.",
        "schema": {"type": "string", "enum": ["base64"]},
    },
}


def _headers(*names: str) -> dict[str, Any]:
    return {_HEADER_NAMES[name]: {"$ref": f"#/components/headers/{name}"} for name in names}


_HEADER_NAMES = {
    "StreamNextOffset": "Stream-Next-Offset",
    "StreamClosed": "Stream-Closed",
    "StreamUpToDate": "Stream-Up-To-Date",
    "StreamCursor": "Stream-Cursor",
    "StreamTTL": "Stream-TTL",
    "StreamExpiresAt": "Stream-Expires-At",
    "ProducerEpoch": "Producer-Epoch",
    "ProducerSeq": "Producer-Seq",
    "ETag": "ETag",
    "Location": "Location",
    "ThreadlineLsn": "Threadline-Lsn",
    "ThreadlineListSource": "Threadline-List-Source",
    "RetryAfter": "Retry-After",
    "WWWAuthenticate": "WWW-Authenticate",
    "StreamSSEDataEncoding": "Stream-SSE-Data-Encoding",
}

# --- Responses ---------------------------------------------------------------------------------

_STATUS_TEXT = {
    400: "Bad input",
    401: "Missing or invalid credential",
    403: "The credential lacks the scope",
    404: "Not found (or not in the caller's environment)",
    409: "Conflict",
    410: "Gone",
    413: "Body too large",
    503: "A dependency is unavailable; retry after Retry-After",
}
# Every authenticated route may answer these.
_AUTH_ERRORS: tuple[type[ApiError], ...] = (Unauthorized, Forbidden)


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {"type": "string"},
                    "details": {"description": "More about the error (e.g. the invalid fields)."},
                },
            }
        },
    }


def _errors(*errors: type[ApiError], auth: bool = True) -> dict[str, Any]:
    """Error responses grouped by status, each listing the catalogue codes it may carry."""
    by_status: dict[int, list[str]] = {}
    for error in (*(_AUTH_ERRORS if auth else ()), *errors):
        codes = by_status.setdefault(error.status_code, [])
        if error.code not in codes:
            codes.append(error.code)
    responses: dict[str, Any] = {}
    for status in sorted(by_status):
        codes = by_status[status]
        response: dict[str, Any] = {
            "description": f"{_STATUS_TEXT.get(status, 'Error')}: `{'`, `'.join(codes)}`",
            "content": {"application/json": {"schema": _error_schema(codes)}},
        }
        if status == 401:
            response["headers"] = _headers("WWWAuthenticate")
        if status == 503:
            response["headers"] = _headers("RetryAfter")
        responses[str(status)] = response
    return responses


def _json_ok(
    description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _links(parameters: dict[str, str], *operation_ids: str) -> dict[str, Any]:
    """OpenAPI links: how the value an answer names feeds the next calls (a stateful fuzzer
    follows them: create a session, then get, patch, append to and close it)."""
    return {
        operation_id: {"operationId": operation_id, "parameters": parameters}
        for operation_id in operation_ids
    }


_SESSION_LINKS = _links(
    {"session": "$response.body#/id"},
    "getSession",
    "patchSession",
    "closeSession",
    "mintSessionToken",
    "describeChannel",
    "subscribeChannel",
    "appendChannel",
)
# A stand-alone stream is named by the path it was created or written at.
_STREAM_LINKS = {
    **_links({"name": "$request.path.name"}, "appendStream", "readStream", "headStream", "deleteStream"),
    "trimStream": {
        "operationId": "trimStream",
        "requestBody": {"stream": "$request.path.name", "before": "now"},
    },
}


def _body(
    model: type[BaseModel], *, required: bool = True, example: dict[str, Any] | None = None
) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": {"$ref": f"{_SCHEMAS}{model.__name__}"}}
    if example is not None:
        media["example"] = example
    return {"required": required, "content": {"application/json": media}}


_BODY_ERRORS: tuple[type[ApiError], ...] = (ValidationFailed, InvalidJson, PayloadTooLarge)
_SERVICE_ERRORS: tuple[type[ApiError], ...] = (DatabaseUnavailable, ShuttingDown)

# --- Schemas -----------------------------------------------------------------------------------

_CHANNEL_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {"type": "integer", "description": "Records ever appended (trimming does not lower it)."},
        "bytes": {"type": "integer"},
        "tailOffset": {"type": "string", "description": "The offset after the last record."},
        "closed": {"type": "boolean"},
        "firstRecordAt": {"type": ["string", "null"], "format": "date-time"},
        "lastRecordAt": {"type": ["string", "null"], "format": "date-time"},
    },
}
_SESSION_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "example": "session_01hz3k0c9x7h6h4q2w8r5t3y1e"},
        "externalId": {"type": ["string", "null"]},
        "type": {"type": "string"},
        "taskIdentifier": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "metadata": {"type": "object"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "closedAt": {"type": ["string", "null"], "format": "date-time"},
        "closedReason": {"type": ["string", "null"]},
        "expiresAt": {"type": ["string", "null"], "format": "date-time"},
        "createdAt": {"type": "string", "format": "date-time"},
        "updatedAt": {"type": "string", "format": "date-time"},
        "lastActiveAt": {"type": "string", "format": "date-time"},
        "channels": {
            "type": "object",
            "properties": {"out": {"$ref": f"{_SCHEMAS}Channel"}, "in": {"$ref": f"{_SCHEMAS}Channel"}},
        },
        "forkedFrom": {
            "type": ["object", "null"],
            "description": "For a fork: its parent and the parent's channel offsets it forked at. "
            "Null for a root session.",
            "properties": {
                "session": {"type": "string", "description": "The parent session's id."},
                "outOffset": {"type": "string"},
                "inOffset": {"type": "string"},
            },
        },
        "rootId": {
            "type": "string",
            "description": "The first session of this one's fork tree: a root's own id.",
        },
    },
}
_SESSION_PAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "data": {"type": "array", "items": _SESSION},
        "pagination": {
            "type": "object",
            "properties": {
                "next": {"type": ["string", "null"], "description": "Pass as page[after]."},
                "previous": {"type": ["string", "null"], "description": "Pass as page[before]."},
            },
        },
    },
}
_COUNT_SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "byStatus": {
            "type": "object",
            "properties": {status: {"type": "integer"} for status in STATUSES},
        },
    },
}
_TOKEN_SCHEMA = {
    "type": "object",
    "properties": {
        "token": {"type": "string", "description": "An HS256 JWT."},
        "sessionId": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string"}},
        "expiresAt": {"type": "string", "format": "date-time"},
    },
}
_DESCRIBE_SCHEMA = {
    "type": "object",
    "properties": {
        "sessionId": {"type": "string"},
        "io": {"type": "string", "enum": ["out", "in"]},
        "sessionStatus": {"type": "string", "enum": list(STATUSES)},
        "contentType": {"type": "string"},
        **_CHANNEL_SCHEMA["properties"],  # type: ignore[dict-item]
        "urls": {
            "type": "object",
            "properties": {
                "subscribe": {"type": "string"},
                "append": {"type": "string"},
                "stream": {"type": "string", "description": "The Durable Streams URL of the channel."},
            },
        },
    },
}
_APPEND_ACK_SCHEMA = {
    "type": "object",
    "required": ["offset", "nextOffset", "records"],
    "properties": {
        "offset": {"type": "string", "description": "The offset of the first record appended."},
        "nextOffset": {"type": "string", "description": "The offset after the last one."},
        "records": {"type": "integer"},
        "duplicate": {
            "type": "boolean",
            "description": "With Producer-* headers: true when this was a retry (the original ack).",
        },
    },
}
_TRIM_SCHEMA = {
    "type": "object",
    "properties": {
        "stream": {"type": "string"},
        "trimOffset": {"type": "string", "description": "The effective trim point (never moves back)."},
        "nextOffset": {"type": "string"},
    },
}
_ANY_JSON: dict[str, Any] = {"description": "Any JSON value."}
_BYTES = {"type": "string", "format": "binary"}


def _schemas() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        CreateSessionBody,
        PatchSessionBody,
        CloseSessionBody,
        ForkSessionBody,
        MintTokenBody,
        TrimBody,
    ]
    schemas: dict[str, Any] = {
        model.__name__: model.model_json_schema(ref_template=f"{_SCHEMAS}{{model}}") for model in models
    }
    schemas.update(
        {
            "Session": _SESSION_SCHEMA,
            "Channel": _CHANNEL_SCHEMA,
            "Error": _error_schema(sorted({cls.code for cls in api_error_classes()})),
        }
    )
    schemas.update(subscription_schemas())
    return schemas


# --- Paths -------------------------------------------------------------------------------------


def _sessions_paths() -> dict[str, Any]:
    session_path = "/api/v1/sessions/{session}"
    lsn = _headers("ThreadlineLsn")
    list_errors = _errors(
        ValidationFailed, UnknownParameter, InvalidCursor, ReplicationLagging, *_SERVICE_ERRORS
    )
    return {
        "/api/v1/sessions": {
            "post": {
                "tags": ["Sessions"],
                "operationId": "createSession",
                "summary": "Create a session (idempotent on externalId)",
                "description": "With `externalId`: 201 on create, 200 with the existing session, 409 "
                "`session_closed` if that session is closed. Needs environment-wide write scope.",
                "requestBody": _body(CreateSessionBody),
                "responses": {
                    "201": {**_json_ok("Created", _SESSION, lsn), "links": _SESSION_LINKS},
                    "200": {
                        **_json_ok("The existing session with this externalId", _SESSION, lsn),
                        "links": _SESSION_LINKS,
                    },
                    **_errors(*_BODY_ERRORS, SessionClosed, *_SERVICE_ERRORS),
                },
            },
            "get": {
                "tags": ["Sessions"],
                "operationId": "listSessions",
                "summary": "List sessions",
                "description": "Filters combine with AND; each comma list is any-of. Unknown parameters "
                "are 400. Served from ClickHouse when the mirror is ready, else Postgres.",
                "parameters": [
                    *_FILTER_PARAMS,
                    {
                        "name": "sort",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["-createdAt", "createdAt", "-lastActiveAt", "lastActiveAt"],
                            "default": "-createdAt",
                        },
                    },
                    {
                        "name": "page[size]",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "page[after]",
                        "in": "query",
                        "description": "`pagination.next` of the previous page.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "page[before]",
                        "in": "query",
                        "description": "`pagination.previous` of the next page.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json_ok(
                        "A page of sessions", _SESSION_PAGE_SCHEMA, _headers("ThreadlineListSource")
                    ),
                    **list_errors,
                },
            },
        },
        "/api/v1/sessions/count": {
            "get": {
                "tags": ["Sessions"],
                "operationId": "countSessions",
                "summary": "Count sessions matching the list filters, in total and by status",
                "parameters": _FILTER_PARAMS,
                "responses": {
                    "200": _json_ok("Counts", _COUNT_SCHEMA, _headers("ThreadlineListSource")),
                    **list_errors,
                },
            }
        },
        session_path: {
            "parameters": [_SESSION_PARAM],
            "get": {
                "tags": ["Sessions"],
                "operationId": "getSession",
                "summary": "Get a session",
                "responses": {
                    "200": _json_ok("The session", _SESSION),
                    **_errors(SessionNotFound, *_SERVICE_ERRORS),
                },
            },
            "patch": {
                "tags": ["Sessions"],
                "operationId": "patchSession",
                "summary": "Update tags, metadata, externalId or expiresAt",
                "description": "Only the fields sent change; `metadata` is replaced whole; a closed "
                "session is terminal (409 `session_closed`).",
                "requestBody": _body(PatchSessionBody),
                "responses": {
                    "200": _json_ok("The updated session", _SESSION, lsn),
                    **_errors(
                        *_BODY_ERRORS, SessionNotFound, SessionClosed, ExternalIdConflict, *_SERVICE_ERRORS
                    ),
                },
            },
        },
        f"{session_path}/close": {
            "parameters": [_SESSION_PARAM],
            "post": {
                "tags": ["Sessions"],
                "operationId": "closeSession",
                "summary": "Close a session and both its channels (idempotent)",
                "requestBody": _body(CloseSessionBody, required=False),
                "responses": {
                    "200": _json_ok("The closed session (a second close returns the first)", _SESSION, lsn),
                    **_errors(*_BODY_ERRORS, SessionNotFound, *_SERVICE_ERRORS),
                },
            },
        },
        f"{session_path}/fork": {
            "parameters": [_SESSION_PARAM],
            "post": {
                "tags": ["Sessions"],
                "operationId": "forkSession",
                "summary": "Fork a session: a new session whose channels continue the parent's",
                "description": "The new session's `out` and `in` are stream forks of the parent's at "
                "`outOffset` / `inOffset` (default: each channel's tail; `-1` is the first kept "
                "record, `now` the tail): they read the parent's records before those offsets, then "
                "their own appends. No record is copied. Absent `type`, `tags` and `metadata` are "
                "the parent's (`taskIdentifier` always is); the fork is open with no expiry, even "
                "when the parent is closed. An offset outside the parent channel's kept range is 400 "
                "`invalid_fork_offset`. With an `externalId` that already names a fork of this "
                "parent (at the offsets given), 200 with it; another session with it is 409 "
                "`external_id_conflict`. Needs environment-wide write scope, as create does.",
                "requestBody": _body(ForkSessionBody, required=False),
                "responses": {
                    "201": _json_ok("The new session", _SESSION, lsn),
                    "200": _json_ok("The existing fork with this externalId", _SESSION, lsn),
                    **_errors(
                        *_BODY_ERRORS,
                        InvalidOffset,
                        OffsetOutOfRange,
                        InvalidForkOffset,
                        SessionNotFound,
                        SessionClosed,
                        ExternalIdConflict,
                        *_SERVICE_ERRORS,
                    ),
                },
            },
        },
        f"{session_path}/tokens": {
            "parameters": [_SESSION_PARAM],
            "post": {
                "tags": ["Sessions"],
                "operationId": "mintSessionToken",
                "summary": "Mint a JWT scoped to this session (for a browser)",
                "description": "Needs admin scope on the session (a secret key has it). Scopes `read` "
                "and/or `write` become `read:sessions:<id>` / `write:sessions:<id>`.",
                "requestBody": _body(MintTokenBody, required=False),
                "responses": {
                    "201": _json_ok("The token", _TOKEN_SCHEMA),
                    **_errors(*_BODY_ERRORS, SessionNotFound, *_SERVICE_ERRORS),
                },
            },
        },
    }


_APPEND_ERRORS: tuple[type[ApiError], ...] = (
    ValidationFailed,
    InvalidJson,
    EmptyAppend,
    ProducerEpochSeq,
    ProducerFenced,
    ProducerSeqGap,
    StreamSeqConflict,
    StreamClosed,
    ContentTypeMismatch,
    PayloadTooLarge,
    RecordTooLarge,
    BatchTooLarge,
    StorageUnavailable,
    OutcomeUnknown,
    *_SERVICE_ERRORS,
)


def _realtime_paths() -> dict[str, Any]:
    channel = "/realtime/v1/sessions/{session}/{io}"
    channel_errors = (SessionNotFound, ChannelNotFound)
    return {
        channel: {
            "parameters": [_CHANNEL_SESSION_PARAM, _IO_PARAM],
            "put": {
                "tags": ["Realtime"],
                "operationId": "describeChannel",
                "summary": "Describe a session channel and the URLs to read and write it",
                "description": "Read scope on the session. Idempotent: channels exist with their session.",
                "responses": {
                    "200": _json_ok("The channel", _DESCRIBE_SCHEMA),
                    **_errors(*channel_errors, *_SERVICE_ERRORS),
                },
            },
            "get": {
                "tags": ["Realtime"],
                "operationId": "subscribeChannel",
                "summary": "Subscribe (SSE): one event per record, resumable",
                "description": "Each record is one `message` event: `data:` its JSON, `id:` the offset "
                "after it. Starts at `Last-Event-ID` (a reconnecting EventSource sends it), else "
                "`?offset=` (default `-1`). The response ends after `Timeout-Seconds` and the client "
                "reconnects where it left off (`retry: 1000`). When the channel closes, `event: closed` "
                '(`{"nextOffset"}`) follows the last record and the response ends.',
                "parameters": [
                    _OFFSET_PARAM,
                    _TOKEN_PARAM,
                    {
                        "name": "timeoutSeconds",
                        "in": "query",
                        "description": "Connection lifetime for EventSource (1–600, default 60).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 600, "default": 60},
                    },
                    _header_param(
                        "Last-Event-ID",
                        "The last `id:` received; wins over `?offset=`.",
                        _OFFSET_SCHEMA,
                    ),
                    _header_param(
                        "Timeout-Seconds",
                        "Connection lifetime (1–600, default 60).",
                        {"type": "integer", "minimum": 1, "maximum": 600},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "An SSE stream of records.",
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "example": 'retry: 1000\n\nid: 0000000000000000_0000000000000001\ndata:{"role":"agent"}\n\n'
                                'event: closed\ndata:{"nextOffset":"0000000000000000_0000000000000001"}\n\n',
                            }
                        },
                    },
                    "204": {
                        "description": "At the end of a closed channel: nothing more will come "
                        "(EventSource stops reconnecting).",
                        "headers": _headers("StreamNextOffset"),
                    },
                    **_errors(
                        InvalidOffset,
                        OffsetOutOfRange,
                        InvalidTimeout,
                        *channel_errors,
                        OffsetTrimmed,
                        *_SERVICE_ERRORS,
                    ),
                },
            },
        },
        f"{channel}/append": {
            "parameters": [_CHANNEL_SESSION_PARAM, _IO_PARAM],
            "post": {
                "tags": ["Realtime"],
                "operationId": "appendChannel",
                "summary": "Append a JSON value (one record) or a JSON array (one record per element)",
                "description": "Atomic. `Content-Type` may be omitted (JSON is assumed). A closed session "
                "is 409 `session_closed`, an expired one 409 `session_expired`.",
                "parameters": [*_PRODUCER_PARAMS, _STREAM_SEQ_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ANY_JSON}}},
                "responses": {
                    "200": {
                        **_json_ok(
                            "Appended (or, with Producer-*, the original ack of a duplicate)",
                            _APPEND_ACK_SCHEMA,
                            _headers("StreamNextOffset", "ProducerEpoch", "ProducerSeq"),
                        ),
                        "links": _links(
                            {
                                "session": "$request.path.session",
                                "io": "$request.path.io",
                                "offset": "$response.body#/offset",
                            },
                            "subscribeChannel",
                        ),
                    },
                    **_errors(*channel_errors, SessionClosed, SessionExpired, *_APPEND_ERRORS),
                },
            },
        },
    }


def _stream_paths() -> dict[str, Any]:
    name_errors = (InvalidStreamName, StreamNotFound)
    # A read answers with the stream's own content type (any media type given at create).
    read_content = {
        "application/json": {"schema": {"type": "array", "items": _ANY_JSON}},
        "application/octet-stream": {"schema": _BYTES},
        "text/plain": {"schema": {"type": "string"}},
        "*/*": {"schema": _BYTES},
    }
    return {
        "/v1/stream/{name}": {
            "parameters": [_STREAM_NAME_PARAM],
            "put": {
                "tags": ["Durable Streams"],
                "operationId": "createStream",
                "summary": "Create a stream (idempotent), optionally with a first body, closed, or as a fork",
                "description": "Same settings again answer 200, different ones 409. A session's channels "
                "exist with the session: PUT confirms one (200).",
                "parameters": [
                    _header_param(
                        "Content-Type",
                        "The stream's content type, a media type such as `text/plain` (default "
                        "application/octet-stream); reads answer with it.",
                    ),
                    _header_param(
                        "Stream-TTL", "Sliding time to live in seconds.", {"type": "integer", "minimum": 0}
                    ),
                    _header_param(
                        "Stream-Expires-At", "Fixed expiry (RFC 3339 with zone); not with Stream-TTL."
                    ),
                    _header_param("Stream-Closed", "`true`: create the stream closed.", {"type": "string"}),
                    _header_param("Stream-Forked-From", "Fork this stream: `/v1/stream/<source>`."),
                    _header_param(
                        "Stream-Fork-Offset",
                        "Where the fork branches off (default the tail).",
                        _OFFSET_SCHEMA,
                    ),
                    _header_param(
                        "Stream-Fork-Sub-Offset",
                        "Bytes into the record at Stream-Fork-Offset.",
                        {"type": "integer", "minimum": 0},
                    ),
                ],
                "requestBody": {
                    "required": False,
                    "content": {"*/*": {"schema": _BYTES}},
                    "description": "The stream's first records.",
                },
                "responses": {
                    "201": {
                        "description": "Created",
                        "headers": _headers("StreamNextOffset", "StreamClosed", "Location"),
                        "links": _STREAM_LINKS,
                    },
                    "200": {
                        "description": "Already exists with the same settings",
                        "headers": _headers("StreamNextOffset", "StreamClosed"),
                    },
                    **_errors(
                        ValidationFailed,
                        InvalidOffset,
                        InvalidForkOffset,
                        OffsetOutOfRange,
                        *name_errors,
                        ForkSourceNotFound,
                        StreamExists,
                        StreamDeleted,
                        ContentTypeMismatch,
                        ForkSourceDeleted,
                        PayloadTooLarge,
                        RecordTooLarge,
                        BatchTooLarge,
                        StorageUnavailable,
                        *_SERVICE_ERRORS,
                    ),
                },
            },
            "post": {
                "tags": ["Durable Streams"],
                "operationId": "appendStream",
                "summary": "Append (bytes, or JSON records in a JSON stream); close",
                "description": "204 with `Stream-Next-Offset`. `Stream-Closed: true` closes the stream "
                "(with or without a last body). With Producer-*: 200 appended, 204 duplicate (nothing "
                "appended), 409 gap, 403 stale epoch.",
                "parameters": [
                    _header_param("Content-Type", "Must match the stream's."),
                    _header_param("Stream-Closed", "`true`: close the stream after this body."),
                    *_PRODUCER_PARAMS,
                    _STREAM_SEQ_PARAM,
                ],
                "requestBody": {"required": False, "content": {"*/*": {"schema": _BYTES}}},
                "responses": {
                    "200": {
                        "description": "Appended by an idempotent producer",
                        "headers": _headers(
                            "StreamNextOffset", "StreamClosed", "ProducerEpoch", "ProducerSeq"
                        ),
                    },
                    "204": {
                        "description": "Appended (or a producer's duplicate: nothing appended)",
                        "headers": _headers(
                            "StreamNextOffset", "StreamClosed", "ProducerEpoch", "ProducerSeq"
                        ),
                    },
                    **_errors(*name_errors, SessionClosed, SessionExpired, StreamGone, *_APPEND_ERRORS),
                },
            },
            "get": {
                "tags": ["Durable Streams"],
                "operationId": "readStream",
                "summary": "Read from an offset: catch-up, long-poll or SSE",
                "description": "Catch-up returns what is there (a JSON stream as one array) up to a "
                "size cap; continue from `Stream-Next-Offset`. `live=long-poll` waits for data (204 on "
                "timeout). `live=sse` streams `event: data` / `event: control` (JSON with "
                "`streamNextOffset`, `streamCursor`, `upToDate`, `streamClosed`).",
                "parameters": [
                    _OFFSET_PARAM,
                    {
                        "name": "live",
                        "in": "query",
                        "description": "`long-poll` or `sse` (needs an offset).",
                        "schema": {"type": "string", "enum": ["long-poll", "sse"]},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "The last `Stream-Cursor` (long-poll).",
                        "schema": {"type": "string"},
                    },
                    _TOKEN_PARAM,
                    _header_param("If-None-Match", "An ETag from an earlier read of the same range."),
                ],
                "responses": {
                    "200": {
                        "description": "Records (catch-up or long-poll), or an SSE stream (`live=sse`).",
                        "headers": _headers(
                            "StreamNextOffset",
                            "StreamUpToDate",
                            "StreamClosed",
                            "StreamCursor",
                            "ETag",
                            "StreamSSEDataEncoding",
                        ),
                        "content": {**read_content, "text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "204": {
                        "description": "Long-poll timed out with no data",
                        "headers": _headers(
                            "StreamNextOffset", "StreamUpToDate", "StreamClosed", "StreamCursor"
                        ),
                    },
                    "304": {
                        "description": "Not modified (If-None-Match matched)",
                        "headers": _headers("StreamNextOffset", "ETag"),
                    },
                    **_errors(
                        ValidationFailed,
                        InvalidOffset,
                        OffsetOutOfRange,
                        *name_errors,
                        StreamGone,
                        OffsetTrimmed,
                        StorageUnavailable,
                        *_SERVICE_ERRORS,
                    ),
                },
            },
            "head": {
                "tags": ["Durable Streams"],
                "operationId": "headStream",
                "summary": "Stream metadata (does not extend a TTL)",
                "responses": {
                    "200": {
                        "description": "The stream's content type, tail, closure and expiry",
                        "headers": _headers(
                            "StreamNextOffset", "StreamClosed", "StreamTTL", "StreamExpiresAt"
                        ),
                    },
                    **_errors(*name_errors, StreamGone, *_SERVICE_ERRORS),
                },
            },
            "delete": {
                "tags": ["Durable Streams"],
                "operationId": "deleteStream",
                "summary": "Delete a stream (soft while forks read from it: 410 until the last fork goes)",
                "responses": {
                    "204": {"description": "Deleted"},
                    **_errors(*name_errors, SessionChannel, StreamGone, *_SERVICE_ERRORS),
                },
            },
        },
        "/api/v1/streams/trim": {
            "post": {
                "tags": ["Durable Streams"],
                "operationId": "trimStream",
                "summary": "Trim: make the records before an offset unreadable and free their storage",
                "description": "A Threadline extension. Write scope on the stream. Never moves back; "
                "`now` trims everything; a read below the trim point is 410 `offset_trimmed`.",
                "requestBody": _body(TrimBody, example={"stream": "chat/room-1", "before": "now"}),
                "responses": {
                    "200": _json_ok("The effective trim point", _TRIM_SCHEMA),
                    **_errors(
                        *_BODY_ERRORS,
                        InvalidOffset,
                        OffsetOutOfRange,
                        *name_errors,
                        StreamGone,
                        *_SERVICE_ERRORS,
                    ),
                },
            }
        },
    }


def _operations_paths() -> dict[str, Any]:
    check = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "latencyMs": {"type": "number"},
            "error": {"type": "string"},
        },
    }
    ready = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ready", "degraded", "unavailable"]},
            "checks": {
                "type": "object",
                "properties": {"postgres": check, "s3": check, "clickhouse": check},
            },
            "replication": {
                "type": "object",
                "description": "The ClickHouse mirror's progress (reported, not gating readiness).",
                "properties": {
                    "slot": {"type": "string"},
                    "slotExists": {"type": "boolean"},
                    "confirmedLsn": {"type": ["string", "null"]},
                    "lagBytes": {"type": ["integer", "null"]},
                    "lagSeconds": {"type": "number"},
                    "thisInstanceLeads": {"type": "boolean"},
                },
            },
        },
    }
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/healthz": {
            "get": {
                "tags": ["Operations"],
                "operationId": "healthz",
                "summary": "The process is up",
                "security": [],
                "responses": {
                    "200": _json_ok("OK", {"type": "object", "properties": {"status": {"const": "ok"}}})
                },
            }
        },
        "/readyz": {
            "get": {
                "tags": ["Operations"],
                "operationId": "readyz",
                "summary": "Postgres and S3 answer within 2 s (ClickHouse checked, reported, not required); replication lag",
                "security": [],
                "responses": {
                    "200": _json_ok(
                        "Ready, or degraded: only ClickHouse is unavailable (lists from Postgres)", ready
                    ),
                    "503": _json_ok("Postgres or S3 is unavailable (per-check errors)", ready),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["Operations"],
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["Operations"],
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json_ok("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/docs": {
            "get": {
                "tags": ["Operations"],
                "operationId": "docs",
                "summary": "This document, rendered (Redoc, served by Threadline)",
                "security": [],
                "responses": {"200": {"description": "HTML", "content": html}},
            }
        },
        "/ui": {
            "get": {
                "tags": ["Operations"],
                "operationId": "ui",
                "summary": "The session browser (sign in with a secret key or a `threadline ui-link`)",
                "security": [],
                "responses": {"200": {"description": "HTML", "content": html}},
            }
        },
        "/ui/static/{name}": {
            "get": {
                "tags": ["Operations"],
                "operationId": "uiStatic",
                "summary": "A file the UI and the docs page load (cached for a year when `v` matches)",
                "security": [],
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "example": "docs.js",
                    },
                    {"name": "v", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "The file", "content": {"*/*": {"schema": _BYTES}}},
                    "404": {
                        "description": "No such file: `route_not_found`",
                        "content": {"application/json": {"schema": {"$ref": f"{_SCHEMAS}Error"}}},
                    },
                },
            }
        },
    }


def build_openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Threadline",
            "version": __version__,
            "description": "Durable session streams for AI agents and chat apps.\n\n"
            'Every error is `{"error": {"code", "message", "details"}}`; each response lists the '
            "`code` values it may carry. Every bad input is a 400. Authenticate with "
            "`Authorization: Bearer <secret key or JWT>`; on GET stream routes a JWT may come as "
            "`?token=` instead (EventSource cannot send headers).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [
            {
                "name": "Sessions",
                "description": "Create, list, count, patch and close sessions; mint tokens.",
            },
            {"name": "Realtime", "description": "A session's `out` and `in` channels, shaped for browsers."},
            {"name": "Durable Streams", "description": "The Durable Streams protocol, plus trim."},
            {
                "name": "Subscriptions",
                "description": "Durable Streams subscriptions (§6-7): wake workers by webhook or pull-wake.",
            },
            {"name": "Operations", "description": "Health, metrics, these docs and the session browser."},
        ],
        "components": {
            "schemas": _schemas(),
            "headers": _HEADERS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A secret API key (tl_sk_…) or an HS256 JWT signed with the environment's secret.",
                },
                "wakeToken": WAKE_TOKEN_SCHEME,
            },
        },
        "paths": {
            **_sessions_paths(),
            **_realtime_paths(),
            **subscription_paths(),
            **_stream_paths(),
            **_operations_paths(),
        },
    }


# No inline script: the page loads Redoc and the two lines that start it from Threadline itself.
_DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def _docs_html() -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Threadline API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
</head>
<body><div id="redoc" data-spec-url="/openapi.json"></div>
<noscript>The API document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
<script src="{asset_url("vendor/redoc/redoc.standalone.js")}"></script>
<script src="{asset_url("docs.js")}"></script>
</body></html>"""


async def openapi_json(request: Request) -> Response:
    return JSONResponse(build_openapi())


async def docs(request: Request) -> Response:
    return HTMLResponse(_docs_html(), headers={"Content-Security-Policy": _DOCS_CSP})


routes = [
    Route("/openapi.json", openapi_json, methods=["GET"], name="openapi"),
    Route("/docs", docs, methods=["GET"], name="docs"),
]
