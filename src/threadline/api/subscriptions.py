"""Durable Streams subscriptions (protocol §6-7) under the reserved ``/v1/stream/__ds/`` prefix.

    PUT     /v1/stream/__ds/subscriptions/{id}                 create or re-confirm
    GET     /v1/stream/__ds/subscriptions/{id}                 configuration, streams and cursors
    DELETE  /v1/stream/__ds/subscriptions/{id}                 tombstone
    POST    /v1/stream/__ds/subscriptions/{id}/streams         add explicit streams
    DELETE  /v1/stream/__ds/subscriptions/{id}/streams/{path}  remove an explicit stream
    POST    /v1/stream/__ds/subscriptions/{id}/claim           pull-wake: take the lease
    POST    /v1/stream/__ds/subscriptions/{id}/ack             ack offsets / heartbeat (claim token)
    POST    /v1/stream/__ds/subscriptions/{id}/release         give the lease back (claim token)
    POST    /v1/stream/__ds/subscriptions/{id}/callback        webhook's async ack (callback token)
    GET     /v1/stream/__ds/jwks.json                          webhook signing public keys

Configuration and claims need an API key or token (``write:subscriptions`` /
``read:subscriptions``); ack, release and callback are authorized by the wake's own token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.bodies import read_model
from threadline.api.params import STREAM_PREFIX
from threadline.api.state import app_state
from threadline.auth.principal import Principal
from threadline.errors import Unauthorized
from threadline.streams.names import validate_name
from threadline.subscriptions.models import (
    AckBody,
    ClaimBody,
    MembershipBody,
    ReleaseBody,
    SubscriptionSpec,
    SubscriptionView,
    validate_subscription_id,
)

__all__ = ["routes"]

DS_PREFIX = STREAM_PREFIX + "__ds"
SUBSCRIPTION_PATH = DS_PREFIX + "/subscriptions/{id}"
JWKS_PATH = DS_PREFIX + "/jwks.json"


def _base_url(request: Request) -> str:
    public_url = app_state(request).settings.public_url
    return (public_url or str(request.base_url)).rstrip("/")


async def _principal(request: Request) -> Principal:
    return await app_state(request).authenticator.authenticate(request)


def _id(request: Request) -> str:
    return validate_subscription_id(request.path_params["id"])


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("send the wake's token as 'Authorization: Bearer <token>'")
    return value.strip()


async def _render(request: Request, view: SubscriptionView) -> dict[str, Any]:
    webhook: dict[str, Any] | None = None
    if view.webhook_url is not None:
        keys = await app_state(request).subscriptions.signing_keys()
        webhook = {
            "url": view.webhook_url,
            "signing": {"alg": "ed25519", "kid": keys[-1].kid, "jwks_url": f"{view.base_url}{JWKS_PATH}"},
        }
    body: dict[str, Any] = {
        "id": view.id,
        "subscription_id": view.id,
        "type": view.kind,
        "pattern": view.pattern,
        "streams": [cursor.summary() for cursor in view.streams],
        "webhook": webhook,
        "wake_stream": view.wake_stream,
        "lease_ttl_ms": view.lease_ttl_ms,
        "created_at": view.created_at.isoformat().replace("+00:00", "Z"),
        "status": "failed" if view.failed else "active",
        "description": view.description,
    }
    if view.session_type is not None:
        body["session_type"] = view.session_type
    return body


async def put_subscription(request: Request) -> Response:
    principal = await _principal(request)
    subscription_id = _id(request)
    spec = await read_model(request, SubscriptionSpec)
    view, created = await app_state(request).subscriptions.put(
        principal, subscription_id, spec, _base_url(request)
    )
    return JSONResponse(await _render(request, view), status_code=201 if created else 200)


async def get_subscription(request: Request) -> Response:
    principal = await _principal(request)
    view = await app_state(request).subscriptions.get(principal, _id(request))
    return JSONResponse(await _render(request, view))


async def delete_subscription(request: Request) -> Response:
    principal = await _principal(request)
    await app_state(request).subscriptions.delete(principal, _id(request))
    return Response(status_code=204)


async def add_streams(request: Request) -> Response:
    principal = await _principal(request)
    subscription_id = _id(request)
    body = await read_model(request, MembershipBody)
    await app_state(request).subscriptions.add_streams(principal, subscription_id, body.streams)
    return Response(status_code=204)


async def remove_stream(request: Request) -> Response:
    principal = await _principal(request)
    subscription_id = _id(request)
    path = validate_name(unquote(request.path_params["path"]))
    await app_state(request).subscriptions.remove_stream(principal, subscription_id, path)
    return Response(status_code=204)


async def claim(request: Request) -> Response:
    principal = await _principal(request)
    subscription_id = _id(request)
    body = await read_model(request, ClaimBody, allow_empty=True)
    wake = await app_state(request).subscriptions.claim(principal, subscription_id, body.worker)
    return JSONResponse(
        {
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "token": wake.token,
            "streams": [cursor.wake_entry() for cursor in wake.streams],
            "lease_ttl_ms": wake.lease_ttl_ms,
        }
    )


async def ack(request: Request) -> Response:
    """A pull-wake ack, or a webhook's callback: the same acks under the wake's token (§7.1-7.2)."""
    subscription_id = _id(request)
    token = _bearer(request)
    body = await read_model(request, AckBody)
    next_wake = await app_state(request).subscriptions.ack(subscription_id, token, body)
    return JSONResponse({"ok": True, "next_wake": next_wake})


async def release(request: Request) -> Response:
    subscription_id = _id(request)
    token = _bearer(request)
    parsed = await read_model(request, ReleaseBody)
    body = AckBody(wake_id=parsed.wake_id, generation=parsed.generation)
    await app_state(request).subscriptions.release(subscription_id, token, body)
    return Response(status_code=204)


async def jwks(request: Request) -> Response:
    """Public on purpose: webhook receivers verify signatures with these keys (§6.5)."""
    keys = await app_state(request).subscriptions.jwks()
    return JSONResponse(
        keys, media_type="application/jwk-set+json", headers={"Cache-Control": "public, max-age=300"}
    )


routes = [
    Route(JWKS_PATH, jwks, methods=["GET"], name="ds_jwks"),
    Route(
        SUBSCRIPTION_PATH,
        put_subscription,
        methods=["PUT"],
        name="ds_subscription_put",
    ),
    Route(SUBSCRIPTION_PATH, get_subscription, methods=["GET"], name="ds_subscription_get"),
    Route(SUBSCRIPTION_PATH, delete_subscription, methods=["DELETE"], name="ds_subscription_delete"),
    Route(SUBSCRIPTION_PATH + "/streams", add_streams, methods=["POST"], name="ds_subscription_streams_add"),
    Route(
        SUBSCRIPTION_PATH + "/streams/{path:path}",
        remove_stream,
        methods=["DELETE"],
        name="ds_subscription_streams_remove",
    ),
    Route(SUBSCRIPTION_PATH + "/claim", claim, methods=["POST"], name="ds_subscription_claim"),
    Route(SUBSCRIPTION_PATH + "/ack", ack, methods=["POST"], name="ds_subscription_ack"),
    Route(SUBSCRIPTION_PATH + "/release", release, methods=["POST"], name="ds_subscription_release"),
    Route(SUBSCRIPTION_PATH + "/callback", ack, methods=["POST"], name="ds_subscription_callback"),
]
