"""The SDK's batching writer: records/s to one session's channel at 1 and 20 writers.

    .venv/bin/python bench/sdk_writer.py [--quick] [--seconds N]

Starts its own embedded stack and a `threadline serve` process, then runs AsyncThreadline
writers (default options: linger 5 ms, up to 1,000 records / 1 MiB per append) in this process,
each appending 200-byte JSON records to the same session's `out` channel as fast as backpressure
lets it, for a fixed time. Records/s counts acknowledged records (start to the last writer's
close). The channel is read back afterwards: the count must match exactly (no loss, no duplicate).
Prints a table and writes bench/results/sdk_writer.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import start_server, stop_server, tenant, write_results
from threadline.client import AsyncChannel, AsyncThreadline
from threadline.embedded.stack import EmbeddedStack

PAYLOAD = "x" * 180  # ~200 bytes serialized with its key and index


async def run_writers(channel: AsyncChannel, writers: int, seconds: float) -> tuple[int, float]:
    stop = time.monotonic() + seconds

    async def one(index: int) -> int:
        count = 0
        async with channel.writer() as writer:
            while time.monotonic() < stop:
                await writer.append({"w": index, "i": count, "p": PAYLOAD})
                count += 1
                if count % 200 == 0:
                    await asyncio.sleep(0)  # let the other writers' senders run
        return count

    started = time.monotonic()
    counts = await asyncio.gather(*(one(i) for i in range(writers)))
    return sum(counts), time.monotonic() - started


async def read_back(channel: AsyncChannel) -> int:
    return sum([1 async for _ in channel.subscribe("-1", follow=False)])


async def main(seconds: float) -> dict[str, Any]:
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="threadline-bench-") as tmp,
        EmbeddedStack(Path(tmp) / "stack") as stack,
    ):
        _, key = await tenant(stack.endpoints, "bench")
        server, base = await start_server(stack.endpoints)
        try:
            async with AsyncThreadline(base, key) as client:
                for writers in (1, 20):
                    session = await client.sessions.create("bench-sdk-writer")
                    total, elapsed = await run_writers(session.out, writers, seconds)
                    stored = await read_back(session.out)
                    assert stored == total, f"wrote {total}, read back {stored}"
                    rows.append(
                        {
                            "writers": writers,
                            "records": total,
                            "seconds": round(elapsed, 2),
                            "records_per_second": round(total / elapsed),
                        }
                    )
        finally:
            await stop_server(server)
    return {"rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [
        "SDK writer to one session (AsyncThreadline, default writer options, 200 B JSON records)",
        "",
        "| writers | records | seconds | records/s |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['writers']} | {row['records']:,} | {row['seconds']} | {row['records_per_second']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 s per row instead of 10")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    result = asyncio.run(main(seconds))
    write_results("sdk_writer", result, render(result))
