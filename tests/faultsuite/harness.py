"""A fault run: the embedded stack, two ``threadline serve`` processes, producers, faults, a checker.

Everything is a real process. Faults are what an operator sees in production: ``kill -9`` of a
server (and of the replication leader), ``SIGSTOP``/``SIGCONT`` of Postgres, SeaweedFS and the
chDB sidecar (connections accepted, never answered), and ``kill -9`` + restart of each on the
same ports. Between faults the producers append at full speed; after the last one the checker
reads every stream back and compares Postgres sessions with their ClickHouse copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import ServeProcess, bearer, make_tenant, settings_for
from tests.faultsuite.checker import Verdict, check_ledger, read_stream
from tests.faultsuite.mirror import mirror_difference
from tests.faultsuite.producers import JSON, Ledger, produce
from threadline.embedded.ports import free_port
from threadline.embedded.stack import EmbeddedStack, ServiceName

__all__ = ["FAULTS", "Options", "Report", "run_faults", "stalled"]

FAULTS = (
    "server-kill",
    "postgres-stall",
    "s3-stall",
    "clickhouse-stall",
    "postgres-kill",
    "s3-kill",
    "clickhouse-kill",
    "leader-kill",
)
# The servers' bounds, shorter than the stalls (FAULT_HOLD, 8 s; the reduced test's 3 s): a stall
# then runs into every timeout — a request's dependency bound, a group commit's statement bound
# and the wait for a lost COMMIT's outcome — rather than being waited out.
SERVER_ENV = {
    "THREADLINE_DEPENDENCY_TIMEOUT_SECONDS": "2",
    "THREADLINE_COMMIT_TIMEOUT_SECONDS": "2",
    "THREADLINE_COMMIT_OUTCOME_WAIT_SECONDS": "1",
}
HEADLINE = ("acked", "http_503", "outcome_unknown", "no_answer", "definite_failure", "retries")


@dataclass
class Options:
    producers: int = 12
    load_seconds: float = 10.0  # full-speed appends before each fault (and after the last)
    hold_seconds: float = 8.0  # how long a stall or an outage lasts
    faults: tuple[str, ...] = FAULTS
    data_dir: Path | None = None  # default: a temporary directory, removed afterwards
    log: Callable[[str], None] = print


@dataclass
class Report:
    verdict: Verdict
    per_fault: dict[str, Counter[str]] = field(default_factory=dict)
    sessions: Counter[str] = field(default_factory=Counter)
    mirror: dict[str, Any] = field(default_factory=dict)  # empty: Postgres and ClickHouse equal
    mirror_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not self.mirror

    def table(self) -> str:
        rows = [f"{'phase':<18}" + "".join(f"{name:>18}" for name in HEADLINE)]
        for phase, counts in self.per_fault.items():
            rows.append(f"{phase:<18}" + "".join(f"{counts[name]:>18}" for name in HEADLINE))
        total = self.verdict.counts
        rows.append(f"{'total':<18}" + "".join(f"{total[name]:>18}" for name in HEADLINE))
        rows.append(
            f"verified: {self.verdict.verified} acknowledged records present exactly once and in order; "
            f"{total['definite_failure']} definitely failed appends absent; "
            f"{total['pending_unknown_at_end']} unknown at the end; "
            f"unexpected duplicates {total['unexpected_duplicate']}, 5xx other than 503 {total['server_error']}"
        )
        rows.append(
            "sessions (create/patch/close during the run): "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.sessions.items()))
        )
        rows.append(
            f"mirror: Postgres and ClickHouse equal after {self.mirror_seconds:.1f} s"
            if not self.mirror
            else f"mirror DIFFERS: {self.mirror}"
        )
        rows.extend(f"PROBLEM: {p}" for p in self.verdict.problems[:50])
        rows.append("VERDICT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(rows)


@contextlib.contextmanager
def stalled(stack: EmbeddedStack, name: ServiceName) -> Iterator[None]:
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
        deadline = time.monotonic() + 10
        while not all(_stopped(proc) for proc in frozen):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not stop")
            time.sleep(0.05)
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


class _Servers:
    """Two ``threadline serve`` processes on fixed ports; a killed one restarts on its port."""

    def __init__(self, stack: EmbeddedStack, logs: Path) -> None:
        self._stack = stack
        self._logs = logs
        self._starts = 0
        self.ports = [free_port(), free_port()]
        while self.ports[1] == self.ports[0]:
            self.ports[1] = free_port()
        self.procs = [self._start(port) for port in self.ports]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def _start(self, port: int) -> ServeProcess:
        self._starts += 1
        log = self._logs / f"serve-{port}-{self._starts}.log"
        return ServeProcess(self._stack.endpoints, log, port=port, **SERVER_ENV)

    def kill_and_restart(self, index: int, hold: float) -> None:
        self.procs[index].kill()
        time.sleep(hold)
        self.procs[index] = self._start(self.ports[index])

    def is_leader(self, index: int) -> bool:
        try:
            return self.procs[index].is_leader()
        except httpx.HTTPError:  # busy or restarting: not known to lead
            return False

    def leader(self) -> int | None:
        return next((index for index in range(len(self.procs)) if self.is_leader(index)), None)

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stop()


def _inject(
    fault: str, stack: EmbeddedStack, servers: _Servers, hold: float, log: Callable[[str], None]
) -> None:
    """Apply one fault and undo it (blocking; runs in a thread while the producers append)."""
    if fault == "server-kill":
        servers.kill_and_restart(random.randrange(2), hold)
    elif fault == "leader-kill":
        deadline = time.monotonic() + 60
        while (leader := servers.leader()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no replication leader among the servers")
            time.sleep(0.2)
        log(f"  leader is server {leader} (port {servers.ports[leader]}); killing it")
        killed = time.monotonic()
        other = 1 - leader
        servers.procs[leader].kill()
        while not servers.is_leader(other):
            if time.monotonic() > killed + 60:
                raise RuntimeError("the standby did not take over within 60 s")
            time.sleep(0.05)
        log(f"  standby took over in {time.monotonic() - killed:.2f} s")
        time.sleep(max(0.0, hold - (time.monotonic() - killed)))
        servers.procs[leader] = servers._start(servers.ports[leader])
    else:
        service, _, kind = fault.rpartition("-")
        name: ServiceName = {"postgres": "postgres", "s3": "s3", "clickhouse": "clickhouse"}[service]  # type: ignore[assignment]
        if kind == "stall":
            with stalled(stack, name):
                time.sleep(hold)
        else:
            stack.stop_service(name, kill=True)
            time.sleep(hold)
            stack.start_service(name)


async def _churn_sessions(
    client: httpx.AsyncClient, urls: list[str], counts: Counter[str], stop: asyncio.Event
) -> None:
    """Create, retag and close sessions through the faults: the changes replication must carry."""
    rng = random.Random(7)
    open_ids: list[str] = []
    while not stop.is_set():
        url = rng.choice(urls)
        roll = rng.random()
        try:
            if roll < 0.5 or not open_ids:
                response = await client.post(
                    f"{url}/api/v1/sessions", json={"type": "churn", "tags": ["new"]}
                )
                kind = "create"
                if response.status_code == 201:
                    open_ids.append(response.json()["id"])
            elif roll < 0.8:
                target = rng.choice(open_ids)
                response = await client.patch(
                    f"{url}/api/v1/sessions/{target}", json={"tags": [f"t{rng.randrange(9)}"]}
                )
                kind = "patch"
            else:
                target = open_ids.pop(rng.randrange(len(open_ids)))
                response = await client.post(f"{url}/api/v1/sessions/{target}/close", json={})
                kind = "close"
            counts[f"{kind} {response.status_code}"] += 1
        except httpx.TransportError:
            counts["no answer"] += 1
        await asyncio.sleep(0.05)


async def _drive(
    options: Options, stack: EmbeddedStack, servers: _Servers, key: str, report: Report
) -> list[Ledger]:
    run_id = uuid.uuid4().hex[:8]
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=4 * options.producers + 8)
    async with httpx.AsyncClient(headers=bearer(key), timeout=30, limits=limits) as client:
        ledgers = []
        for index in range(options.producers):
            base = servers.urls[0]
            if index % 2:  # half on session channels, half on plain streams
                session = (await client.post(f"{base}/api/v1/sessions", json={"type": "producer"})).json()
                path = f"/v1/stream/sessions/{session['id']}/out"
            else:
                path = f"/v1/stream/faults-{run_id}-{index}"
                created = await client.put(base + path, headers={"Content-Type": JSON})
                created.raise_for_status()
            ledgers.append(Ledger(name=f"p{index:02d}", path=path))
        tasks = [
            asyncio.create_task(produce(client, servers.urls, ledger, f"faults-{run_id}-{ledger.name}", stop))
            for ledger in ledgers
        ]
        churn = asyncio.create_task(_churn_sessions(client, servers.urls, report.sessions, stop))

        def totals() -> Counter[str]:
            total: Counter[str] = Counter()
            for ledger in ledgers:
                total.update(ledger.counts)
            return total

        phase_start = totals()
        for fault in options.faults:
            await asyncio.sleep(options.load_seconds)
            options.log(f"fault {fault}: hold {options.hold_seconds:g} s")
            started = time.monotonic()
            await asyncio.to_thread(_inject, fault, stack, servers, options.hold_seconds, options.log)
            now = totals()
            report.per_fault[fault] = now - phase_start
            phase_start = now
            options.log(
                f"  recovered after {time.monotonic() - started:.1f} s; "
                + ", ".join(f"{k} {report.per_fault[fault][k]}" for k in HEADLINE)
            )
        await asyncio.sleep(options.load_seconds)
        stop.set()
        await asyncio.gather(*tasks, churn)
        report.per_fault["after"] = totals() - phase_start
        for ledger in ledgers:
            stored = await read_stream(client, servers.urls[0] + ledger.path)
            check_ledger(ledger, stored, report.verdict)
        return ledgers


def run_faults(options: Options) -> Report:
    """Start everything, run the producers through the faults, check, stop everything."""
    temporary = options.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="threadline-faults-")) if temporary else options.data_dir
    assert data_dir is not None
    report = Report(verdict=Verdict())
    try:
        with EmbeddedStack(data_dir / "stack") as stack:
            options.log(f"stack running in {data_dir}")
            tenant = make_tenant(settings_for(stack.endpoints), "faults")
            servers = _Servers(stack, data_dir)
            try:
                options.log(f"servers on ports {servers.ports}; {options.producers} producers")
                asyncio.run(_drive(options, stack, servers, tenant.key, report))
                started = time.monotonic()
                deadline = started + 180
                while True:
                    report.mirror = mirror_difference(stack.endpoints, tenant.environment_id)
                    if not report.mirror or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                report.mirror_seconds = time.monotonic() - started
            finally:
                servers.stop()
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    return report
