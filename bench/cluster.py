"""Through HAProxy in front of three `threadline serve` instances: cross-instance delivery latency
and failover time.

    .venv/bin/python bench/cluster.py [--subscribers 100] [--rate 20] [--seconds 15]

Starts its own cluster (`threadline.embedded.cluster.LocalCluster`: embedded stack, 3 instances,
Debian's haproxy with deploy/haproxy/haproxy.cfg). Clients only talk to the balancer.

1. **Delivery**: ``--subscribers`` SSE subscribers on one session channel (the balancer spreads
   them over the instances), one writer appending ``--rate`` records/s for ``--seconds``. Each
   record's latency is append sent → received by a subscriber; the balancer's
   ``X-Threadline-Instance`` header on the append and on each subscriber's stream says whether a
   delivery crossed instances (written through one instance, read from another).
2. **Failover**: the same subscribers and writer, then ``kill -9`` of the instance holding the
   most subscribers. A subscriber on it reconnects through the balancer (after 50 ms, then every
   100 ms) from the offset of the last record it received; its failover time is kill → the first
   record on its new connection. The writer retries each append with the same producer numbers
   until it is acknowledged. Every subscriber's records are then checked: each once, in order.

Prints a table and writes bench/results/cluster.{json,md}. Figures, not assertions: on a shared
2-core machine they move with the load, reported next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from harness import pct, tenant, write_results
from threadline.embedded.cluster import LocalCluster

INSTANCE = "X-Threadline-Instance"


@dataclass
class Subscriber:
    received: list[tuple[int, float, str]] = field(default_factory=list)  # (i, at, instance)
    connections: list[tuple[float, str]] = field(default_factory=list)  # (connected at, instance)
    failures: int = 0
    instance: str = ""

    async def run(self, client: aiohttp.ClientSession, path: str, stop: asyncio.Event) -> None:
        offset = "-1"
        while not stop.is_set():
            try:
                async with client.get(
                    path, params={"offset": offset}, headers={"Accept": "text/event-stream"}
                ) as response:
                    if response.status != 200:
                        self.failures += 1
                        await response.read()
                        await asyncio.sleep(0.1)
                        continue
                    self.instance = response.headers[INSTANCE]
                    self.connections.append((time.perf_counter(), self.instance))
                    event_id = offset
                    async for raw in response.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line.startswith("data:"):
                            value = orjson.loads(line[5:])
                            self.received.append((value["i"], time.perf_counter(), self.instance))
                            offset = event_id
            except (TimeoutError, aiohttp.ClientError):
                self.failures += 1
            if not stop.is_set():
                await asyncio.sleep(0.05 if self.failures <= 1 else 0.1)


@dataclass
class Writer:
    sent: dict[int, tuple[float, str]] = field(default_factory=dict)  # i -> (sent at, instance)
    acks: list[float] = field(default_factory=list)  # append sent -> acknowledged
    retries: int = 0
    count: int = 0

    async def run(self, client: aiohttp.ClientSession, path: str, rate: float, stop: asyncio.Event) -> None:
        producer = f"bench-cluster-{uuid.uuid4().hex}"
        interval = 1 / rate
        next_at = time.perf_counter()
        while not stop.is_set():
            i = self.count
            started = time.perf_counter()
            body = orjson.dumps({"i": i, "pad": "x" * 200})
            headers = {
                "Content-Type": "application/json",
                "Producer-Id": producer,
                "Producer-Epoch": "0",
                "Producer-Seq": str(i),
            }
            while True:  # the same numbers until acknowledged: a retry is never a second record
                try:
                    async with client.post(path, data=body, headers=headers) as response:
                        await response.read()
                        if response.status < 300:
                            self.sent[i] = (started, response.headers.get(INSTANCE, "?"))
                            self.acks.append(time.perf_counter() - started)
                            break
                except (TimeoutError, aiohttp.ClientError):
                    pass
                self.retries += 1
                await asyncio.sleep(0.05)
            self.count += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


def cpu_seconds(cluster: LocalCluster) -> dict[str, float]:
    """User + system CPU seconds so far of each instance, the balancer and this process."""
    found = {}
    for name, pid in cluster.pids().items():
        times = psutil.Process(pid).cpu_times()
        found[name] = times.user + times.system
    own = psutil.Process().cpu_times()
    found["bench client"] = own.user + own.system
    return found


async def until(condition: Callable[[], bool], *, seconds: float) -> bool:
    """Poll ``condition``; False when ``seconds`` passed first (the figures then show what is missing)."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


