"""The OpenAPI document (``/openapi.json``) and a docs page (``/docs``).

Request schemas come from the same pydantic models that validate bodies, so the document cannot
drift from what the server accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from threadline import __version__
from threadline.sessions.fields import FILTER_PARAMS
from threadline.sessions.models import CloseSessionBody, CreateSessionBody, MintTokenBody, PatchSessionBody

__all__ = ["build_openapi", "routes"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_SESSION = {"$ref": "#/components/schemas/Session"}
_SESSION_PARAM = {
    "name": "session",
    "in": "path",
    "required": True,
    "description": "A session id (`session_…`) or the session's externalId.",
    "schema": {"type": "string"},
}
# The list filters are described where they are defined (sessions.fields).
_FILTER_PARAMS = [param.openapi() for param in FILTER_PARAMS] + [
    {"name": "minLsn", "in": "query", "schema": {"type": "string"}, "description": "Read-your-writes LSN."}
]


def _body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
    }


def _responses(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    for status in (400, 401, 403, *errors):
        responses[str(status)] = {"description": "Error", "content": {"application/json": {"schema": _ERROR}}}
    return responses


def _ok(status: int, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {str(status): {"description": description, "content": {"application/json": {"schema": schema}}}}


_CHANNEL_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {"type": "integer"},
        "bytes": {"type": "integer"},
        "tailOffset": {"type": "string"},
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
        "status": {"type": "string", "enum": ["ACTIVE", "CLOSED", "EXPIRED"]},
        "closedAt": {"type": ["string", "null"], "format": "date-time"},
        "closedReason": {"type": ["string", "null"]},
        "expiresAt": {"type": ["string", "null"], "format": "date-time"},
        "createdAt": {"type": "string", "format": "date-time"},
        "updatedAt": {"type": "string", "format": "date-time"},
        "lastActiveAt": {"type": "string", "format": "date-time"},
        "channels": {"type": "object", "properties": {"out": _CHANNEL_SCHEMA, "in": _CHANNEL_SCHEMA}},
    },
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        }
    },
}


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [CreateSessionBody, PatchSessionBody, CloseSessionBody, MintTokenBody]
    schemas: dict[str, Any] = {
        m.__name__: m.model_json_schema(ref_template="#/components/schemas/{model}") for m in models
    }
    schemas.update({"Session": _SESSION_SCHEMA, "Error": _ERROR_SCHEMA})
    session_path = "/api/v1/sessions/{session}"
    paths: dict[str, Any] = {
        "/api/v1/sessions": {
            "post": {
                "summary": "Create a session (idempotent on externalId)",
                "requestBody": _body(CreateSessionBody),
                "responses": _responses(
                    {
                        **_ok(201, "Created", _SESSION),
                        **_ok(200, "Existing session with this externalId", _SESSION),
                    },
                    409,
                    413,
                ),
            },
            "get": {
                "summary": "List sessions",
                "parameters": [
                    *_FILTER_PARAMS,
                    {
                        "name": "sort",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["-createdAt", "createdAt", "-lastActiveAt", "lastActiveAt"],
                        },
                    },
                    {
                        "name": "page[size]",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {"name": "page[after]", "in": "query", "schema": {"type": "string"}},
                    {"name": "page[before]", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": _responses(
                    _ok(
                        200,
                        "A page of sessions",
                        {
                            "type": "object",
                            "properties": {
                                "data": {"type": "array", "items": _SESSION},
                                "pagination": {
                                    "type": "object",
                                    "properties": {
                                        "next": {"type": ["string", "null"]},
                                        "previous": {"type": ["string", "null"]},
                                    },
                                },
                            },
                        },
                    ),
                    503,
                ),
            },
        },
        "/api/v1/sessions/count": {
            "get": {
                "summary": "Count sessions matching the list filters",
                "parameters": _FILTER_PARAMS,
                "responses": _responses(
                    _ok(
                        200,
                        "Counts",
                        {
                            "type": "object",
                            "properties": {"count": {"type": "integer"}, "byStatus": {"type": "object"}},
                        },
                    ),
                    503,
                ),
            }
        },
        session_path: {
            "parameters": [_SESSION_PARAM],
            "get": {
                "summary": "Get a session",
                "responses": _responses(_ok(200, "The session", _SESSION), 404),
            },
            "patch": {
                "summary": "Update tags, metadata, externalId or expiresAt",
                "requestBody": _body(PatchSessionBody),
                "responses": _responses(_ok(200, "The updated session", _SESSION), 404, 409, 413),
            },
        },
        f"{session_path}/close": {
            "parameters": [_SESSION_PARAM],
            "post": {
                "summary": "Close a session and both channels (idempotent)",
                "requestBody": _body(CloseSessionBody, required=False),
                "responses": _responses(_ok(200, "The closed session", _SESSION), 404),
            },
        },
        f"{session_path}/tokens": {
            "parameters": [_SESSION_PARAM],
            "post": {
                "summary": "Mint a session-scoped JWT for a browser",
                "requestBody": _body(MintTokenBody, required=False),
                "responses": _responses(
                    _ok(
                        201,
                        "The token",
                        {
                            "type": "object",
                            "properties": {
                                "token": {"type": "string"},
                                "sessionId": {"type": "string"},
                                "scopes": {"type": "array", "items": {"type": "string"}},
                                "expiresAt": {"type": "string", "format": "date-time"},
                            },
                        },
                    ),
                    404,
                ),
            },
        },
        "/healthz": {
            "get": {"summary": "Process is up", "security": [], "responses": {"200": {"description": "OK"}}}
        },
        "/readyz": {
            "get": {
                "summary": "Postgres, S3 and ClickHouse reachable",
                "security": [],
                "responses": {
                    "200": {"description": "Ready"},
                    "503": {"description": "A dependency is unavailable"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "OK"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Threadline",
            "version": __version__,
            "description": "Durable session streams for AI agents and chat apps. Errors are "
            '`{"error": {"code", "message", "details"}}`; every bad input is a 400.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A secret API key (tl_sk_…) or an HS256 JWT signed with the environment's secret.",
                }
            },
        },
        "paths": paths,
    }


_DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Threadline API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="/openapi.json"></redoc>
<noscript>The API document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
<script src="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"></script>
</body></html>"""


async def openapi_json(request: Request) -> Response:
    return JSONResponse(build_openapi())


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_HTML)


routes = [
    Route("/openapi.json", openapi_json, methods=["GET"], name="openapi"),
    Route("/docs", docs, methods=["GET"], name="docs"),
]
