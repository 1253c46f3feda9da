"""Other clients of the Durable Streams protocol against Threadline, checked through the SDK.

- The official Python client (PyPI ``durable-streams``) writes and reads a session channel
  (``/v1/stream/sessions/<id>/out``, with a secret key or a minted session token as its bearer
  header) and stand-alone streams (JSON and bytes); what it writes is read back through
  ``threadline.client`` and what the SDK writes is read through it, compared exactly.
- The official Node client (npm ``@durable-streams/client``, the one the conformance suite is
  built on, installed in ``conformance/``) appends JSON and byte records, plainly and through its
  idempotent producer; the SDK reads them back exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from durable_streams import (
    DurableStream,
    DurableStreamError,
    HeadersLike,
    SeqConflictError,
    StreamNotFoundError,
)

from tests.conftest import REPO_ROOT, Tenant, eventually
from threadline.client import Channel, StreamNotFound, Threadline

JSON = "application/json"
BYTES = "application/octet-stream"

# A spread of JSON values: nesting, unicode (beyond the BMP too), escapes, numbers, null.
VALUES: list[Any] = [
    {"role": "assistant", "text": "héllo wörld 👋"},
    {"nested": {"list": [1, 2.5, -3], "empty": {}, "none": None}},
    'a string with "quotes", a\ttab and a\nnewline',
    12345678901234,
    -0.5,
    True,
    None,
    [],
    ["an", "array", "value"],
]


@pytest.fixture
def tl(base_url: str, tenant: Tenant) -> Iterator[Threadline]:
    with Threadline(base_url, tenant.key) as client:
        yield client


def bearer(token: str) -> HeadersLike:
    return {"Authorization": f"Bearer {token}"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sdk_values(channel: Channel) -> list[Any]:
    return [record.value for record in channel.subscribe("-1", follow=False)]


def sdk_bytes(channel: Channel) -> bytes:
    return b"".join(record.value for record in channel.subscribe("-1", follow=False))


def ds_values(handle: DurableStream, offset: str = "-1") -> list[Any]:
    with handle.stream(offset=offset, live=False) as response:
        return list(response.iter_json())


class Tail:
    """The Python client tailing a stream live on a thread, until it has read ``"last"``."""

    def __init__(self, handle: DurableStream, offset: str, live: Any) -> None:
        self.values: list[Any] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(handle, offset, live), daemon=True).start()

    def _run(self, handle: DurableStream, offset: str, live: Any) -> None:
        try:
            with handle.stream(offset=offset, live=live) as response:
                for value in response.iter_json():
                    self.values.append(value)
                    if value == "last":
                        break
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> list[Any]:
        eventually(self.done.is_set, timeout=60)
        assert self.error is None, self.error
        return self.values


def tail_in_thread(handle: DurableStream, offset: str, live: Any) -> Tail:
    return Tail(handle, offset, live)


# --- the Python client: durable-streams ------------------------------------------------------


@pytest.mark.parametrize("credential", ["secret key", "session token"])
def test_python_client_writes_and_reads_a_session_channel(
    tl: Threadline, base_url: str, tenant: Tenant, credential: str
) -> None:
    session = tl.sessions.create("interop")
    token = tenant.key
    if credential == "session token":
        token = tl.sessions.mint_token(session.id, expires_in_seconds=600).token
    url = f"{base_url}/v1/stream/sessions/{session.id}/out"

    with DurableStream.connect(url, headers=bearer(token), batching=False) as handle:
        assert handle.content_type == JSON  # from HEAD: session channels are JSON streams
        offsets = [handle.append(value).next_offset for value in VALUES]
        # One record per append (a list is one record too: the client wraps it), each
        # acknowledged at the offset the SDK reads after it.
        records = list(session.out.subscribe("-1", follow=False))
        assert [record.value for record in records] == VALUES
        assert [record.offset for record in records] == offsets

        session.out.append(["from", "the", {"sdk": True}])  # three records
        assert ds_values(handle) == [*VALUES, "from", "the", {"sdk": True}]
        assert ds_values(handle, offsets[-1]) == ["from", "the", {"sdk": True}]
        assert ds_values(handle, "now") == []

        # Live: the client tails the channel (long-poll, then SSE) while the SDK appends.
        for live in ("long-poll", "sse"):
            start = session.out.info().next_offset
            tailed = tail_in_thread(handle, start, live)
            session.out.append({"live": live})
            session.out.append([{"also": live}, "last"])
            assert tailed.wait() == [{"live": live}, {"also": live}, "last"]

    # The session's `in` channel through the batching client (one POST for concurrent appends).
    with DurableStream(
        f"{base_url}/v1/stream/sessions/{session.id}/in", headers=bearer(token), content_type=JSON
    ) as inbox:
        threads = [threading.Thread(target=inbox.append, args=({"n": i},)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
        assert sorted(value["n"] for value in sdk_values(session.in_)) == list(range(20))

        # Closed: every append is refused (the client maps any 409 to SeqConflictError; the
        # server's answer is 409 session_closed) and everything stays readable.
        tl.sessions.close(session.id)
        with pytest.raises(SeqConflictError):
            inbox.append({"too": "late"})
        assert len(sdk_values(session.in_)) == 20


def test_python_client_is_refused_what_the_credential_does_not_allow(
    tl: Threadline, base_url: str, tenant: Tenant
) -> None:
    session = tl.sessions.create("interop")
    other = tl.sessions.create("interop")
    token = tl.sessions.mint_token(session.id, expires_in_seconds=600).token
    with DurableStream(
        f"{base_url}/v1/stream/sessions/{other.id}/out", headers=bearer(token), content_type=JSON
    ) as handle:
        with pytest.raises(DurableStreamError) as refused:
            handle.append({"not": "mine"})
        assert refused.value.status == 403, refused.value
    assert sdk_values(other.out) == []
    with pytest.raises(StreamNotFoundError):
        DurableStream.connect(f"{base_url}/v1/stream/sessions/session_nope/out", headers=bearer(tenant.key))


def test_python_client_creates_writes_and_reads_standalone_streams(
    tl: Threadline, base_url: str, tenant: Tenant
) -> None:
    name = unique("interop/py-json")
    with DurableStream.create(
        f"{base_url}/v1/stream/{name}", content_type=JSON, headers=bearer(tenant.key), batching=False
    ) as handle:
        for value in VALUES:
            handle.append(value)
        stream = tl.streams.get(name)
        assert sdk_values(stream) == VALUES
        stream.append([{"sdk": 1}, {"sdk": 2}])
        assert ds_values(handle) == [*VALUES, {"sdk": 1}, {"sdk": 2}]

        # Stream-Seq: the client's writer coordination; a lower seq is refused.
        handle.append({"seq": "b"}, seq="b")
        with pytest.raises(SeqConflictError):
            handle.append({"seq": "a"}, seq="a")
        assert sdk_values(stream)[-1] == {"seq": "b"}
        assert handle.head().content_type == JSON

    name = unique("interop/py-bytes")
    chunks = [b"\x00\x01binary\xff", "text é".encode(), bytes(range(256))]
    with DurableStream.create(
        f"{base_url}/v1/stream/{name}", content_type=BYTES, headers=bearer(tenant.key), batching=False
    ) as handle:
        for chunk in chunks:
            handle.append(chunk)
        stream = tl.streams.get(name, content_type=BYTES)
        assert sdk_bytes(stream) == b"".join(chunks)
        stream.append(b"<sdk>")
        with handle.stream(offset="-1", live=False) as response:
            assert response.read_bytes() == b"".join(chunks) + b"<sdk>"
        handle.delete()
    with pytest.raises(StreamNotFound):
        tl.streams.get(name, content_type=BYTES).read()


# --- the Node client: @durable-streams/client ------------------------------------------------

NODE_SCRIPT = r"""
import { createRequire } from "node:module";

