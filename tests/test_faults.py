"""Dependency failures answer 503 with Retry-After on every route family, never 500.

A stack of its own (stopping its Postgres or S3 must not disturb the other tests), a real server
on it, and real outages: the service processes are stopped, then started again on the same
ports, and the same requests succeed. Stalls too: the service's processes are frozen (SIGSTOP),
so connections are accepted and never answered, and every request must still answer within the
dependency bound rather than hang.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from tests.conftest import (
    ServerThread,
    Tenant,
    assert_error,
    bearer,
    eventually,
    make_tenant,
    run,
    settings_for,
)
from threadline.config import Settings
from threadline.embedded.stack import EmbeddedStack, ServiceName

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
        after = client.post(name, content=b"after", headers={"Content-Type": "text/plain"})
        assert after.status_code == 204, after.text
        assert client.get(name, params={"offset": "-1"}).content == b"beforeafter"


# The stall tests' server answers a stalled dependency within this bound; a request may take a
# little longer (its other work, a second bounded call), never a hang: they allow 3x.
STALL_BOUND_SECONDS = 2.0
READYZ_BOUND_SECONDS = 3.0


@contextlib.contextmanager
def _stalled(stack: EmbeddedStack, name: ServiceName) -> Iterator[None]:
    """Freeze every process of a service (Postgres: the postmaster first, so it forks no more,
    then all its children), and thaw them however the block ends."""
    root = psutil.Process(stack.service_pids()[name])
    frozen = [root]
    try:
        root.suspend()
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.suspend()
                frozen.append(child)
        # Signals are delivered asynchronously: wait until the kernel reports each one stopped.
        eventually(lambda: all(_stopped(proc) for proc in frozen), timeout=5, interval=0.05)
        yield
    finally:
        for proc in reversed(frozen):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()


def _stopped(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:  # an exiting child does not answer either
        return True


def _timed(client: httpx.Client, request: httpx.Request) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.send(request)
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def stall_server(own_settings: Settings) -> Iterator[str]:
    """A server with a short dependency bound and no chunk cache (every read goes to S3). Keys
    stay cached, so a stalled request gets past authentication to its route's own lookups."""
    settings = own_settings.model_copy(
        update={
            "dependency_timeout_seconds": STALL_BOUND_SECONDS,
            "chunk_cache_bytes": 0,
            "auth_cache_seconds": 300.0,
        }
    )
    with ServerThread(settings) as url:
        yield url


def test_stalled_postgres_is_503_within_the_bound_on_every_route_family(
    own_stack: EmbeddedStack, stall_server: str, own_tenant: Tenant
) -> None:
    # A client timeout far above the bound: a hang shows as a slow answer, not a client error.
    with httpx.Client(base_url=stall_server, headers=bearer(own_tenant.key), timeout=60) as client:
        session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
        answers: dict[str, tuple[int, float]] = {}
        with _stalled(own_stack, "postgres"):
            for family, request in _requests(client, session["id"]).items():
                response, elapsed = _timed(client, request)
                answers[family] = (response.status_code, round(elapsed, 2))
                assert response.status_code == 503, (family, response.status_code, response.text)
                assert response.headers.get("retry-after") == "1", family
                if request.method != "HEAD":
                    assert_error(response, 503, "database_unavailable")
                assert elapsed < 3 * STALL_BOUND_SECONDS, (family, elapsed)
            readyz, elapsed = _timed(client, client.build_request("GET", "/readyz"))
            answers["readyz"] = (readyz.status_code, round(elapsed, 2))
            assert readyz.status_code == 503, readyz.text
            checks = readyz.json()["checks"]
            assert checks["postgres"]["ok"] is False
            assert checks["s3"]["ok"] is True
            assert elapsed < READYZ_BOUND_SECONDS, elapsed
        print("answers under a stalled Postgres (status, seconds):", answers)
        # Thawed: the same requests succeed (connections that timed out were closed, not reused).
        eventually(lambda: client.get(f"/api/v1/sessions/{session['id']}").status_code == 200, timeout=60)
        for family, request in _requests(client, session["id"]).items():
            response = client.send(request)
            assert response.status_code < 400, (family, response.status_code, response.text)
        assert client.get("/readyz").status_code == 200


def test_stalled_s3_is_503_within_the_bound_for_appends_and_uncached_reads(
    own_stack: EmbeddedStack, stall_server: str, own_tenant: Tenant
) -> None:
    text = {"Content-Type": "text/plain"}
    with httpx.Client(base_url=stall_server, headers=bearer(own_tenant.key), timeout=60) as client:
        name = "/v1/stream/faults-s3-stall"
        assert client.put(name, headers=text).status_code == 201
        assert client.post(name, content=b"before", headers=text).status_code == 204
        with _stalled(own_stack, "s3"):
            appended, append_elapsed = _timed(
                client, client.build_request("POST", name, content=b"during", headers=text)
            )
            read, read_elapsed = _timed(client, client.build_request("GET", name, params={"offset": "-1"}))
            readyz, readyz_elapsed = _timed(client, client.build_request("GET", "/readyz"))
        print(
            "answers under a stalled S3 (status, seconds):",
            {
                "append": (appended.status_code, round(append_elapsed, 2)),
                "read": (read.status_code, round(read_elapsed, 2)),
                "readyz": (readyz.status_code, round(readyz_elapsed, 2)),
            },
        )
        for response, elapsed in ((appended, append_elapsed), (read, read_elapsed)):
            assert_error(response, 503, "storage_unavailable")
            assert response.headers.get("retry-after") == "1"
            assert elapsed < 3 * STALL_BOUND_SECONDS, elapsed
        assert readyz.status_code == 503, readyz.text
        assert readyz.json()["checks"]["s3"]["ok"] is False
        assert readyz.json()["checks"]["postgres"]["ok"] is True
        assert readyz_elapsed < READYZ_BOUND_SECONDS, readyz_elapsed
        # Thawed: the refused append left nothing visible, and the next one lands.
        eventually(lambda: client.get(name, params={"offset": "-1"}).status_code == 200, timeout=60)
        assert client.get(name, params={"offset": "-1"}).content == b"before"
        assert client.post(name, content=b"after", headers=text).status_code == 204
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