async def phase(
    cluster: LocalCluster, key: str, args: argparse.Namespace, *, kill: bool
) -> tuple[list[Subscriber], Writer, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    extra: dict[str, Any] = {}
    async with aiohttp.ClientSession(
        base_url=cluster.url, headers=headers, connector=connector, timeout=timeout
    ) as client:
        async with client.post("/api/v1/sessions", json={"type": "bench-cluster"}) as response:
            session = (await response.json())["id"]
        path = f"/realtime/v1/sessions/{session}/out"
        stop = asyncio.Event()
        subscribers = [Subscriber() for _ in range(args.subscribers)]
        tasks = [asyncio.create_task(s.run(client, path, stop)) for s in subscribers]
        await until(lambda: all(s.connections for s in subscribers), seconds=120)
        writer = Writer()
        cpu_before = cpu_seconds(cluster)
        writing = asyncio.create_task(writer.run(client, f"{path}/append", args.rate, stop))
        if kill:
            await asyncio.sleep(5)
            per_instance: dict[str, int] = {}
            for s in subscribers:
                per_instance[s.instance] = per_instance.get(s.instance, 0) + 1
            victim = max(per_instance, key=lambda name: per_instance[name])
            killed_at = time.perf_counter()
            await asyncio.to_thread(cluster.kill, victim)
            extra = {"victim": victim, "killed_at": killed_at, "per_instance": per_instance}
            await asyncio.sleep(args.seconds)
        else:
            await asyncio.sleep(args.seconds)
        stop.set()
        await writing
        total = writer.count
        if not kill:
            after = cpu_seconds(cluster)
            extra["cpu_seconds"] = {name: round(after[name] - cpu_before[name], 2) for name in after}
        await until(
            lambda: all(s.received and s.received[-1][0] >= total - 1 for s in subscribers), seconds=30
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return subscribers, writer, extra


def exact(subscribers: list[Subscriber], total: int) -> dict[str, int]:
    wrong = sum(1 for s in subscribers if [r[0] for r in s.received] != list(range(total)))
    return {"subscribers_not_exact": wrong, "records": total}


def summary(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(samples), "p50_ms": round(pct(samples, 0.5), 1), "p99_ms": round(pct(samples, 0.99), 1)}


def delivery(subscribers: list[Subscriber], writer: Writer) -> dict[str, Any]:
    cross: list[float] = []
    same: list[float] = []
    for s in subscribers:
        for i, at, instance in s.received:
            sent_at, written_by = writer.sent[i]
            (same if written_by == instance else cross).append(at - sent_at)
    every = cross + same
    return {
        "deliveries": len(every),
        "cross_instance": summary(cross),
        "same_instance": summary(same),
        "all": summary(every),
        "append_ack": summary(writer.acks),
        "writer_instances": sorted({w for _, w in writer.sent.values()}),
        "subscriber_instances": {
            name: sum(1 for s in subscribers if s.connections[0][1] == name)
            for name in sorted({s.connections[0][1] for s in subscribers})
        },
    }


def failover(subscribers: list[Subscriber], writer: Writer, extra: dict[str, Any]) -> dict[str, Any]:
    victim, killed_at = extra["victim"], extra["killed_at"]
    resumed: list[float] = []
    for s in subscribers:
        if s.connections[0][1] != victim:
            continue
        after = [at for _, at, instance in s.received if at > killed_at and instance != victim]
        if after:
            resumed.append(after[0] - killed_at)
    affected = sum(1 for s in subscribers if s.connections[0][1] == victim)
    return {
        "victim": victim,
        "subscribers_on_victim": affected,
        "resumed": len(resumed),
        "resume_p50_ms": round(pct(resumed, 0.5), 1) if resumed else None,
        "resume_p99_ms": round(pct(resumed, 0.99), 1) if resumed else None,
        "resume_max_ms": round(max(resumed) * 1000, 1) if resumed else None,
        "writer_retries": writer.retries,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tl-bench-cluster-") as data_dir:
        cluster = LocalCluster(
            Path(data_dir), instances=args.instances, env={"THREADLINE_LOG_LEVEL": "WARNING"}
        )
        await asyncio.to_thread(cluster.start)
        try:
            _, key = await tenant(cluster.endpoints, "bench-cluster")
            subscribers, writer, measured = await phase(cluster, key, args, kill=False)
            result: dict[str, Any] = {
                "instances": args.instances,
                "subscribers": args.subscribers,
                "rate": args.rate,
                "seconds": args.seconds,
                "delivery": {**delivery(subscribers, writer), **exact(subscribers, writer.count)},
                "cpu_seconds": measured["cpu_seconds"],
            }
            deliveries = result["delivery"]["all"]["n"]
            servers = sum(v for k, v in measured["cpu_seconds"].items() if k.startswith("tl"))
            result["cpu_ms_per_1000_deliveries"] = {
                "instances": round(servers * 1e6 / deliveries, 1) if deliveries else None,
                "haproxy": round(measured["cpu_seconds"].get("haproxy", 0) * 1e6 / deliveries, 1)
                if deliveries
                else None,
            }
            if args.instances > 1:  # one instance has nowhere to fail over to
                subscribers, writer, extra = await phase(cluster, key, args, kill=True)
                result["failover"] = {
                    **failover(subscribers, writer, extra),
                    **exact(subscribers, writer.count),
                }
        finally:
            await asyncio.to_thread(cluster.stop)
    result["loadavg_before"] = [round(x, 2) for x in load_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    return result


def table(r: dict[str, Any]) -> str:
    d = r["delivery"]
    rows = [
        f"Cluster: {r['instances']} instance(s) behind HAProxy, {r['subscribers']} SSE subscribers on one session, "
        f"1 writer at {r['rate']} records/s for {r['seconds']} s "
        f"(load average {r['loadavg_before'][0]} → {r['loadavg_after'][0]} on {r['cpus']} CPUs)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| delivery cross-instance: p50 / p99 (n) | {d['cross_instance']['p50_ms']} / "
        f"{d['cross_instance']['p99_ms']} ms ({d['cross_instance']['n']}) |",
        f"| delivery same instance: p50 / p99 (n) | {d['same_instance']['p50_ms']} / "
        f"{d['same_instance']['p99_ms']} ms ({d['same_instance']['n']}) |",
        f"| subscribers per instance | {d['subscriber_instances']} |",
        f"| append acknowledged: p50 / p99 | {d['append_ack']['p50_ms']} / {d['append_ack']['p99_ms']} ms |",
        f"| subscribers without every record exactly once | {d['subscribers_not_exact']} of "
        f"{r['subscribers']} ({d['records']} records) |",
        f"| CPU per 1,000 deliveries: instances / HAProxy | {r['cpu_ms_per_1000_deliveries']['instances']} / "
        f"{r['cpu_ms_per_1000_deliveries']['haproxy']} ms (CPU s over the run: {r['cpu_seconds']}) |",
    ]
    if "failover" in r:
        f = r["failover"]
        rows += [
            f"| failover: kill -9 of {f['victim']} holding {f['subscribers_on_victim']} subscribers → "
            f"resumed p50 / p99 / max | {f['resume_p50_ms']} / {f['resume_p99_ms']} / {f['resume_max_ms']} ms "
            f"({f['resumed']} resumed) |",
            f"| failover: writer retries / subscribers without every record exactly once | "
            f"{f['writer_retries']} / {f['subscribers_not_exact']} of {r['subscribers']} ({f['records']} records) |",
        ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=3, help="1: the balancer's own cost, for an A/B")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    write_results("cluster" if args.instances == 3 else f"cluster_{args.instances}", result, table(result))


if __name__ == "__main__":
    main()