const [conformanceDir, baseUrl, key, jsonName, bytesName, channelUrl, channelToken] = process.argv.slice(2);
const require = createRequire(`${conformanceDir}/package.json`);
const { DurableStream, IdempotentProducer } = require("@durable-streams/client");

const auth = (token) => ({ Authorization: `Bearer ${token}` });
const values = JSON.parse(process.env.INTEROP_VALUES);

// JSON mode: a plain append per value, then a batch through the idempotent producer.
const json = await DurableStream.create({
  url: `${baseUrl}/v1/stream/${jsonName}`, contentType: "application/json", headers: auth(key),
});
for (const value of values) {
  await json.append(JSON.stringify(value));
}
const producer = new IdempotentProducer(json, "node-interop", { lingerMs: 5 });
for (let i = 0; i < 50; i++) producer.append(JSON.stringify({ producer: i }));
await producer.flush();
await producer.detach();
await json.close();  // EOF for readers

// Bytes mode.
const bytes = await DurableStream.create({
  url: `${baseUrl}/v1/stream/${bytesName}`, contentType: "application/octet-stream", headers: auth(key),
});
await bytes.append(new Uint8Array([0, 1, 2, 254, 255]));
await bytes.append("text é");

// A session channel, with a minted session token.
const channel = new DurableStream({ url: channelUrl, contentType: "application/json", headers: auth(channelToken) });
for (const value of values) {
  await channel.append(JSON.stringify(value));
}
const head = await channel.head();
console.log(JSON.stringify({ channelOffset: head.offset }));
"""


def test_sdk_reads_what_the_node_client_wrote(
    tl: Threadline, base_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node, "node not found: the interop test needs Node.js 20+ (as the conformance suite does)"
    conformance = REPO_ROOT / "conformance"
    assert (conformance / "node_modules/@durable-streams/client").is_dir(), "run `make install`"
    script = tmp_path / "write.mjs"
    script.write_text(NODE_SCRIPT)
    json_name, bytes_name = unique("interop/node-json"), unique("interop/node-bytes")
    session = tl.sessions.create("interop")
    token = tl.sessions.mint_token(session.id, expires_in_seconds=600).token
    channel_url = f"{base_url}/v1/stream/sessions/{session.id}/out"

    done = subprocess.run(
        [
            node,
            str(script),
            str(conformance),
            base_url,
            tenant.key,
            json_name,
            bytes_name,
            channel_url,
            token,
        ],
        env={"PATH": str(Path(node).parent), "INTEROP_VALUES": json.dumps(VALUES)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    written = [*VALUES, *({"producer": i} for i in range(50))]
    assert sdk_values(tl.streams.get(json_name)) == written
    # The Node client closed that stream: the SDK sees it closed, and a following subscription
    # reads everything and then ends.
    assert tl.streams.get(json_name).info().closed
    followed: list[Any] = []
    follower = threading.Thread(
        target=lambda: followed.extend(r.value for r in tl.streams.get(json_name).subscribe("-1")),
        daemon=True,
    )
    follower.start()
    follower.join(60)
    assert not follower.is_alive(), "the subscription did not end at the closed stream's end"
    assert followed == written
    assert (
        sdk_bytes(tl.streams.get(bytes_name, content_type=BYTES))
        == bytes([0, 1, 2, 254, 255]) + "text é".encode()
    )
    records = list(session.out.subscribe("-1", follow=False))
    assert [record.value for record in records] == VALUES
    assert json.loads(done.stdout)["channelOffset"] == records[-1].offset
