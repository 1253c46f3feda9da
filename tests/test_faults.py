"""Dependency failures answer 503 with Retry-After on every route family, never 500.

A stack of its own (stopping its Postgres or S3 must not disturb the other tests), a real server
on it, and real outages: the service processes are stopped, then started again on the same
ports, and the same requests succeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerThread, Tenant, assert_error, bearer, eventually, make_tenant, settings_for
from threadline.config import Settings
from threadline.embedded.stack import EmbeddedStack

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path_factory.mktemp("fault-stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def own_settings(own_stack: EmbeddedStack) -> Settings:
    # Lists from Postgres: this test is about Postgres and S3, and ClickHouse stays up.
    return settings_for(own_stack.endpoints, list_source="postgres", replication_enabled=False)


@pytest.fixture(scope="module")
def server(own_settings: Settings) -> Iterator[str]:
    with ServerThread(own_settings) as url:
        yield url


@pytest.fixture(scope="module")
def own_tenant(own_settings: Settings, server: str) -> Tenant:
    return make_tenant(own_settings, "faults")


def _requests(client: httpx.Client, session_id: str) -> dict[str, httpx.Request]:
    """One request per route family, each needing Postgres."""
    channel = f"/v1/stream/sessions/{session_id}/out"
    return {
        "create session": client.build_request("POST", "/api/v1/sessions", json={"type": "chat"}),
        "get session": client.build_request("GET", f"/api/v1/sessions/{session_id}"),
        "patch session": client.build_request(
            "PATCH", f"/api/v1/sessions/{session_id}", json={"tags": ["x"]}
        ),
        "list sessions": client.build_request("GET", "/api/v1/sessions"),
        "count sessions": client.build_request("GET", "/api/v1/sessions/count"),
        "mint token": client.build_request("POST", f"/api/v1/sessions/{session_id}/tokens"),
        "append (realtime)": client.build_request(
            "POST", f"/realtime/v1/sessions/{session_id}/out/append", content=b'"x"', headers=JSON
        ),
        "describe (realtime)": client.build_request("PUT", f"/realtime/v1/sessions/{session_id}/out"),
        "append (streams)": client.build_request("POST", channel, content=b'"x"', headers=JSON),
        "read (streams)": client.build_request("GET", channel, params={"offset": "-1"}),
        "head (streams)": client.build_request("HEAD", channel),
        "create stream": client.build_request("PUT", "/v1/stream/faults-standalone", headers=JSON),
    }


def test_postgres_down_is_503_with_retry_after_on_every_route_family(
    own_stack: EmbeddedStack, server: str, own_tenant: Tenant
) -> None:
    with httpx.Client(base_url=server, headers=bearer(own_tenant.key), timeout=60) as client:
        session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
        own_stack.stop_service("postgres")
        try:
            for family, request in _requests(client, session["id"]).items():
                response = client.send(request)
                assert response.status_code == 503, (family, response.status_code, response.text)
                assert response.headers.get("retry-after") == "1", family
                if request.method != "HEAD":
                    assert_error(response, 503, "database_unavailable")
            readyz = client.get("/readyz")
            assert readyz.status_code == 503
            assert readyz.json()["checks"]["postgres"]["ok"] is False
        finally:
            own_stack.start_service("postgres")
        # Back up: the same requests succeed (the pool replaces the connections it lost).
        eventually(lambda: client.get(f"/api/v1/sessions/{session['id']}").status_code == 200, timeout=60)
        for family, request in _requests(client, session["id"]).items():
            response = client.send(request)
            assert response.status_code < 400, (family, response.status_code, response.text)


def test_s3_down_is_503_for_appends_and_reads_and_nothing_is_half_written(
    own_stack: EmbeddedStack, server: str, own_tenant: Tenant
) -> None:
    with httpx.Client(base_url=server, headers=bearer(own_tenant.key), timeout=60) as client:
        name = "/v1/stream/faults-s3"
        assert client.put(name, headers={"Content-Type": "text/plain"}).status_code == 201
        assert client.post(name, content=b"before", headers={"Content-Type": "text/plain"}).status_code == 204
        own_stack.stop_service("s3")
        try:
            failed = client.post(name, content=b"during", headers={"Content-Type": "text/plain"})
            assert_error(failed, 503, "storage_unavailable")
            assert failed.headers.get("retry-after") == "1"
        finally:
            own_stack.start_service("s3")
        read = client.get(name, params={"offset": "-1"})
        assert read.status_code == 200, read.text
        assert read.content == b"before"  # the refused append left nothing visible
        assert client.post(name, content=b"after", headers={"Content-Type": "text/plain"}).status_code == 204
        assert client.get(name, params={"offset": "-1"}).content == b"beforeafter"


def test_settings_can_name_the_public_url_used_in_returned_urls(
    own_settings: Settings, tmp_path: Path
) -> None:
    public = "https://threadline.example.com"
    with ServerThread(own_settings.model_copy(update={"public_url": public})) as url:
        tenant = make_tenant(own_settings, "faults-public-url")
        with httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as client:
            session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
            described = client.put(
                f"/realtime/v1/sessions/{session['id']}/out", headers={"Host": "attacker.example"}
            ).json()
    assert described["urls"]["subscribe"] == f"{public}/realtime/v1/sessions/{session['id']}/out"
    assert described["urls"]["stream"] == f"{public}/v1/stream/sessions/{session['id']}/out"
