"""Threadline as production runs it: three ``threadline serve`` processes behind HAProxy.

Everything is real: a private embedded stack, three OS processes, Debian's haproxy with the
committed ``deploy/haproxy/haproxy.cfg``, the SDK as the client. Instances are crashed with
SIGKILL and restarted with SIGTERM; clients only ever talk to the balancer.

The checks are about correctness, never time: every subscriber sees every record exactly once
and in order, and every stream holds exactly what its producer sent, once.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Tenant, bearer, clickhouse_rows, eventually, make_tenant, run, settings_for
from tests.test_dev_command import DevProcess, wait_no_processes
from threadline.client import AsyncThreadline
from threadline.client._errors import error_from_response
from threadline.embedded.cluster import HAPROXY_INSTALL_HINT, LocalCluster, find_haproxy
from threadline.embedded.processes import StackError
from threadline.errors import OutcomeUnknown

pytestmark = pytest.mark.slow

SUBSCRIBERS_PER_SESSION = 4
SESSIONS = 5  # one idempotent producer each: 5 producers, 20 subscribers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    try:
        find_haproxy()
    except StackError:
        pytest.fail(f"tests/test_cluster.py needs HAProxy as its load balancer: {HAPROXY_INSTALL_HINT}")
    data_dir: Path = tmp_path_factory.mktemp("cluster")
    env = {
        "THREADLINE_REPLICATION_POLL_INTERVAL_SECONDS": "0.05",
        # A stream whose client left is noticed at the next heartbeat: keep leftovers short-lived.
        "THREADLINE_SSE_HEARTBEAT_SECONDS": "1",
    }
    with LocalCluster(data_dir, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_tenant(cluster: LocalCluster) -> Tenant:
    return make_tenant(settings_for(cluster.endpoints), "cluster")


@pytest.fixture
def all_up(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The test may crash or stop instances; the next one starts with all three routed again."""
    yield cluster
    for instance in cluster.instances:
        if not instance.running:
            cluster.start_instance(instance.name)


def _sse_values(lines: Iterator[str], count: int) -> list[object]:
    values: list[object] = []
    for line in lines:
        if line.startswith("data:"):
            values.append(json.loads(line.removeprefix("data:")))
            if len(values) == count:
                break
    return values


def test_delivery_crosses_instances(cluster: LocalCluster, cluster_tenant: Tenant) -> None:
    """A live SSE reader on one instance gets records appended through another."""
    headers = bearer(cluster_tenant.key)
    with (
        httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as writer,
        httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as reader,
    ):
        session = writer.post("/api/v1/sessions", json={"type": "cluster"}).json()["id"]
        path = f"/realtime/v1/sessions/{session}/out"
        with reader.stream(
            "GET", path, params={"offset": "-1"}, headers={"Accept": "text/event-stream"}
        ) as sse:
            assert sse.status_code == 200
            reader_instance = sse.headers["x-threadline-instance"]
            written_by: list[str] = []
            for n in range(12):
                answer = writer.post(f"{path}/append", json={"n": n})
                assert answer.status_code == 200, answer.text
                written_by.append(answer.headers["x-threadline-instance"])
            # leastconn: the reader's open stream sends the appends to the other instances
            assert set(written_by) - {reader_instance}, (reader_instance, written_by)
            assert _sse_values(sse.iter_lines(), 12) == [{"n": n} for n in range(12)]


