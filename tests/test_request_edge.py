"""The one ASGI layer every request passes (api/middleware.py): the access-log policy, metrics
labelled by the matched route, error bodies and headers on every response, in a real server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ServeProcess, Tenant, assert_error, bearer, eventually
from threadline.embedded.stack import StackEndpoints


def _request_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "request":
                lines.append(record)
    return lines


def _count(metrics: str, method: str, route: str, status: int) -> float:
    pattern = (
        rf'^threadline_http_requests_total\{{method="{method}",route="{re.escape(route)}",'
        rf'status="{status}"\}} (\S+)$'
    )
    found = re.search(pattern, metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_errors_policy_logs_failed_requests_and_metrics_count_all(
    stack: StackEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    server = ServeProcess(stack, log, THREADLINE_ACCESS_LOG="errors", THREADLINE_LOG_FORMAT="json")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            healthz_before = _count(http.get("/metrics").text, "GET", "/healthz", 200)
            for _ in range(3):
                assert http.get("/healthz").status_code == 200
            assert_error(http.get("/nope?token=secret"), 404, "route_not_found")
            assert_error(http.get("/api/v1/sessions"), 401)
            assert_error(
                http.delete("/api/v1/sessions", headers=bearer(tenant.key)), 405, "method_not_allowed"
            )
            lines = eventually(lambda: found if len(found := _request_lines(log)) >= 3 else None)
            assert {(line["path"], line["status"]) for line in lines} == {
                ("/nope", 404),
                ("/api/v1/sessions", 401),
                ("/api/v1/sessions", 405),
            }
            assert all("token" not in json.dumps(line) for line in lines)  # no query strings
            assert {line["route"] for line in lines} == {"unmatched", "/api/v1/sessions"}
            metrics = http.get("/metrics").text
            assert _count(metrics, "GET", "/healthz", 200) == healthz_before + 3
            assert _count(metrics, "GET", "unmatched", 404) == 1
            assert _count(metrics, "GET", "/api/v1/sessions", 401) == 1
    finally:
        server.stop()


def test_every_response_carries_security_headers_and_cors_reaches_errors(
    anon: httpx.Client, client: httpx.Client
) -> None:
    origin = {"Origin": "https://chat.example.com"}
    for response in (
        anon.get("/healthz"),
        anon.get("/nope"),
        anon.get("/api/v1/sessions", headers=origin),
        client.get("/api/v1/sessions/session_00000000000000000000000000", headers=origin),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    unauthorized = anon.get("/api/v1/sessions", headers=origin)
    assert_error(unauthorized, 401)
    # A browser can read why it failed: CORS headers on error bodies too.
    assert unauthorized.headers["access-control-allow-origin"] in ("*", origin["Origin"])
    assert "access-control-allow-origin" not in anon.get("/healthz").headers  # no Origin, no CORS
