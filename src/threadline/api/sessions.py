"""Sessions REST API (SPEC §3): create, get, patch, close, fork, list, count, mint tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.bodies import read_model
from threadline.api.state import app_state
from threadline.auth.keys import signing_secret
from threadline.auth.principal import Action, Principal
from threadline.auth.tokens import mint_token
from threadline.errors import ValidationFailed
from threadline.sessions import repository
from threadline.sessions.access import authorized_session, require_scope
from threadline.sessions.listing import parse_count_query, parse_list_query
from threadline.sessions.models import (
    CloseSessionBody,
    CreateSessionBody,
    ForkSessionBody,
    MintTokenBody,
    PatchSessionBody,
)

__all__ = ["routes"]

LSN_HEADER = "Threadline-Lsn"
LIST_SOURCE_HEADER = "Threadline-List-Source"


async def _principal(request: Request, action: Action, *, environment_wide: bool = False) -> Principal:
    principal = await app_state(request).authenticator.authenticate(request)
    require_scope(principal, action, environment_wide=environment_wide)
    return principal


def _json(data: Any, status_code: int = 200, lsn: str | None = None) -> JSONResponse:
    headers = {LSN_HEADER: lsn} if lsn else None
    return JSONResponse(data, status_code=status_code, headers=headers)


async def create_session(request: Request) -> Response:
    principal = await _principal(request, Action.WRITE, environment_wide=True)
    body = await read_model(request, CreateSessionBody)
    async with app_state(request).pool.acquire() as conn:
        session, created = await repository.create_session(conn, principal.environment, body)
        lsn = await repository.current_lsn(conn)
    return _json(session.to_json(), 201 if created else 200, lsn)


async def get_session(request: Request) -> Response:
    principal = await _principal(request, Action.READ)
    async with app_state(request).pool.acquire() as conn:
        session = await authorized_session(conn, principal, Action.READ, request.path_params["session"])
    return _json(session.to_json())


_PATCH_COLUMNS = {
    "tags": "tags",
    "metadata": "metadata",
    "externalId": "external_id",
    "expiresAt": "expires_at",
}


async def patch_session(request: Request) -> Response:
    principal = await _principal(request, Action.WRITE)
    body = await read_model(request, PatchSessionBody)
    if not body.model_fields_set:
        raise ValidationFailed(f"nothing to update: send at least one of {', '.join(_PATCH_COLUMNS)}")
    changes: dict[str, Any] = {}
    for field in body.model_fields_set:
        value = getattr(body, field)
        if value is None and field in ("tags", "metadata"):
            raise ValidationFailed(f"{field} cannot be null; send [] or {{}} to clear it")
        changes[_PATCH_COLUMNS[field]] = value
    ref = request.path_params["session"]
    async with app_state(request).pool.acquire() as conn:
        await authorized_session(conn, principal, Action.WRITE, ref)
        session = await repository.patch_session(conn, principal.environment.id, ref, changes)
        lsn = await repository.current_lsn(conn)
    return _json(session.to_json(), lsn=lsn)


async def close_session(request: Request) -> Response:
    principal = await _principal(request, Action.WRITE)
    body = await read_model(request, CloseSessionBody, allow_empty=True)
    ref = request.path_params["session"]
    async with app_state(request).pool.acquire() as conn:
        session = await authorized_session(conn, principal, Action.WRITE, ref)
        session, _ = await repository.close_session(conn, session.id, body.reason or None)
        lsn = await repository.current_lsn(conn)
    return _json(session.to_json(), lsn=lsn)


async def fork_session(request: Request) -> Response:
    # A fork creates a session, so it needs what create needs (environment-wide write), which also
    # makes the new session usable by the caller; write on the parent follows from it.
    principal = await _principal(request, Action.WRITE, environment_wide=True)
    body = await read_model(request, ForkSessionBody, allow_empty=True)
    async with app_state(request).pool.acquire() as conn:
        parent = await authorized_session(conn, principal, Action.WRITE, request.path_params["session"])
        session, created = await repository.fork_session(conn, principal.environment, parent, body)
        lsn = await repository.current_lsn(conn)
    return _json(session.to_json(), 201 if created else 200, lsn)


def _multi_params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    return params


async def list_sessions(request: Request) -> Response:
    principal = await _principal(request, Action.READ, environment_wide=True)
    query = parse_list_query(_multi_params(request))
    page, source = await app_state(request).lists.list(principal.environment.id, query)
    return JSONResponse(
        {
            "data": [session.to_json() for session in page.sessions],
            "pagination": {"next": page.next, "previous": page.previous},
        },
        headers={LIST_SOURCE_HEADER: source},
    )


async def count_sessions(request: Request) -> Response:
    principal = await _principal(request, Action.READ, environment_wide=True)
    query = parse_count_query(_multi_params(request))
    counts, source = await app_state(request).lists.count(principal.environment.id, query)
    return JSONResponse(counts, headers={LIST_SOURCE_HEADER: source})


async def mint_session_token(request: Request) -> Response:
    principal = await _principal(request, Action.ADMIN)
    body = await read_model(request, MintTokenBody, allow_empty=True)
    state = app_state(request)
    settings = state.settings
    ttl = body.expiresInSeconds or settings.session_token_default_ttl_seconds
    if ttl > settings.session_token_max_ttl_seconds:
        raise ValidationFailed(f"expiresInSeconds may be at most {settings.session_token_max_ttl_seconds}")
    async with state.pool.acquire() as conn:
        session = await authorized_session(conn, principal, Action.ADMIN, request.path_params["session"])
        secret = await signing_secret(conn, principal.environment.id)
    scopes = sorted({f"{verb}:sessions:{session.id}" for verb in body.scopes})
    token, exp = mint_token(
        secret=secret,
        environment_id=principal.environment.id,
        scopes=scopes,
        ttl_seconds=ttl,
        subject=f"session:{session.id}",
    )
    expires_at = datetime.fromtimestamp(exp, UTC).isoformat().replace("+00:00", "Z")
    return JSONResponse(
        {"token": token, "sessionId": session.id, "scopes": scopes, "expiresAt": expires_at}, status_code=201
    )


routes = [
    Route("/api/v1/sessions", create_session, methods=["POST"], name="sessions:create"),
    Route("/api/v1/sessions", list_sessions, methods=["GET"], name="sessions:list"),
    Route("/api/v1/sessions/count", count_sessions, methods=["GET"], name="sessions:count"),
    Route("/api/v1/sessions/{session}", get_session, methods=["GET"], name="sessions:get"),
    Route("/api/v1/sessions/{session}", patch_session, methods=["PATCH"], name="sessions:patch"),
    Route("/api/v1/sessions/{session}/close", close_session, methods=["POST"], name="sessions:close"),
    Route("/api/v1/sessions/{session}/fork", fork_session, methods=["POST"], name="sessions:fork"),
    Route("/api/v1/sessions/{session}/tokens", mint_session_token, methods=["POST"], name="sessions:tokens"),
]
