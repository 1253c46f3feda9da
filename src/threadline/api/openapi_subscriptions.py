"""The subscription routes' part of ``/openapi.json`` (protocol §6-7), kept apart from
:mod:`threadline.api.openapi` so that module stays readable; it reuses its helpers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from threadline.errors import (
    AlreadyClaimed,
    DatabaseUnavailable,
    Fenced,
    InvalidJson,
    InvalidOffset,
    InvalidStreamName,
    OffsetOutOfRange,
    PayloadTooLarge,
    SessionNotFound,
    ShuttingDown,
    StreamNotFound,
    SubscriptionExists,
    SubscriptionNotFound,
    ValidationFailed,
    WebhookUrlRejected,
)
from threadline.subscriptions.models import AckBody, ClaimBody, MembershipBody, ReleaseBody, SubscriptionSpec

__all__ = ["WAKE_TOKEN_SCHEME", "subscription_paths", "subscription_schemas"]

_SCHEMAS = "#/components/schemas/"
_TAG = ["Subscriptions"]
_PREFIX = "/v1/stream/__ds/subscriptions/{id}"
_SERVICE = (DatabaseUnavailable, ShuttingDown)
_BODY = (ValidationFailed, InvalidJson, PayloadTooLarge)

_OFFSET = {"type": "string", "examples": ["0000000000000000_0000000000000042"]}
_CURSOR = {
    "type": "object",
    "required": ["path", "link_type", "acked_offset"],
    "properties": {
        "path": {"type": "string"},
        "link_type": {"type": "string", "enum": ["explicit", "glob"]},
        "acked_offset": {**_OFFSET, "description": "The next read starts here (acks are inclusive)."},
        "tail_offset": _OFFSET,
        "has_pending": {"type": "boolean"},
    },
}
_SUBSCRIPTION = {
    "type": "object",
    "required": ["id", "subscription_id", "type", "streams", "lease_ttl_ms", "created_at", "status"],
    "properties": {
        "id": {"type": "string"},
        "subscription_id": {"type": "string"},
        "type": {"type": "string", "enum": ["webhook", "pull-wake"]},
        "pattern": {"type": ["string", "null"]},
        "session_type": {"type": "string"},
        "streams": {"type": "array", "items": {"$ref": f"{_SCHEMAS}SubscriptionStream"}},
        "webhook": {
            "type": ["object", "null"],
            "properties": {
                "url": {"type": "string"},
                "signing": {
                    "type": "object",
                    "properties": {
                        "alg": {"const": "ed25519"},
                        "kid": {"type": "string"},
                        "jwks_url": {"type": "string"},
                    },
                },
            },
        },
        "wake_stream": {"type": ["string", "null"]},
        "lease_ttl_ms": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "status": {"type": "string", "enum": ["active", "failed"]},
        "description": {"type": ["string", "null"]},
    },
}
_CLAIM = {
    "type": "object",
    "required": ["wake_id", "generation", "token", "streams", "lease_ttl_ms"],
    "properties": {
        "wake_id": {"type": "string"},
        "generation": {"type": "integer"},
        "token": {"type": "string", "description": "Send as `Authorization: Bearer` to ack and release."},
        "streams": {"type": "array", "items": {"$ref": f"{_SCHEMAS}SubscriptionStream"}},
        "lease_ttl_ms": {"type": "integer"},
    },
}
_ACKED = {
    "type": "object",
    "required": ["ok", "next_wake"],
    "properties": {"ok": {"const": True}, "next_wake": {"type": "boolean"}},
}
_JWKS = {
    "type": "object",
    "required": ["keys"],
    "properties": {
        "keys": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "kty": {"const": "OKP"},
                    "crv": {"const": "Ed25519"},
                    "kid": {"type": "string"},
                    "use": {"const": "sig"},
                    "alg": {"const": "EdDSA"},
                    "x": {"type": "string"},
                },
            },
        }
    },
}


def subscription_schemas() -> dict[str, Any]:
    """Request models (nested models hoisted to components) and the answers' shapes."""
    schemas: dict[str, Any] = {}
    models: list[type[BaseModel]] = [SubscriptionSpec, MembershipBody, ClaimBody, AckBody, ReleaseBody]
    for model in models:
        schema = model.model_json_schema(ref_template=f"{_SCHEMAS}{{model}}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas.update(
        {
            "Subscription": _SUBSCRIPTION,
            "SubscriptionStream": _CURSOR,
            "SubscriptionClaim": _CLAIM,
            "Acked": _ACKED,
        }
    )
    return schemas


