"""The OpenAPI document is valid OpenAPI 3.1 and describes every route the app registers, with
error codes taken from the catalogue."""

from __future__ import annotations

import re
from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from threadline.api.app import create_app
from threadline.api.openapi import build_openapi
from threadline.config import Settings
from threadline.errors import api_error_classes

_METHODS = ("get", "put", "post", "patch", "delete", "head", "options")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi()


def _registered() -> list[tuple[str, set[str]]]:
    """(OpenAPI path template, methods) of every route in the app's table (nothing is started)."""
    found = []
    for route in create_app(Settings()).routes:
        assert isinstance(route, Route), f"{route!r}: only plain routes are expected in the table"
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # starlette convertors: {name:path}
        found.append((path, set(route.methods or ())))
    return found


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_registered_route_is_documented_with_each_method(document: dict[str, Any]) -> None:
    missing = []
    for path, methods in _registered():
        item = document["paths"].get(path)
        if item is None:
            missing.append(f"{path} (whole path)")
            continue
        for method in methods:
            # Starlette answers HEAD on every GET route; it is documented where it means more.
            if method == "HEAD" and "GET" in methods and "head" not in item:
                continue
            if method.lower() not in item:
                missing.append(f"{method} {path}")
    assert not missing, f"routes missing from /openapi.json: {missing}"
    assert len(_registered()) >= 17


def test_every_documented_operation_is_a_registered_route(document: dict[str, Any]) -> None:
    registered = {(path, method.lower()) for path, methods in _registered() for method in methods}
    for path, item in document["paths"].items():
        for method in _METHODS:
            if method in item:
                assert (path, method) in registered, f"{method.upper()} {path} is documented but not served"


def test_stream_head_and_protocol_headers_are_documented(document: dict[str, Any]) -> None:
    stream = document["paths"]["/v1/stream/{name}"]
    assert set(stream) >= {"put", "post", "get", "head", "delete"}
    assert {"Stream-Next-Offset", "Stream-Closed", "Stream-TTL", "Stream-Expires-At"} <= set(
        stream["head"]["responses"]["200"]["headers"]
    )
    put_headers = {p["name"] for p in stream["put"]["parameters"] if p["in"] == "header"}
    assert {"Stream-TTL", "Stream-Expires-At", "Stream-Forked-From", "Stream-Fork-Offset"} <= put_headers
    assert "Stream-Fork-Sub-Offset" in put_headers
    post_headers = {p["name"] for p in stream["post"]["parameters"] if p["in"] == "header"}
    assert {"Producer-Id", "Producer-Epoch", "Producer-Seq", "Stream-Seq", "Stream-Closed"} <= post_headers
    get = stream["get"]
    assert {p["name"] for p in get["parameters"] if p["in"] == "query"} >= {"offset", "live", "cursor"}
    assert {"Stream-Cursor", "Stream-Up-To-Date", "ETag"} <= set(get["responses"]["200"]["headers"])
    assert "text/event-stream" in get["responses"]["200"]["content"]
    subscribe = document["paths"]["/realtime/v1/sessions/{session}/{io}"]["get"]
    assert "text/event-stream" in subscribe["responses"]["200"]["content"]
    for name in document["components"]["headers"]:
        assert name.isalnum()


def test_error_responses_carry_catalogue_codes_with_their_status(document: dict[str, Any]) -> None:
    status_of = {cls.code: cls.status_code for cls in api_error_classes() if cls.code != "http_error"}
    seen = 0
    for path, item in document["paths"].items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            if operation.get("security") != []:
                # Every authenticated operation documents 401 and 403.
                assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}"
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                codes = schema.get("properties", {}).get("error", {}).get("properties", {}).get("code", {})
                for code in codes.get("enum", []):
                    assert status_of.get(code) == int(status), f"{method} {path}: {code} under {status}"
                    seen += 1
    assert seen > 50


def test_request_bodies_come_from_the_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    create = schemas["CreateSessionBody"]
    assert create["additionalProperties"] is False
    assert {"type", "externalId", "taskIdentifier", "tags", "metadata", "expiresAt"} <= set(
        create["properties"]
    )
    assert set(schemas["TrimBody"]["properties"]) == {"stream", "before"}
    list_params = {p["name"] for p in document["paths"]["/api/v1/sessions"]["get"]["parameters"]}
    assert {
        "filter[type]",
        "filter[tags]",
        "filter[status]",
        "filter[createdAt][period]",
        "page[after]",
    } <= list_params