# A deferred constraint trigger runs inside COMMIT: it holds COMMIT for a while (trapping the
# cancel a client timeout sends, as a stalled disk would not answer it either), and can make it
# fail. Installed in this module's own database only.
_COMMIT_FAULTS = """
CREATE TABLE IF NOT EXISTS test_commit_faults (
    stream_id bigint PRIMARY KEY, hold_seconds float8 NOT NULL, fail boolean NOT NULL DEFAULT false);
CREATE OR REPLACE FUNCTION test_commit_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fault record;
    until timestamptz;
BEGIN
    SELECT * INTO fault FROM test_commit_faults WHERE stream_id = NEW.stream_id;
    IF FOUND THEN
        until := clock_timestamp() + fault.hold_seconds * interval '1 second';
        WHILE clock_timestamp() < until LOOP
            BEGIN
                PERFORM pg_sleep(0.05);
            EXCEPTION WHEN query_canceled THEN
                NULL;
            END;
        END LOOP;
        IF fault.fail THEN
            RAISE EXCEPTION 'injected failure at commit';
        END IF;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS test_commit_fault ON stream_chunks;
CREATE CONSTRAINT TRIGGER test_commit_fault AFTER INSERT ON stream_chunks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_commit_fault();
"""


def _with_commit_fault(settings: Settings, name: str, hold_seconds: float, *, fail: bool = False) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(_COMMIT_FAULTS)
            stream_id = await conn.fetchval(
                "SELECT id FROM streams WHERE name = $1 AND deleted_at IS NULL", name
            )
            await conn.execute(
                """INSERT INTO test_commit_faults VALUES ($1, $2, $3)
                   ON CONFLICT (stream_id) DO UPDATE SET hold_seconds = $2, fail = $3""",
                stream_id,
                hold_seconds,
                fail,
            )
        finally:
            await conn.close()

    run(go())


@pytest.mark.parametrize(
    ("hold_seconds", "fail", "outcome_wait", "expected"),
    [
        # COMMIT's reply is late (the client gives up after 1 s), but it commits within the wait:
        # the append is acknowledged, exactly once.
        (3.0, False, 15.0, "acknowledged"),
        # COMMIT fails after the client gave up: Postgres says aborted, so "failed" is the truth.
        (3.0, True, 15.0, "failed"),
        # Still committing when the wait runs out: the answer says unknown, never "failed", and
        # the record does appear once the commit finishes.
        (4.0, False, 1.0, "unknown"),
    ],
)
def test_an_append_whose_commit_reply_is_lost_is_answered_with_its_real_outcome(
    own_settings: Settings, hold_seconds: float, fail: bool, outcome_wait: float, expected: str
) -> None:
    settings = own_settings.model_copy(
        update={"commit_timeout_seconds": 1.0, "commit_outcome_wait_seconds": outcome_wait}
    )
    name = f"faults-commit-{expected}"
    with ServerThread(settings) as url:
        tenant = make_tenant(settings, "faults-commit")
        with httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=60) as client:
            text = {"Content-Type": "text/plain"}
            assert client.put(f"/v1/stream/{name}", headers=text).status_code == 201
            assert client.post(f"/v1/stream/{name}", content=b"first;", headers=text).status_code == 204
            _with_commit_fault(settings, name, hold_seconds, fail=fail)
            answer = client.post(f"/v1/stream/{name}", content=b"second;", headers=text)
            _with_commit_fault(settings, name, 0.0)
            if expected == "acknowledged":
                assert answer.status_code == 204, answer.text
                assert client.get(f"/v1/stream/{name}", params={"offset": "-1"}).content == b"first;second;"
            elif expected == "failed":
                assert_error(answer, 503, "database_unavailable")
                assert client.get(f"/v1/stream/{name}", params={"offset": "-1"}).content == b"first;"
            else:
                error = assert_error(answer, 503, "outcome_unknown")
                assert "may be stored" in error["message"]
                eventually(
                    lambda: (
                        client.get(f"/v1/stream/{name}", params={"offset": "-1"}).content == b"first;second;"
                    ),
                    timeout=30,
                )
            # The committer carries on with a fresh connection.
            assert client.post(f"/v1/stream/{name}", content=b"third;", headers=text).status_code == 204
