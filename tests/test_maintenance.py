"""Compaction, garbage collection, trim and expiry, against the real stack.

The trim tests run first, on the shared server (whose maintenance passes are 30 s apart); the
compaction and collection tests then run their own ``threadline serve`` with passes every 0.2 s and short grace
periods, and no chunk cache, so every read after a compaction really goes to the bucket.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import ServeProcess, Tenant, assert_error, bearer, eventually
from threadline.config import Settings
from threadline.embedded.stack import StackEndpoints
from threadline.storage.objects import ObjectStore

JSON = {"Content-Type": "application/json"}


def _offset(position: int) -> str:
    return f"0000000000000000_{position:016d}"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _stored(settings: Settings, key: str) -> bool:
    async def head() -> bool:
        try:
            await ObjectStore(settings).get_range(key, 0, 1)
        except FileNotFoundError:
            return False
        return True

    return asyncio.run(head())


def _keys(db: Callable[..., Any], stream: str, kind: str) -> set[str]:
    rows = db(
        "fetch",
        """SELECT DISTINCT o.key FROM stream_chunks c JOIN stream_objects o ON o.id = c.object_id
           JOIN streams s ON s.id = c.stream_id WHERE s.name = $1 AND s.deleted_at IS NULL AND o.kind = $2""",
        stream,
        kind,
    )
    return {row["key"] for row in rows}


def test_trim_removes_records_before_an_offset(client: httpx.Client, db: Callable[..., Any]) -> None:
    name = _name("trim")
    path = f"/v1/stream/{name}"
    assert client.put(path, headers=JSON).status_code == 201
    for n in range(10):
        assert client.post(path, headers=JSON, content=json.dumps(n)).status_code == 204
    fork = f"/v1/stream/{_name('trim-fork')}"
    forked = client.put(fork, headers={"Stream-Forked-From": path, "Stream-Fork-Offset": _offset(3)})
    assert forked.status_code == 201, forked.text

    trimmed = client.post("/api/v1/streams/trim", json={"stream": name, "before": _offset(6)})
    assert trimmed.status_code == 200, trimmed.text
    assert trimmed.json() == {"stream": name, "trimOffset": _offset(6), "nextOffset": _offset(10)}

    assert client.get(path, params={"offset": "-1"}).json() == [6, 7, 8, 9]
    assert client.get(path).json() == [6, 7, 8, 9]
    assert_error(client.get(path, params={"offset": _offset(2)}), 410, "offset_trimmed")
    # The fork made before the trim keeps the history it shares with its source.
    assert client.get(fork, params={"offset": "-1"}).json() == [0, 1, 2]
    # Index rows below the fork point stay for the fork; those between it and the trim go.
    starts = [
        row["start_offset"]
        for row in db(
            "fetch",
            """SELECT c.start_offset FROM stream_chunks c JOIN streams s ON s.id = c.stream_id
               WHERE s.name = $1 AND s.deleted_at IS NULL ORDER BY 1""",
            name,
        )
    ]
    assert starts == [0, 1, 2, 6, 7, 8, 9]

    # A fork made after the trim cannot see what was trimmed.
    late_fork = f"/v1/stream/{_name('trim-late-fork')}"
    assert (
        client.put(
            late_fork, headers={"Stream-Forked-From": path, "Stream-Fork-Offset": _offset(8)}
        ).status_code
        == 201
    )
    assert client.get(late_fork, params={"offset": "-1"}).json() == [6, 7]

    # Trimming never moves back, and cannot pass the tail.
    again = client.post("/api/v1/streams/trim", json={"stream": name, "before": _offset(1)})
    assert again.json()["trimOffset"] == _offset(6)
    assert_error(
        client.post("/api/v1/streams/trim", json={"stream": name, "before": _offset(11)}),
        400,
        "offset_out_of_range",
    )
    assert_error(
        client.post("/api/v1/streams/trim", json={"stream": name, "before": "soon"}), 400, "invalid_offset"
    )
    assert_error(client.post("/api/v1/streams/trim", json={"stream": name}), 400)
    assert client.get(path, params={"offset": "-1"}).json() == [6, 7, 8, 9]


def test_trimmed_session_channel_replays_from_the_trim_point(
    client: httpx.Client, anon: httpx.Client
) -> None:
    session = client.post("/api/v1/sessions", json={"type": "chat"}).json()
    out = f"/realtime/v1/sessions/{session['id']}/out"
    for n in range(5):
        assert client.post(f"{out}/append", json={"n": n}).status_code == 200
    token = client.post(f"/api/v1/sessions/{session['id']}/tokens", json={"scopes": ["read"]}).json()["token"]
    # Trimming needs write scope on the session.
    denied = anon.post(
        "/api/v1/streams/trim",
        json={"stream": f"sessions/{session['id']}/out", "before": _offset(3)},
        headers=bearer(token),
    )
    assert_error(denied, 403)
    trimmed = client.post(
        "/api/v1/streams/trim", json={"stream": f"sessions/{session['id']}/out", "before": _offset(3)}
    )
    assert trimmed.status_code == 200, trimmed.text
    with connect_sse(client, "GET", out, headers={"Timeout-Seconds": "1"}) as source:
        events = [(event.id, json.loads(event.data)) for event in source.iter_sse() if event.data]
    assert events == [(_offset(4), {"n": 3}), (_offset(5), {"n": 4})]
    assert_error(client.get(out, headers={"Last-Event-ID": _offset(1)}), 410, "offset_trimmed")


@pytest.fixture(scope="module")
def busy_maintainer(stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServeProcess(
        stack,
        tmp_path_factory.mktemp("maintenance") / "serve.log",
        THREADLINE_MAINTENANCE_INTERVAL_SECONDS="0.2",
        THREADLINE_COMPACT_MIN_CHUNKS="4",
        THREADLINE_COMPACT_MIN_AGE_SECONDS="0",
        THREADLINE_GC_GRACE_SECONDS="1",
        THREADLINE_ORPHAN_SWEEP_INTERVAL_SECONDS="0.5",
        THREADLINE_ORPHAN_MIN_AGE_SECONDS="3",
        THREADLINE_CHUNK_CACHE_BYTES="0",
        THREADLINE_LONG_POLL_TIMEOUT_SECONDS="2",
    )
    try:
        yield server.url
    finally:
        server.stop()


def test_compaction_moves_chunks_into_segments_and_collects_the_old_objects(
    busy_maintainer: str, tenant: Tenant, settings: Settings, db: Callable[..., Any]
) -> None:
    name = _name("compact")
    path = f"/v1/stream/{name}"
    with httpx.Client(base_url=busy_maintainer, headers=bearer(tenant.key), timeout=30) as client:
        assert client.put(path, headers=JSON).status_code == 201
        # A live subscriber keeps the stream's tail (and its chunk refs) in memory throughout.
        received: list[Any] = []
        subscribed = threading.Event()

        def subscribe() -> None:
            with connect_sse(client, "GET", path, params={"offset": "now", "live": "sse"}) as source:
                for event in source.iter_sse():
                    subscribed.set()
                    if event.event == "data":
                        received.extend(json.loads(event.data))
                    if len(received) >= 40:
                        return

        thread = threading.Thread(target=subscribe, daemon=True)
        thread.start()
        assert subscribed.wait(10)
        batch_keys: set[str] = set()
        for n in range(30):  # one request at a time: one flush, one small chunk each
            assert client.post(path, headers=JSON, content=json.dumps({"n": n})).status_code == 204
            batch_keys |= _keys(db, name, "batch")

        def compacted() -> bool:
            return bool(_keys(db, name, "segment")) and len(_keys(db, name, "batch")) < 4

        eventually(compacted, timeout=60)
        collected = batch_keys - _keys(db, name, "batch")
        # The busy maintainer may compact an append's batch before the loop reads its key, so not
        # all 30 are seen; of those seen, all but the (at most 3) uncompacted ones are replaced.
        assert len(batch_keys) >= 10, batch_keys
        assert len(collected) >= len(batch_keys) - 3
        eventually(
            lambda: (
                db("fetchval", "SELECT count(*) FROM stream_objects WHERE key = ANY($1)", list(collected))
                == 0
            ),
            timeout=60,
        )
        assert not any(_stored(settings, key) for key in collected), "old batch objects are still stored"
        assert all(_stored(settings, key) for key in _keys(db, name, "segment"))

        # Every record back, in order, through the segments.
        read = client.get(path, params={"offset": "-1"})
        assert [value["n"] for value in read.json()] == list(range(30))
        # A read through the live tail's chunk refs (their objects now deleted) falls back to
        # the index instead of failing.
        middle = client.get(path, params={"offset": _offset(5), "live": "long-poll"})
        assert middle.status_code == 200, middle.text
        assert [value["n"] for value in middle.json()] == list(range(5, 30))
        for n in range(30, 40):
            assert client.post(path, headers=JSON, content=json.dumps({"n": n})).status_code == 204
        thread.join(20)
        assert [value["n"] for value in received] == list(range(40))


def test_a_busy_streams_small_segments_are_merged_into_one(
    busy_maintainer: str, tenant: Tenant, settings: Settings, db: Callable[..., Any]
) -> None:
    """A stream busy across many passes gets a segment per pass; once eight small ones line up
    they become one, so replaying it is one GET, not one per pass it lived through. Nothing is
    lost or reordered, and the merged-away segments are collected."""
    name = _name("merge")
    path = f"/v1/stream/{name}"
    with httpx.Client(base_url=busy_maintainer, headers=bearer(tenant.key), timeout=30) as client:
        assert client.put(path, headers=JSON).status_code == 201
        seen_segments: set[str] = set()
        for burst in range(10):  # ten bursts, each compacted into a segment of its own
            for n in range(burst * 4, burst * 4 + 4):
                assert client.post(path, headers=JSON, content=json.dumps({"n": n})).status_code == 204
            eventually(lambda: not _keys(db, name, "batch"), timeout=60)
            seen_segments |= _keys(db, name, "segment")
        # Without merging, ten bursts leave about ten segments; merged, at most the last few.
        assert len(seen_segments) >= 8, seen_segments
        eventually(lambda: len(_keys(db, name, "segment")) <= 3, timeout=60)
        merged_away = seen_segments - _keys(db, name, "segment")
        assert len(merged_away) >= 7, merged_away
        assert [value["n"] for value in client.get(path, params={"offset": "-1"}).json()] == list(range(40))
        eventually(lambda: not any(_stored(settings, key) for key in merged_away), timeout=60)
        assert [value["n"] for value in client.get(path, params={"offset": _offset(17)}).json()] == list(
            range(17, 40)
        )


def test_orphan_objects_and_expired_streams_are_collected(
    busy_maintainer: str, tenant: Tenant, settings: Settings, db: Callable[..., Any]
) -> None:
    orphan = f"batches/orphan-{uuid.uuid4().hex}"
    asyncio.run(ObjectStore(settings).put_new(orphan, b"left by a flush that never committed"))
    outside = f"not-records/{uuid.uuid4().hex}"
    asyncio.run(ObjectStore(settings).put_new(outside, b"not ours to collect"))

    name = _name("expiring")
    path = f"/v1/stream/{name}"
    with httpx.Client(base_url=busy_maintainer, headers=bearer(tenant.key), timeout=30) as client:
        created = client.put(path, headers={**JSON, "Stream-TTL": "1"}, content=b"[1, 2, 3]")
        assert created.status_code == 201
        keys = _keys(db, name, "batch")
        assert keys
        eventually(
            lambda: db("fetchval", "SELECT count(*) FROM streams WHERE name = $1", name) == 0, timeout=30
        )
        eventually(
            lambda: (
                db("fetchval", "SELECT count(*) FROM stream_objects WHERE key = ANY($1)", list(keys)) == 0
            ),
            timeout=30,
        )
        assert not any(_stored(settings, key) for key in keys)
        assert_error(client.get(path, params={"offset": "-1"}), 404, "stream_not_found")
        assert client.put(path, headers=JSON).status_code == 201

    eventually(lambda: not _stored(settings, orphan), timeout=60)
    assert _stored(settings, outside), "the collector deleted an object outside its prefixes"
