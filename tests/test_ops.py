"""Operational surface: health, readiness, metrics, OpenAPI, error shape, logs, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import httpx

from tests.conftest import REPO_ROOT, assert_error, eventually
from threadline.config import Settings


def test_healthz_and_readyz(anon: httpx.Client) -> None:
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"postgres", "s3", "clickhouse"}
    assert all(check["ok"] for check in checks.values())
    # The consumer creates its slot shortly after the server starts.
    replication = eventually(lambda: (r := anon.get("/readyz").json()["replication"])["slotExists"] and r)
    assert isinstance(replication["lagBytes"], int)
    assert replication["lagBytes"] >= 0


def test_metrics_count_requests_by_route_template(anon: httpx.Client, client: httpx.Client) -> None:
    client.get("/api/v1/sessions/session_00000000000000000000000000")
    text = anon.get("/metrics").text
    assert (
        'threadline_http_requests_total{method="GET",route="/api/v1/sessions/{session}",status="404"}' in text
    )
    assert "session_0000" not in text  # ids never become label values


def test_openapi_documents_every_session_route(anon: httpx.Client) -> None:
    document = anon.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths["/api/v1/sessions"]) == {"get", "post"}
    assert {"get", "patch"} <= set(paths["/api/v1/sessions/{session}"])
    assert "post" in paths["/api/v1/sessions/{session}/close"]
    assert "post" in paths["/api/v1/sessions/{session}/tokens"]
    assert "get" in paths["/api/v1/sessions/count"]
    create_schema = document["components"]["schemas"]["CreateSessionBody"]
    assert create_schema["additionalProperties"] is False
    assert "type" in create_schema["required"]
    docs = anon.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text


def test_unknown_routes_and_methods_answer_json(anon: httpx.Client, client: httpx.Client) -> None:
    assert_error(anon.get("/nope"), 404, "route_not_found")
    assert_error(client.delete("/api/v1/sessions"), 405, "method_not_allowed")


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "THREADLINE_DATABASE_URL": settings.database_url,
        "THREADLINE_CLICKHOUSE_URL": settings.clickhouse_url,
        "THREADLINE_LOG_FORMAT": "json",
    }
    return subprocess.run(
        [sys.executable, "-m", "threadline", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_migrate_command_is_idempotent(settings: Settings, base_url: str, db: Any) -> None:
    result = _cli(settings, "migrate")
    assert result.returncode == 0, result.stderr
    assert "postgres: 0 migration(s) applied" in result.stdout  # the server already applied them
    assert "clickhouse: schema applied" in result.stdout
    versions = db("fetch", "SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in versions] == sorted(
        int(p.name[:4]) for p in (REPO_ROOT / "pg_migrations").glob("*.sql")
    )
    assert db("fetchval", "SELECT relreplident::text FROM pg_class WHERE relname = 'sessions'") == "f"


def test_keys_create_list_revoke(settings: Settings, anon: httpx.Client) -> None:
    created = _cli(settings, "keys", "create", "--name", "ci", "--env", "cli-test")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert anon.post("/api/v1/sessions", json={"type": "cli"}, headers=headers).status_code == 201
    listed = _cli(settings, "keys", "list")
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    mine = next(e for e in entries if e["id"] == key["id"])
    assert mine["name"] == "ci"
    assert mine["revokedAt"] is None
    assert key["key"] not in listed.stdout  # listings never show secrets
    revoked = _cli(settings, "keys", "revoke", key["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert_error(anon.get("/api/v1/sessions", headers=headers), 401)
    missing = _cli(settings, "keys", "revoke", "key_doesnotexist")
    assert missing.returncode != 0
    assert "no API key" in missing.stderr


def test_cli_explains_an_unreachable_database(settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "threadline", "keys", "list"],
        env={**os.environ, "THREADLINE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "cannot connect to Postgres" in result.stderr