@dataclass
class Workload:
    """Five producers (SDK writers, idempotent) and four SDK subscribers per session."""

    cluster: LocalCluster
    key: str
    sent: dict[str, int] = field(default_factory=dict)  # records each producer had acknowledged
    received: dict[str, list[list[int]]] = field(default_factory=dict)
    stored: dict[str, list[int]] = field(default_factory=dict)

    async def run(self, disrupt: Callable[[], Awaitable[None]]) -> None:
        async with AsyncThreadline(self.cluster.url, self.key, reconnect_timeout=180) as tl:
            sessions = [(await tl.sessions.create("cluster-load")).id for _ in range(SESSIONS)]
            stop = asyncio.Event()
            subscribers = [
                asyncio.create_task(self._subscribe(tl, session, index))
                for session in sessions
                for index in range(SUBSCRIBERS_PER_SESSION)
            ]
            producers = [asyncio.create_task(self._produce(tl, session, stop)) for session in sessions]
            await self._until(lambda: all(self.sent.get(s, 0) >= 20 for s in sessions), producers)
            before = dict(self.sent)
            await disrupt()
            # Keep writing after the disruption: appends and streams must flow again, not just finish.
            await self._until(lambda: all(self.sent[s] >= before[s] + 20 for s in sessions), producers)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*producers), 180)
            await asyncio.wait_for(asyncio.gather(*subscribers), 180)
            for session in sessions:
                records = tl.channel(session, "out").subscribe("-1", follow=False)
                self.stored[session] = [record.value["n"] async for record in records]

    async def _until(self, condition: Callable[[], bool], producers: list[asyncio.Task[None]]) -> None:
        async with asyncio.timeout(180):
            while not condition():
                for task in producers:
                    if task.done():
                        task.result()  # a producer that failed fails the test with its error
                await asyncio.sleep(0.05)

    async def _produce(self, tl: AsyncThreadline, session: str, stop: asyncio.Event) -> None:
        n = 0
        async with tl.channel(session, "out").writer(linger_ms=5) as writer:
            while not stop.is_set():
                await writer.append({"n": n})
                n += 1
                if n % 5 == 0:
                    await writer.flush()
                    self.sent[session] = n
                await asyncio.sleep(0.02)
            await writer.append({"n": n, "last": True})
        self.sent[session] = n + 1

    async def _subscribe(self, tl: AsyncThreadline, session: str, index: int) -> None:
        seen = self.received.setdefault(session, [[] for _ in range(SUBSCRIBERS_PER_SESSION)])[index]
        async for record in tl.channel(session, "out").subscribe("-1"):
            seen.append(record.value["n"])
            if record.value.get("last"):
                return

    def check(self) -> None:
        """Exactly once, in order, for every subscriber and in storage."""
        assert len(self.stored) == SESSIONS
        for session, total in self.sent.items():
            expected = list(range(total))
            assert self.stored[session] == expected, f"stored records of {session}"
            for seen in self.received[session]:
                assert seen == expected, f"a subscriber of {session}"


def _busiest(cluster: LocalCluster) -> tuple[str, int]:
    stats = cluster.server_stats()
    name = max(stats, key=lambda n: int(stats[n]["scur"] or 0))
    return name, int(stats[name]["scur"] or 0)


def test_kill_9_under_load_loses_and_duplicates_nothing(
    all_up: LocalCluster, cluster_tenant: Tenant, tmp_path: Path
) -> None:
    cluster = all_up
    workload = Workload(cluster, cluster_tenant.key)
    victims: list[tuple[str, int]] = []

    async def crash_busiest() -> None:
        victim, open_connections = await asyncio.to_thread(_busiest, cluster)
        victims.append((victim, open_connections))
        await asyncio.to_thread(cluster.kill, victim)

    run(workload.run(crash_busiest))
    [(victim, open_connections)] = victims
    print(f"killed {victim} holding {open_connections} connections; sent {workload.sent}")
    assert open_connections > 0, "the crashed instance held no stream: nothing was tested"
    assert not cluster.instance(victim).running
    workload.check()


def test_rolling_restart_loses_nothing(all_up: LocalCluster, cluster_tenant: Tenant) -> None:
    cluster = all_up
    workload = Workload(cluster, cluster_tenant.key)
    pids_before = {i.name: i.process.pid for i in cluster.instances}

    async def restart_each() -> None:
        for instance in cluster.instances:
            await asyncio.to_thread(cluster.stop_instance, instance.name)
            await asyncio.to_thread(cluster.start_instance, instance.name)

    run(workload.run(restart_each))
    assert all(pids_before[i.name] != i.process.pid for i in cluster.instances)
    workload.check()


