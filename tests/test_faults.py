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
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
from tests.faultsuite.harness import stalled
from tests.faultsuite.mirror import mirror_difference
from threadline.api.sessions import LIST_SOURCE_HEADER
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


def _dependency_errors(client: httpx.Client, dependency: str) -> float:
    """``threadline_dependency_errors_total{kind="unavailable"}`` for one dependency, from
    /metrics (which needs no dependency, so it answers during the outage too)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "threadline_dependency_errors_total" and sample.labels == {
                "dependency": dependency,
                "kind": "unavailable",
            }:
                return float(sample.value)
    raise AssertionError("threadline_dependency_errors_total is not on /metrics")


def test_postgres_down_is_503_with_retry_after_on_every_route_family(
    own_stack: EmbeddedStack, server: str, own_tenant: Tenant
) -> None:
    with httpx.Client(base_url=server, headers=bearer(own_tenant.key), timeout=60) as client:
        session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
        errors_before = _dependency_errors(client, "postgres")
        own_stack.stop_service("postgres")
        try:
            for family, request in _requests(client, session["id"]).items():
                response = client.send(request)
                assert response.status_code == 503, (family, response.status_code, response.text)
                assert response.headers.get("retry-after") == "1", family
                if request.method != "HEAD":
                    assert_error(response, 503, "database_unavailable")
            # Each refused request failed to borrow a connection: the dashboard sees Postgres fail.
            assert _dependency_errors(client, "postgres") >= errors_before + len(_requests(client, "x"))
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
        errors_before = _dependency_errors(client, "s3")
        own_stack.stop_service("s3")
        try:
            failed = client.post(name, content=b"during", headers={"Content-Type": "text/plain"})
            assert_error(failed, 503, "storage_unavailable")
            assert failed.headers.get("retry-after") == "1"
            assert _dependency_errors(client, "s3") > errors_before
        finally:
            own_stack.start_service("s3")
        read = client.get(name, params={"offset": "-1"})
        assert read.status_code == 200, read.text
        assert read.content == b"before"  # the refused append left nothing visible
        # Back up: a client that retries each 503 as Retry-After says gets its append in (on a
        # loaded machine the restarted S3 may refuse the first PUTs), and no refused try shows.
        deadline = time.monotonic() + 60
        while (
            after := client.post(name, content=b"after", headers={"Content-Type": "text/plain"})
        ).status_code == 503:
            assert_error(after, 503, "storage_unavailable")
            assert time.monotonic() < deadline, "S3 restarted but appends still answer 503"
            time.sleep(float(after.headers["retry-after"]))
        assert after.status_code == 204, after.text
        assert client.get(name, params={"offset": "-1"}).content == b"beforeafter"


# The stall tests' server answers a stalled dependency within this bound; a request may take a
# little longer (its other work, a second bounded call), never a hang: they allow 3x.
STALL_BOUND_SECONDS = 2.0
READYZ_BOUND_SECONDS = 3.0


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
        with stalled(own_stack, "postgres"):
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
        with stalled(own_stack, "s3"):
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


# --- ClickHouse refused and stalled: lists fall back to Postgres, replication catches up --------


@pytest.fixture(scope="module")
def clickhouse_server(own_settings: Settings) -> Iterator[str]:
    """A server that lists from ClickHouse and runs the replication consumer, with the short
    dependency bound: a stalled ClickHouse must cost a list no more than that bound."""
    settings = own_settings.model_copy(
        update={
            "list_source": "clickhouse",
            "replication_enabled": True,
            "replication_poll_interval_seconds": 0.05,
            "dependency_timeout_seconds": STALL_BOUND_SECONDS,
        }
    )
    with ServerThread(settings) as url:
        yield url


# Each test has an environment of its own: its lists hold exactly the sessions it made.
PAGE = {"page[size]": "100"}


def _list_requests(client: httpx.Client) -> dict[str, httpx.Request]:
    return {
        "list sessions": client.build_request("GET", "/api/v1/sessions", params=PAGE),
        "count sessions": client.build_request("GET", "/api/v1/sessions/count"),
    }


def _mirrored(stack: EmbeddedStack, environment_id: str) -> bool:
    difference = mirror_difference(stack.endpoints, environment_id)
    if difference:
        print("mirror differs:", difference)
    return not difference


def _assert_lists_answer_without_clickhouse(client: httpx.Client, expected: set[str]) -> None:
    """Every list answers within the bound: from Postgres (complete, so it holds what was
    written during the outage) or 503 with Retry-After; never 500, never a hang."""
    for family, request in _list_requests(client).items():
        response, elapsed = _timed(client, request)
        print(f"{family} without ClickHouse: {response.status_code} in {elapsed:.2f} s")
        assert elapsed < 3 * STALL_BOUND_SECONDS, (family, elapsed)
        if response.status_code == 503:
            assert response.headers.get("retry-after"), family
            continue
        assert response.status_code == 200, (family, response.status_code, response.text)
        assert response.headers[LIST_SOURCE_HEADER] == "postgres", family
        if family == "list sessions":
            assert {item["id"] for item in response.json()["data"]} == expected
        else:
            assert response.json()["count"] == len(expected)


def _churn(client: httpx.Client, kind: str, count: int) -> list[str]:
    """Create sessions, retag one and close another: every kind of change replication carries."""
    ids = []
    for _ in range(count):
        created = client.post("/api/v1/sessions", json={"type": kind})
        assert created.status_code == 201, created.text  # writes do not depend on ClickHouse
        ids.append(created.json()["id"])
    assert client.patch(f"/api/v1/sessions/{ids[0]}", json={"tags": ["changed"]}).status_code == 200
    assert client.post(f"/api/v1/sessions/{ids[-1]}/close", json={}).status_code == 200
    return ids


@pytest.mark.parametrize("fault", ["refused", "stalled"])
def test_clickhouse_down_lists_answer_from_postgres_and_replication_catches_up_exactly(
    own_stack: EmbeddedStack, clickhouse_server: str, own_settings: Settings, fault: str
) -> None:
    tenant = make_tenant(own_settings, f"faults-clickhouse-{fault}")
    kind = f"ch-{fault}"
    with httpx.Client(base_url=clickhouse_server, headers=bearer(tenant.key), timeout=60) as client:
        ids = _churn(client, kind, 5)
        eventually(lambda: _mirrored(own_stack, tenant.environment_id), timeout=90, interval=0.5)
        listed = client.get("/api/v1/sessions", params=PAGE)
        assert listed.headers[LIST_SOURCE_HEADER] == "clickhouse", listed.text

        if fault == "refused":
            own_stack.stop_service("clickhouse", kill=True)
            outage: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:
            outage = stalled(own_stack, "clickhouse")
        try:
            with outage:
                ids += _churn(client, kind, 10)
                _assert_lists_answer_without_clickhouse(client, set(ids))
                _assert_lists_answer_without_clickhouse(client, set(ids))  # backed off now
                # Still ready (lists come from Postgres): a balancer keeps the instance.
                readyz = client.get("/readyz")
                assert readyz.status_code == 200, readyz.text
                assert readyz.json()["status"] == "degraded"
                assert readyz.json()["checks"]["clickhouse"]["ok"] is False
        finally:
            if fault == "refused":
                own_stack.start_service("clickhouse")
        # Back: the copy catches up exactly (nothing lost, nothing doubled, the newest version
        # of each changed session), and lists come from ClickHouse again.
        eventually(lambda: _mirrored(own_stack, tenant.environment_id), timeout=120, interval=0.5)

        def listed_from_clickhouse() -> bool:
            response = client.get("/api/v1/sessions", params=PAGE)
            return response.headers.get(LIST_SOURCE_HEADER) == "clickhouse" and {
                item["id"] for item in response.json()["data"]
            } == set(ids)

        eventually(listed_from_clickhouse, timeout=60)
