"""The one-statement flush (issue 14, item 2) against the real stack: two committers — as two
workers or instances would be — appending to the same streams, each remembering heads the other
moves, so their guarded commits fail and fall back to lock-and-decide. Whatever the interleaving:
every offset is given once, no acknowledged record is lost, a producer's append is stored once
however often and wherever it is retried, and refusals (closed, deleted, Stream-Seq) are exact."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from threadline.config import Settings
from threadline.db import create_pool
from threadline.errors import ApiError
from threadline.storage.objects import ObjectStore
from threadline.streams.cache import ChunkCache
from threadline.streams.committer import AppendOutcome, AppendRequest, GroupCommitter
from threadline.streams.live import LiveHub
from threadline.streams.producers import Producer

JSON = {"Content-Type": "application/json"}


class _NoActivity:
    def touch(self, session_id: str) -> None:
        pass


def _paths() -> dict[str, float]:
    return {
        path: REGISTRY.get_sample_value("threadline_stream_flush_paths_total", {"path": path}) or 0.0
        for path in ("guarded", "guard_failed", "undecided", "locked")
    }


@asynccontextmanager
async def _committers(settings: Settings, count: int) -> AsyncIterator[list[GroupCommitter]]:
    """``count`` committers on one stack, each with its own pool and tasks, as separate workers
    would have (they share nothing but Postgres and S3)."""
    pools: list[asyncpg.Pool[Any]] = []
    committers: list[GroupCommitter] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for _ in range(count):
            pool = await create_pool(settings.database_url, min_size=1, max_size=8)
            pools.append(pool)
            committer = GroupCommitter(
                pool,
                ObjectStore(settings),
                LiveHub(settings.database_url),
                ChunkCache(8 * 1024 * 1024),
                _NoActivity(),
                max_inflight=4,
            )
            committers.append(committer)
            tasks.append(asyncio.create_task(committer.run()))
        yield committers
    finally:
        for committer in committers:
            await committer.drain(30)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in pools:
            await pool.close()


def _create(client: httpx.Client, db: Callable[..., Any], prefix: str) -> tuple[str, int]:
    path = f"/v1/stream/flush-{prefix}-{uuid.uuid4().hex[:8]}"
    assert client.put(path, headers=JSON).status_code == 201
    stream_id = db(
        "fetchval",
        "SELECT id FROM streams WHERE name = $1 AND deleted_at IS NULL",
        path[len("/v1/stream/") :],
    )
    return path, stream_id


def _record(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def _assert_index_is_contiguous(db: Callable[..., Any], stream_id: int) -> int:
    """The chunk rows tile [0, next_offset) exactly: no offset given twice, none skipped."""
    rows = db(
        "fetch",
        "SELECT start_offset, end_offset FROM stream_chunks WHERE stream_id = $1 ORDER BY start_offset",
        stream_id,
    )
    position = 0
    for row in rows:
        assert row["start_offset"] == position, rows
        position = row["end_offset"]
    assert db("fetchval", "SELECT next_offset FROM streams WHERE id = $1", stream_id) == position
    return position


def test_committers_that_move_each_others_heads_fall_back_and_stay_exact(
    settings: Settings, client: httpx.Client, db: Callable[..., Any]
) -> None:
    """Appends alternate between two committers, one at a time: from the third on, each one's
    remembered head is stale (the other moved it), so the guard must fail and the fallback
    decide. Then a producer alternates the same way, and retries every append on the committer
    that did not store it: its remembered producer state is stale each time."""
    path, stream_id = _create(client, db, "alternate")
    before = _paths()

    async def go() -> tuple[list[AppendOutcome], list[AppendOutcome], list[AppendOutcome]]:
        async with _committers(settings, 2) as (a, b):
            plain = [
                await (a, b)[n % 2].append(AppendRequest(stream_id, [_record(n=n)], "application/json"))
                for n in range(6)
            ]
            produced, retried = [], []
            for seq in range(6):
                request = AppendRequest(
                    stream_id,
                    [_record(seq=seq)],
                    "application/json",
                    producer=Producer("alternating", 0, seq),
                )
                produced.append(await (a, b)[seq % 2].append(request))
                retried.append(await (b, a)[seq % 2].append(request))
            return plain, produced, retried

    plain, produced, retried = asyncio.run(go())
    after = _paths()
    assert [o.start_offset for o in plain + produced] == list(range(12))
    assert all(o.appended == 1 for o in plain + produced)
    assert not any(o.duplicate for o in plain + produced)
    assert all(o.duplicate for o in retried)
    assert [o.next_offset for o in retried] == list(range(7, 13))
    assert after["guard_failed"] - before["guard_failed"] >= 4, (before, after)
    assert _assert_index_is_contiguous(db, stream_id) == 12
    assert client.get(path, params={"offset": "-1"}).json() == [{"n": n} for n in range(6)] + [
        {"seq": n} for n in range(6)
    ]
    assert db(
        "fetchrow",
        "SELECT epoch, last_seq, last_next_offset FROM stream_producers WHERE stream_id = $1",
        stream_id,
    ) == (0, 5, 12)


def test_a_committer_alone_commits_in_one_guarded_statement(
    settings: Settings, client: httpx.Client, db: Callable[..., Any]
) -> None:
    path, stream_id = _create(client, db, "steady")
    before = _paths()

    async def go() -> None:
        async with _committers(settings, 1) as (a,):
            for seq in range(5):
                await a.append(
                    AppendRequest(
                        stream_id, [_record(seq=seq)], "application/json", producer=Producer("p", 0, seq)
                    )
                )
            duplicate = await a.append(
                AppendRequest(stream_id, [_record(seq=4)], "application/json", producer=Producer("p", 0, 4))
            )
            assert duplicate.duplicate
            assert duplicate.next_offset == 5

    asyncio.run(go())
    after = _paths()
    # The first flush learns the head under lock; the next four need nothing else.
    assert after["guarded"] - before["guarded"] >= 4, (before, after)
    assert after["guard_failed"] == before["guard_failed"]
    assert client.get(path, params={"offset": "-1"}).json() == [{"seq": n} for n in range(5)]


def test_refusals_decided_after_another_committer_moved_the_head(
    settings: Settings, client: httpx.Client, db: Callable[..., Any]
) -> None:
    """A remembers an open head with no Stream-Seq; B then advances the Stream-Seq, and closes
    another stream, and a third is deleted. A's appends must be refused as if it had never
    remembered anything."""
    _, seq_stream = _create(client, db, "seq")
    _, closed_stream = _create(client, db, "closed")
    deleted_path, deleted_stream = _create(client, db, "deleted")

    async def go() -> None:
        async with _committers(settings, 2) as (a, b):
            for stream_id in (seq_stream, closed_stream, deleted_stream):
                await a.append(AppendRequest(stream_id, [_record(n=0)], "application/json", stream_seq="a"))
                await a.append(AppendRequest(stream_id, [_record(n=1)], "application/json", stream_seq="b"))
            await b.append(AppendRequest(seq_stream, [_record(n=2)], "application/json", stream_seq="d"))
            await b.append(AppendRequest(closed_stream, [_record(n=2)], "application/json", close=True))
            deleted = await asyncio.to_thread(client.delete, deleted_path)
            assert deleted.status_code == 204
            with pytest.raises(ApiError) as refused:
                await a.append(AppendRequest(seq_stream, [_record(n=3)], "application/json", stream_seq="c"))
            assert refused.value.code == "stream_seq_conflict"
            with pytest.raises(ApiError) as refused:
                await a.append(AppendRequest(closed_stream, [_record(n=3)], "application/json"))
            assert refused.value.code == "stream_closed"
            with pytest.raises(ApiError) as refused:
                await a.append(AppendRequest(deleted_stream, [_record(n=3)], "application/json"))
            assert refused.value.code in {"stream_not_found", "stream_gone"}
            accepted = await a.append(
                AppendRequest(seq_stream, [_record(n=3)], "application/json", stream_seq="e")
            )
            assert accepted.start_offset == 3

    asyncio.run(go())
    assert _assert_index_is_contiguous(db, seq_stream) == 4
    assert _assert_index_is_contiguous(db, closed_stream) == 3


def test_concurrent_committers_on_shared_streams_give_every_offset_once(
    settings: Settings, client: httpx.Client, db: Callable[..., Any]
) -> None:
    """Producers pipeline appends to two shared streams through two committers at once, retrying
    each one on the other committer; plain appends run alongside. Every acknowledged record is
    stored exactly once, each producer's in sequence order, and the index tiles each stream."""
    streams = [_create(client, db, f"shared{n}") for n in range(2)]
    producers = 6
    per_producer = 12
    rng = random.Random(14)

    async def producer(index: int, committers: list[GroupCommitter]) -> list[tuple[int, AppendOutcome]]:
        _, stream_id = streams[index % len(streams)]
        stored: list[tuple[int, AppendOutcome]] = []
        for seq in range(per_producer):
            request = AppendRequest(
                stream_id,
                [_record(p=index, s=seq)],
                "application/json",
                producer=Producer(f"producer-{index}", 0, seq),
            )
            first, second = rng.sample(committers, 2)
            # The append and its retry race on two committers: exactly one stores it.
            results = await asyncio.gather(first.append(request), second.append(request))
            fresh = [r for r in results if not r.duplicate]
            assert len(fresh) == 1, results
            stored.append((stream_id, fresh[0]))
        return stored

    async def plain(stream_id: int, committer: GroupCommitter, count: int) -> list[tuple[int, AppendOutcome]]:
        return [
            (
                stream_id,
                await committer.append(AppendRequest(stream_id, [_record(plain=n)], "application/json")),
            )
            for n in range(count)
        ]

    async def go() -> tuple[list[list[tuple[int, AppendOutcome]]], list[list[tuple[int, AppendOutcome]]]]:
        async with _committers(settings, 2) as committers:
            produced = asyncio.gather(*(producer(i, committers) for i in range(producers)))
            plains = asyncio.gather(*(plain(sid, c, 10) for _, sid in streams for c in committers))
            return await produced, await plains

    produced, plains = asyncio.run(go())
    for path, stream_id in streams:
        acknowledged = [o for results in (*produced, *plains) for sid, o in results if sid == stream_id]
        total = _assert_index_is_contiguous(db, stream_id)
        # Every acknowledged record has its own offset, and nothing else is stored.
        assert sorted(o.start_offset for o in acknowledged) == list(range(total))
        records = client.get(path, params={"offset": "-1"}).json()
        assert len(records) == total
        by_producer: dict[int, list[int]] = {}
        for record in records:
            if "p" in record:
                by_producer.setdefault(record["p"], []).append(record["s"])
        for index, seqs in by_producer.items():
            assert seqs == list(range(per_producer)), (index, seqs)
        expected_producers = sum(1 for i in range(producers) if streams[i % len(streams)][1] == stream_id)
        assert len(by_producer) == expected_producers
        assert sum(1 for record in records if "plain" in record) == 20