def subscription_paths() -> dict[str, Any]:
    from threadline.api.openapi import _body, _errors, _json_ok, _links  # its helpers; no cycle at call time

    id_param = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,128}$"},
        "example": "agents",
    }
    subscription = {"$ref": f"{_SCHEMAS}Subscription"}
    links = _links(
        {"id": "$request.path.id"},
        "getSubscription",
        "addSubscriptionStreams",
        "claimSubscription",
        "deleteSubscription",
    )
    wake_token: list[dict[str, list[str]]] = [{"wakeToken": []}]
    no_content = {"description": "Done"}
    # The sub-resources come first: a fuzzer working through operations in document order reaches
    # them while the example subscription exists, before it tries deleting it.
    return {
        _PREFIX + "/streams": {
            "parameters": [id_param],
            "post": {
                "tags": _TAG,
                "operationId": "addSubscriptionStreams",
                "summary": "Link explicit streams, at their current tails (idempotent)",
                "requestBody": _body(MembershipBody, example={"streams": ["chat/room-1"]}),
                "responses": {
                    "204": no_content,
                    **_errors(
                        *_BODY,
                        InvalidStreamName,
                        StreamNotFound,
                        SessionNotFound,
                        SubscriptionNotFound,
                        *_SERVICE,
                    ),
                },
            },
        },
        _PREFIX + "/streams/{path}": {
            "parameters": [
                id_param,
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "description": "The stream path, URL-encoded (it may contain slashes).",
                    "schema": {"type": "string"},
                    "example": "chat/room-1",
                },
            ],
            "delete": {
                "tags": _TAG,
                "operationId": "removeSubscriptionStream",
                "summary": "Remove an explicit link (a matching glob link stays; idempotent)",
                "responses": {
                    "204": no_content,
                    **_errors(ValidationFailed, InvalidStreamName, SubscriptionNotFound, *_SERVICE),
                },
            },
        },
        _PREFIX + "/claim": {
            "parameters": [id_param],
            "post": {
                "tags": _TAG,
                "operationId": "claimSubscription",
                "summary": "Pull-wake: take the lease and get the streams with pending records",
                "description": "Needs `write:subscriptions`. 409 `ALREADY_CLAIMED` names the `current_holder`.",
                "requestBody": _body(ClaimBody, required=False, example={"worker": "worker-1"}),
                "responses": {
                    "200": _json_ok("Claimed", {"$ref": f"{_SCHEMAS}SubscriptionClaim"}),
                    **_errors(*_BODY, SubscriptionNotFound, AlreadyClaimed, *_SERVICE),
                },
            },
        },
        _PREFIX + "/ack": {
            "parameters": [id_param],
            "post": {
                "tags": _TAG,
                "operationId": "ackSubscription",
                "summary": "Ack offsets for the claimed wake; without `done` it is a heartbeat",
                "security": wake_token,
                "requestBody": _body(AckBody),
                "responses": {
                    "200": _json_ok("Applied", {"$ref": f"{_SCHEMAS}Acked"}),
                    **_errors(*_BODY, InvalidOffset, OffsetOutOfRange, Fenced, *_SERVICE),
                },
            },
        },
        _PREFIX + "/release": {
            "parameters": [id_param],
            "post": {
                "tags": _TAG,
                "operationId": "releaseSubscription",
                "summary": "Give the lease back without acking",
                "security": wake_token,
                "requestBody": _body(ReleaseBody),
                "responses": {"204": no_content, **_errors(*_BODY, Fenced, *_SERVICE)},
            },
        },
        _PREFIX + "/callback": {
            "parameters": [id_param],
            "post": {
                "tags": _TAG,
                "operationId": "subscriptionCallback",
                "summary": "Webhook: ack the wake asynchronously with its callback token",
                "security": wake_token,
                "requestBody": _body(AckBody),
                "responses": {
                    "200": _json_ok("Applied", {"$ref": f"{_SCHEMAS}Acked"}),
                    **_errors(*_BODY, InvalidOffset, OffsetOutOfRange, Fenced, *_SERVICE),
                },
            },
        },
        _PREFIX: {
            "parameters": [id_param],
            "put": {
                "tags": _TAG,
                "operationId": "putSubscription",
                "summary": "Create a subscription, or re-confirm one with the same configuration",
                "description": "Over explicit `streams` and/or a glob `pattern` (`*` one segment, `**` any). "
                "A pattern needs environment-wide `read:sessions`; explicit streams need read on each; a "
                "pull-wake `wake_stream` must exist and be writable. `session_type` (Threadline) narrows "
                "a pattern to channels of sessions of that type. Webhook URLs must be allowed by "
                "`THREADLINE_WEBHOOK_ALLOWED_HOSTS`. Needs `write:subscriptions`.",
                "requestBody": _body(
                    SubscriptionSpec,
                    example={
                        "type": "pull-wake",
                        "pattern": "chat/*",
                        "wake_stream": "agents/wake",
                        "lease_ttl_ms": 30000,
                    },
                ),
                "responses": {
                    "200": {**_json_ok("Re-confirmed (same configuration)", subscription), "links": links},
                    "201": {**_json_ok("Created", subscription), "links": links},
                    **_errors(
                        *_BODY,
                        InvalidStreamName,
                        WebhookUrlRejected,
                        StreamNotFound,
                        SessionNotFound,
                        SubscriptionExists,
                        *_SERVICE,
                    ),
                },
            },
            "get": {
                "tags": _TAG,
                "operationId": "getSubscription",
                "summary": "A subscription, its linked streams and their acked offsets",
                "responses": {
                    "200": _json_ok("The subscription", subscription),
                    **_errors(ValidationFailed, SubscriptionNotFound, *_SERVICE),
                },
            },
            "delete": {
                "tags": _TAG,
                "operationId": "deleteSubscription",
                "summary": "Delete (tombstone): in-flight acks and callbacks fail",
                "responses": {
                    "204": no_content,
                    **_errors(ValidationFailed, SubscriptionNotFound, *_SERVICE),
                },
            },
        },
        "/v1/stream/__ds/jwks.json": {
            "get": {
                "tags": _TAG,
                "operationId": "webhookJwks",
                "summary": "The public keys webhook signatures verify with (JWKS)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "JWK Set",
                        "content": {"application/jwk-set+json": {"schema": _JWKS}},
                    },
                    **_errors(*_SERVICE, auth=False),
                },
            }
        },
    }


# Documented with the rest of the auth schemes in build_openapi.
WAKE_TOKEN_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "The wake's token: a claim's `token` or a webhook's `callback_token`.",
}