def test_an_instance_dying_mid_request_answers_a_retryable_503(
    all_up: LocalCluster, cluster_tenant: Tenant
) -> None:
    """The balancer's answer for a request an instance took and never answered: 503
    ``outcome_unknown`` with Retry-After, which an idempotent client retries and a plain append
    does not (HAProxy itself would say 502, which clients do not retry)."""
    cluster = all_up
    name = f"cluster-long-poll-{uuid.uuid4().hex}"
    with httpx.Client(base_url=cluster.url, headers=bearer(cluster_tenant.key), timeout=60) as client:
        created = client.put(f"/v1/stream/{name}", headers={"Content-Type": "application/json"})
        assert created.status_code == 201, created.text
    answers: list[httpx.Response] = []
    # Idle first, so the one busy instance is the one holding the long-poll (streams of earlier
    # tests linger in HAProxy until the server's next heartbeat finds their client gone).
    eventually(lambda: all(row["scur"] in ("", "0") for row in cluster.server_stats().values()), timeout=60)

    def long_poll() -> None:
        with httpx.Client(base_url=cluster.url, headers=bearer(cluster_tenant.key), timeout=60) as client:
            answers.append(client.get(f"/v1/stream/{name}", params={"offset": "-1", "live": "long-poll"}))

    poller = threading.Thread(target=long_poll)
    poller.start()

    def holder() -> str | None:
        busy = [n for n, row in cluster.server_stats().items() if int(row["scur"] or 0) > 0]
        return busy[0] if len(busy) == 1 else None

    cluster.kill(eventually(holder, timeout=30))
    poller.join(60)
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "outcome_unknown"
    assert isinstance(error_from_response(503, answer.headers, answer.content), OutcomeUnknown)


def test_replication_leader_moves_on_a_crash(all_up: LocalCluster, cluster_tenant: Tenant) -> None:
    cluster = all_up

    def single_leader() -> str | None:
        leaders = cluster.leaders()
        return leaders[0] if len(leaders) == 1 else None

    leader = eventually(single_leader, timeout=60)
    cluster.kill(leader)
    successor = eventually(single_leader, timeout=60)
    assert successor != leader
    # The new leader mirrors what is written after the crash.
    with httpx.Client(base_url=cluster.url, headers=bearer(cluster_tenant.key), timeout=30) as client:
        created = client.post("/api/v1/sessions", json={"type": "after-crash"})
    assert created.status_code == 201, created.text
    session = created.json()["id"]

    def mirrored() -> bool:
        rows = clickhouse_rows(
            cluster.endpoints,
            "SELECT count() FROM sessions_v1 FINAL WHERE session_id = {s:String}",
            s=session,
        )
        return rows == [(1,)]

    eventually(mirrored, timeout=60)


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_dev_instances_serves_through_haproxy_and_stops_cleanly(tmp_path: Path) -> None:
    """``threadline dev --instances 2`` as a user runs it: banner, requests through the balancer
    reach both instances, SIGTERM stops the balancer, the instances and the stack."""
    data_dir = tmp_path / "dev-cluster"
    dev = DevProcess(data_dir, "--instances", "2", "--port", "0")
    try:
        banner = dev.wait_banner()
        api = re.search(r"API\s+(http://\S+)", banner)
        key = re.search(r"API key\s+(\S+)", banner)
        instances = re.findall(r"^\s+tl\d\s+(http://\S+)", banner, re.MULTILINE)
        assert api, banner
        assert key, banner
        assert len(instances) == 2, banner
        served_by = set()
        with httpx.Client(base_url=api.group(1), headers=bearer(key.group(1)), timeout=30) as client:
            for _ in range(6):
                created = client.post("/api/v1/sessions", json={"type": "dev-cluster"})
                assert created.status_code == 201, created.text
                served_by.add(created.headers["x-threadline-instance"])
        assert served_by == {"tl1", "tl2"}
        dev.proc.send_signal(signal.SIGTERM)
        assert dev.proc.wait(90) == 0, "".join(dev.stderr[-30:])
    finally:
        if dev.proc.poll() is None:
            dev.proc.kill()
            dev.proc.wait(30)
    for url in [api.group(1), *instances]:
        assert _refused(url), f"{url} still answers after dev stopped"
    wait_no_processes(data_dir)
