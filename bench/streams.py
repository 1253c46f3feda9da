"""Channel (stream) benchmark: append latency next to the S3 + Postgres floor, append throughput,
and catch-up replay.

    .venv/bin/python bench/streams.py [--quick]

Starts its own embedded stack and a real `threadline serve` process and drives it over HTTP with
aiohttp from this process (the side-by-side run with the Durable Streams reference server and a
separate load-generator process is issue 6's harness). The floor is one obstore PUT of the same
size plus one asyncpg INSERT + commit, on the same stack, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import obstore
import psutil
from obstore.store import S3Store

from harness import pct, start_server, stop_server, tenant, write_results
from threadline.embedded.stack import EmbeddedStack, StackEndpoints

OCTETS = {"Content-Type": "application/octet-stream"}
JSON = {"Content-Type": "application/json"}


async def floor(endpoints: StackEndpoints, n: int) -> list[float]:
    """One 1 KiB object PUT plus one Postgres INSERT + commit: what a durable append must cost."""
    env = endpoints.as_env()
    store = S3Store(
        env["THREADLINE_S3_BUCKET"],
        endpoint=env["THREADLINE_S3_ENDPOINT"],
        region="us-east-1",
        access_key_id=env["THREADLINE_S3_ACCESS_KEY_ID"],
        secret_access_key=env["THREADLINE_S3_SECRET_ACCESS_KEY"],
        allow_http=True,
    )
    conn = await asyncpg.connect(endpoints.database_url)
    await conn.execute("CREATE TEMP TABLE floor_t (id bigint primary key, key text)")
    body = secrets.token_bytes(1024)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await obstore.put_async(store, f"bench-floor/{i}-{secrets.token_hex(4)}", body)
        await conn.execute("INSERT INTO floor_t VALUES ($1, 'k')", i)
        samples.append(time.perf_counter() - started)
    await conn.close()
    return samples


async def append_latency(client: aiohttp.ClientSession, n: int) -> list[float]:
    path = f"/v1/stream/bench-latency-{secrets.token_hex(4)}"
    async with client.put(path, headers=OCTETS) as response:
        assert response.status == 201
    record = secrets.token_bytes(1024)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        async with client.post(path, data=record, headers=OCTETS) as response:
            assert response.status == 204, await response.text()
        samples.append(time.perf_counter() - started)
    return samples


async def throughput(
    client: aiohttp.ClientSession, *, streams: int, per_request: int, requests: int, in_flight: int
) -> float:
    """Records/s of 200 B JSON records, ``per_request`` per POST, round-robin over ``streams``."""
    tag = secrets.token_hex(4)
    paths = [f"/v1/stream/bench-tp-{tag}-{i}" for i in range(streams)]
    for path in paths:
        async with client.put(path, headers=JSON) as response:
            assert response.status == 201
    record = "x" * 196  # + quotes and comma: ~200 bytes per record
    body = json.dumps([record] * per_request) if per_request > 1 else json.dumps(record)
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            index = queue.pop()
            async with client.post(paths[index % streams], data=body, headers=JSON) as response:
                assert response.status == 204, await response.text()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return requests * per_request / (time.perf_counter() - started)


async def replay(client: aiohttp.ClientSession, records: int) -> tuple[float, int]:
    path = f"/v1/stream/bench-replay-{secrets.token_hex(4)}"
    async with client.put(path, headers=JSON) as response:
        assert response.status == 201
    batch = json.dumps(["y" * 196] * 100)
    sem = asyncio.Semaphore(8)

    async def post() -> None:
        async with sem, client.post(path, data=batch, headers=JSON) as response:
            assert response.status == 204

    await asyncio.gather(*(post() for _ in range(records // 100)))
    started = time.perf_counter()
    offset, total = "-1", 0
    while True:
        async with client.get(path, params={"offset": offset}) as response:
            body = await response.read()
            offset = response.headers["Stream-Next-Offset"]
            done = response.headers.get("Stream-Up-To-Date") == "true"
        total += len(json.loads(body))
        if done:
            break
    return time.perf_counter() - started, total


async def main(quick: bool) -> None:
    n = 200 if quick else 1000
    with tempfile.TemporaryDirectory() as data_dir, EmbeddedStack(Path(data_dir)) as stack:
        endpoints = stack.endpoints
        _, key = await tenant(endpoints, "bench-streams")
        floor_samples = await floor(endpoints, n)
        process, url = await start_server(endpoints)
        server = psutil.Process(process.pid)
        try:
            connector = aiohttp.TCPConnector(limit=256)
            headers = {"Authorization": f"Bearer {key}"}
            async with aiohttp.ClientSession(url, headers=headers, connector=connector) as client:
                latency = await append_latency(client, n)
                scale = 0.25 if quick else 1.0
                rows: dict[str, Any] = {
                    "1 rec/req, 100 streams, 64 in flight": await throughput(
                        client, streams=100, per_request=1, requests=int(8000 * scale), in_flight=64
                    ),
                    "100 rec/req, 100 streams, 16 in flight": await throughput(
                        client, streams=100, per_request=100, requests=int(2000 * scale), in_flight=16
                    ),
                    "100 rec/req, 1 stream, 16 in flight": await throughput(
                        client, streams=1, per_request=100, requests=int(1000 * scale), in_flight=16
                    ),
                }
                replay_seconds, replayed = await replay(client, 20_000 if quick else 100_000)
            rss = server.memory_info().rss / 2**20
        finally:
            await stop_server(process)
    result = {
        "floor_ms": {"p50": pct(floor_samples, 0.5), "p99": pct(floor_samples, 0.99)},
        "append_1kib_ms": {"p50": pct(latency, 0.5), "p99": pct(latency, 0.99)},
        "throughput_records_per_s": rows,
        "replay": {"records": replayed, "seconds": replay_seconds},
        "server_rss_mib": rss,
    }
    ratio = pct(latency, 0.5) / pct(floor_samples, 0.5)
    lines = [
        "| measurement | value |",
        "|---|---|",
        f"| floor: 1 KiB S3 PUT + PG commit, p50 / p99 ms | {pct(floor_samples, 0.5):.2f} / {pct(floor_samples, 0.99):.2f} |",
        f"| append 1 KiB, 1 producer, p50 / p99 ms | {pct(latency, 0.5):.2f} / {pct(latency, 0.99):.2f} ({ratio:.2f}x floor p50) |",
        *(f"| {name}, records/s | {value:,.0f} |" for name, value in rows.items()),
        f"| replay {replayed:,} x 200 B from -1, s | {replay_seconds:.2f} |",
        f"| server RSS after the run, MiB | {rss:.0f} |",
    ]
    write_results("streams" + ("_quick" if quick else ""), result, "\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
