"""Durable Streams subscriptions against live servers: who may create what, pattern matching over
session channels, leases and fencing, webhook signing, retries and the host allow-list, and state
that survives a restart. (The protocol's own checks run in tests/test_conformance.py; the agent
worker pool under kill -9 in tests/test_agent_workers.py.)"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.conftest import (
    ServerThread,
    Tenant,
    assert_error,
    bearer,
    eventually,
    settings_for,
)
from tests.test_auth import make_jwt
from threadline.embedded.stack import StackEndpoints
from threadline.subscriptions.patterns import matches, sql_regex

SUBS = "/v1/stream/__ds/subscriptions/"


def _id(prefix: str = "sub") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def offset(n: int) -> str:
    return f"{0:016d}_{n:016d}"


@pytest.fixture(scope="module")
def signing_secret(db: Any, tenant: Tenant) -> str:
    secret: str = db(
        "fetchval", "SELECT signing_secret FROM environments WHERE id = $1", tenant.environment_id
    )
    return secret


def _pull_wake(client: httpx.Client, sub: str, **body: Any) -> httpx.Response:
    wake = f"wake/{sub}"
    assert client.put(f"/v1/stream/{wake}", headers={"Content-Type": "application/json"}).status_code in (
        200,
        201,
    )
    return client.put(SUBS + sub, json={"type": "pull-wake", "wake_stream": wake, **body})


def _session(client: httpx.Client, type_: str) -> str:
    created = client.post("/api/v1/sessions", json={"type": type_})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    return session_id


def _send(client: httpx.Client, stream: str, value: Any) -> None:
    response = client.post(f"/v1/stream/{stream}", json=value)
    assert response.status_code in (200, 204), response.text


def _claim(client: httpx.Client, sub: str, worker: str = "w1") -> httpx.Response:
    return client.post(SUBS + sub + "/claim", json={"worker": worker})


def _ack(
    client: httpx.Client, sub: str, claim: dict[str, Any], acks: dict[str, str], *, done: bool = True
) -> httpx.Response:
    body = {
        "wake_id": claim["wake_id"],
        "generation": claim["generation"],
        "acks": [{"stream": s, "offset": o} for s, o in acks.items()],
        "done": done,
    }
    return client.post(SUBS + sub + "/ack", json=body, headers=bearer(claim["token"]))


# --- auth ----------------------------------------------------------------------------------


def test_scopes_decide_who_may_subscribe_to_what(
    client: httpx.Client, anon: httpx.Client, signing_secret: str, tenant: Tenant
) -> None:
    env = tenant.environment_id
    mine, theirs = _session(client, "chat"), _session(client, "chat")

    def as_(scopes: list[str]) -> dict[str, str]:
        return bearer(make_jwt(signing_secret, env, scopes))

    sub = _id()
    pattern = {"type": "pull-wake", "pattern": "sessions/*/in", "wake_stream": f"wake/{sub}"}
    assert client.put(f"/v1/stream/wake/{sub}").status_code == 201
    assert_error(anon.put(SUBS + sub, json=pattern), 401)
    # Reading every session is not managing subscriptions; managing them is not reading everything.
    assert_error(client.put(SUBS + sub, json=pattern, headers=as_(["read:sessions"])), 403, "forbidden")
    assert_error(
        client.put(SUBS + sub, json=pattern, headers=as_(["write:subscriptions", f"read:sessions:{mine}"])),
        403,
        "forbidden",
    )
    # Explicit channels: read on each one is enough, and another session's channel is refused.
    explicit = {"type": "pull-wake", "streams": [f"sessions/{mine}/in"], "wake_stream": f"wake/{sub}"}
    scoped = as_(["write:subscriptions", f"read:sessions:{mine}", "write:sessions"])
    assert_error(
        client.put(SUBS + sub, json={**explicit, "streams": [f"sessions/{theirs}/in"]}, headers=scoped), 403
    )
    created = client.put(SUBS + sub, json=explicit, headers=scoped)
    assert created.status_code == 201, created.text
    # Reading a subscription needs read:subscriptions; claiming needs write.
    assert client.get(SUBS + sub, headers=as_(["read:subscriptions"])).status_code == 200
    assert_error(client.get(SUBS + sub, headers=as_(["read:sessions"])), 403)
    assert_error(_claim_as(client, sub, as_(["read:subscriptions"])), 403)
    # The same configuration again re-confirms; a different one under the same id is refused.
    assert client.put(SUBS + sub, json=explicit).status_code == 200
    assert_error(client.put(SUBS + sub, json={**explicit, "lease_ttl_ms": 5000}), 409, "subscription_exists")
    # Subscriptions belong to an environment: another one's credentials do not see them.
    assert client.delete(SUBS + sub).status_code == 204
    assert_error(client.get(SUBS + sub), 404, "subscription_not_found")


def _claim_as(client: httpx.Client, sub: str, headers: dict[str, str]) -> httpx.Response:
    return client.post(SUBS + sub + "/claim", json={"worker": "w"}, headers=headers)


def test_bad_subscription_bodies_are_400(client: httpx.Client) -> None:
    sub = _id()
    assert_error(client.put(SUBS + sub, json={"type": "pull-wake", "wake_stream": "x"}), 400)  # no streams
    assert_error(client.put(SUBS + sub, json={"type": "webhook", "pattern": "a/*"}), 400)  # no url
    assert_error(
        client.put(SUBS + sub, json={"type": "pull-wake", "pattern": "a/**b", "wake_stream": "x"}), 400
    )
    assert_error(
        client.put(SUBS + sub, json={"type": "pull-wake", "pattern": "a/*", "wake_stream": f"missing/{sub}"}),
        400,
    )
    assert_error(client.put(SUBS + "bad%20id", json={"type": "pull-wake", "pattern": "a/*"}), 400)
    assert_error(client.put("/v1/stream/__ds/mine"), 400, "invalid_stream_name")  # reserved namespace
    assert_error(client.get(SUBS + sub), 404, "subscription_not_found")


# --- patterns ------------------------------------------------------------------------------


def test_a_pattern_with_a_session_type_links_only_those_sessions_in_channels(client: httpx.Client) -> None:
    type_a, type_b = f"chat-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    before = _session(client, type_a)
    _send(client, f"sessions/{before}/in", {"text": "history"})
    sub = _id()
    created = _pull_wake(client, sub, pattern="sessions/*/in", session_type=type_a, lease_ttl_ms=1000)
    assert created.status_code == 201, created.text
    # Existing matches are linked at their tails: creating a subscription replays nothing.
    streams = {s["path"]: s for s in created.json()["streams"]}
    assert streams[f"sessions/{before}/in"] == {
        "path": f"sessions/{before}/in",
        "link_type": "glob",
        "acked_offset": offset(1),
    }
    a, b = _session(client, type_a), _session(client, type_b)
    for session in (a, b):
        _send(client, f"sessions/{session}/in", {"text": "hi"})
        _send(client, f"sessions/{session}/out", {"text": "not a user message"})

    def linked() -> set[str]:
        return {s["path"] for s in client.get(SUBS + sub).json()["streams"]}

    eventually(lambda: f"sessions/{a}/in" in linked(), timeout=60)
    claim = _claim(client, sub)
    assert claim.status_code == 200, claim.text
    pending = {s["path"]: s for s in claim.json()["streams"] if s["has_pending"]}
    # A stream discovered by an append is linked before it: the append is pending.
    assert pending == {
        f"sessions/{a}/in": {
            "path": f"sessions/{a}/in",
            "link_type": "glob",
            "acked_offset": offset(0),
            "tail_offset": offset(1),
            "has_pending": True,
        }
    }
    assert linked() == {f"sessions/{before}/in", f"sessions/{a}/in"}
    assert _ack(client, sub, claim.json(), {f"sessions/{a}/in": offset(1)}).json() == {
        "ok": True,
        "next_wake": False,
    }


def test_a_pattern_links_a_stream_in_the_transaction_that_creates_it(client: httpx.Client) -> None:
    """No window between a stream's birth and its link: an empty stream, a session's channel and
    a fork are linked when their creation is answered (no waiting), a fork at its own first
    offset (its inherited records are not new work), and nothing the pattern does not match."""
    room, kind = f"born-{uuid.uuid4().hex[:6]}", f"chat-{uuid.uuid4().hex[:6]}"
    sub, by_type = _id(), _id()
    assert _pull_wake(client, sub, pattern=f"{room}/*").status_code == 201
    assert _pull_wake(client, by_type, pattern="sessions/*/in", session_type=kind).status_code == 201

    def links(subscription: str) -> dict[str, str]:
        return {s["path"]: s["acked_offset"] for s in client.get(SUBS + subscription).json()["streams"]}

    assert (
        client.put(f"/v1/stream/{room}/empty", headers={"Content-Type": "application/json"}).status_code
        == 201
    )
    assert links(sub) == {f"{room}/empty": offset(0)}
    assert client.put(f"/v1/stream/{room}/source", json=[{"n": 1}, {"n": 2}, {"n": 3}]).status_code == 201
    fork = client.put(
        f"/v1/stream/{room}/fork",
        headers={
            "Content-Type": "application/json",
            "Stream-Forked-From": f"{room}/source",
            "Stream-Fork-Offset": offset(2),
        },
    )
    assert fork.status_code == 201, fork.text
    assert client.put(f"/v1/stream/{room}/deeper/no", json=[]).status_code == 201  # * is one segment
    assert links(sub) == {f"{room}/empty": offset(0), f"{room}/source": offset(0), f"{room}/fork": offset(2)}
    session, other = _session(client, kind), _session(client, f"other-{kind}")
    assert links(by_type) == {f"sessions/{session}/in": offset(0)}
    assert f"sessions/{other}/in" not in links(by_type)


def test_postgres_matches_a_pattern_as_the_server_does(db: Any) -> None:
    """The creation trigger matches with sql_regex in Postgres, the server with matches() in
    Python: the two must agree, on every wildcard form and on punctuation a segment may hold."""
    patterns = [
        "events/*", "a/**", "**", "a/**/c", "sessions/*/in", "pre*post/q", "*/*", "x-y.z/~a&b/*",
        "a+b/(c)/$d", "*.json", "a/*/**", "it's/=,;!@:/*",
    ]  # fmt: skip
    names = [
        "events/x", "events/x/y", "events", "eventsx/y", "a", "a/b", "a/b/c", "a/c", "ab/c",
        "sessions/s1/in", "sessions/s1/out", "sessions//in", "prepost/q", "pre-x-post/q", "pre/post/q",
        "x-y.z/~a&b/k", "xxy.z/~a&b/k", "a+b/(c)/$d", "aab/(c)/$d", "f.json", "fxjson", "a/b/c/d",
        "it's/=,;!@:/z",
    ]  # fmt: skip
    pairs = [(p, n) for p in patterns for n in names]
    rows = db(
        "fetch",
        "SELECT u.n ~ u.r AS m FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(n, r, i) ORDER BY i",
        [n for _, n in pairs],
        [sql_regex(p) for p, _ in pairs],
    )
    disagreements = [
        (p, n, row["m"]) for (p, n), row in zip(pairs, rows, strict=True) if row["m"] != matches(p, n)
    ]
    assert not disagreements
    assert sum(matches(p, n) for p, n in pairs) > 20  # the comparison covers matches, not only misses


def test_explicit_links_are_added_and_removed_beside_the_pattern(client: httpx.Client) -> None:
    sub, room = _id(), f"rooms-{uuid.uuid4().hex[:6]}"
    client.put(f"/v1/stream/{room}/a", json=[])
    assert _pull_wake(client, sub, pattern=f"{room}/*").status_code == 201
    assert (
        client.post(SUBS + sub + "/streams", json={"streams": [f"{room}/a", "elsewhere/x"]}).status_code
        == 204
    )
    kinds = {s["path"]: s["link_type"] for s in client.get(SUBS + sub).json()["streams"]}
    assert kinds == {f"{room}/a": "explicit", "elsewhere/x": "explicit"}  # explicit wins in answers
    for path in (f"{room}/a", "elsewhere/x", "never/linked"):
        assert client.delete(SUBS + sub + "/streams/" + path.replace("/", "%2F")).status_code == 204
    # The glob link stays where the pattern still matches.
    assert {s["path"]: s["link_type"] for s in client.get(SUBS + sub).json()["streams"]} == {
        f"{room}/a": "glob"
    }


# --- leases and fencing --------------------------------------------------------------------


def test_one_claim_wins_and_an_expired_lease_fences_its_holder(client: httpx.Client) -> None:
    sub, stream = _id(), f"jobs/{uuid.uuid4().hex[:8]}"
    assert _pull_wake(client, sub, streams=[stream], lease_ttl_ms=1000).status_code == 201
    client.put(f"/v1/stream/{stream}", json=[{"n": 1}, {"n": 2}])
    # Ten workers race: exactly one holds the lease, the others hear who does.
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: _claim(client, sub, f"w{i}"), range(10)))
    won = [a for a in answers if a.status_code == 200]
    assert len(won) == 1, [a.text for a in answers]
    first = won[0].json()
    holder = next(f"w{i}" for i, a in enumerate(answers) if a.status_code == 200)
    for lost in (a for a in answers if a.status_code != 200):
        body = assert_error(lost, 409, "ALREADY_CLAIMED")
        assert body["current_holder"] == holder
        assert body["generation"] == first["generation"]
    assert [s["tail_offset"] for s in first["streams"]] == [offset(2)]
    # A heartbeat (ack without done) moves the cursor and keeps the lease.
    assert _ack(client, sub, first, {stream: offset(1)}, done=False).json() == {
        "ok": True,
        "next_wake": False,
    }
    # Once the lease runs out another worker takes the next generation from the acked offset...
    second = eventually(lambda: _claim_when_free(client, sub, "late"), timeout=60)
    assert second["generation"] > first["generation"]
    assert [(s["acked_offset"], s["tail_offset"]) for s in second["streams"]] == [(offset(1), offset(2))]
    # ...and the old holder is fenced: its ack changes nothing.
    assert_error(_ack(client, sub, first, {stream: offset(2)}), 409, "FENCED")
    stale = {**second, "generation": first["generation"]}
    assert_error(_ack(client, sub, stale, {stream: offset(2)}), 409, "FENCED")
    forged = {**second, "token": second["token"][:-4] + "AAAA"}
    assert_error(_ack(client, sub, forged, {stream: offset(2)}), 409, "FENCED")
    assert client.get(SUBS + sub).json()["streams"][0]["acked_offset"] == offset(1)
    # An ack past the tail is a 400 and changes nothing either.
    assert_error(_ack(client, sub, second, {stream: offset(9)}), 400, "offset_out_of_range")
    assert _ack(client, sub, second, {stream: offset(2)}).json() == {"ok": True, "next_wake": False}
    assert client.get(SUBS + sub).json()["streams"][0]["acked_offset"] == offset(2)
    # Deleted: the holder's token is worthless.
    third = _claim(client, sub).json()
    assert client.delete(SUBS + sub).status_code == 204
    assert_error(_ack(client, sub, third, {}), 409, "FENCED")


def _claim_when_free(client: httpx.Client, sub: str, worker: str) -> dict[str, Any] | None:
    answer = _claim(client, sub, worker)
    if answer.status_code == 409:
        return None  # still held
    assert answer.status_code == 200, answer.text
    claimed: dict[str, Any] = answer.json()
    return claimed


def test_pull_wake_writes_wake_events_and_a_release_wakes_again(client: httpx.Client) -> None:
    sub, stream = _id(), f"jobs/{uuid.uuid4().hex[:8]}"
    assert _pull_wake(client, sub, streams=[stream], lease_ttl_ms=1000).status_code == 201
    client.put(f"/v1/stream/{stream}", json=[{"n": 1}])

    def wakes() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = client.get(f"/v1/stream/wake/{sub}", params={"offset": "-1"}).json()
        return [e for e in events if e["subscription_id"] == sub]

    first = eventually(wakes, timeout=60)
    assert first[0]["type"] == "wake"
    assert first[0]["stream"] == stream
    claim = _claim(client, sub).json()
    release = client.post(
        SUBS + sub + "/release",
        json={"wake_id": claim["wake_id"], "generation": claim["generation"]},
        headers=bearer(claim["token"]),
    )
    assert release.status_code == 204
    # Work is left: another wake is written for the next claimer.
    eventually(lambda: len(wakes()) > len(first), timeout=60)


# --- webhooks ------------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint on 127.0.0.1 that fails its first ``failures`` deliveries with a 500."""

    def __init__(self, *, failures: int = 0, answer: dict[str, Any] | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        received, state = self.requests, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                failing = len(received) <= state.failures
                payload = json.dumps({} if failing else (answer or {})).encode()
                self.send_response(500 if failing else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hooks_server(stack: StackEndpoints) -> Iterator[str]:
    """A server that may call 127.0.0.1 (and nothing else), sweeping often."""
    settings = settings_for(stack, webhook_allowed_hosts="127.0.0.1", subscription_sweep_seconds=0.2)
    with ServerThread(settings) as url:
        yield url


@pytest.fixture
def hooks(hooks_server: str, tenant: Tenant) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hooks_server, headers=bearer(tenant.key), timeout=30) as c:
        yield c


def _verify(headers: dict[str, str], body: bytes, jwks: dict[str, Any]) -> bool:
    fields = dict(part.split("=", 1) for part in headers["webhook-signature"].split(","))
    key = next(k for k in jwks["keys"] if k["kid"] == fields["kid"])
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"] + "=="))
    signature = base64.urlsafe_b64decode(fields["ed25519"] + "==")
    try:
        public.verify(signature, f"{fields['t']}.".encode() + body)
    except Exception:
        return False
    return True


def test_webhooks_only_go_where_the_operator_allows(hooks: httpx.Client, client: httpx.Client) -> None:
    def put(url: str, on: httpx.Client = hooks) -> httpx.Response:
        return on.put(SUBS + _id(), json={"type": "webhook", "pattern": "x/*", "webhook": {"url": url}})

    for url in (
        "http://10.0.0.1/hook",  # private
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "http://localhost:9/hook",  # loopback, but not the listed host
        "https://example.com/hook",  # public, but not listed
        "ftp://127.0.0.1/hook",
        "http://user:pw@127.0.0.1/hook",
    ):
        assert_error(put(url), 400, "WEBHOOK_URL_REJECTED")
    assert put("http://127.0.0.1:9/hook").status_code == 201  # listed exactly
    # The default server allows no webhook host at all.
    assert_error(put("http://127.0.0.1:9/hook", on=client), 400, "WEBHOOK_URL_REJECTED")


def test_webhook_is_signed_retried_with_backoff_and_done_acks_its_snapshot(hooks: httpx.Client) -> None:
    receiver = Receiver(failures=2, answer={"done": True})
    try:
        sub, stream = _id(), f"events-{uuid.uuid4().hex[:6]}/a"
        created = hooks.put(
            SUBS + sub, json={"type": "webhook", "streams": [stream], "webhook": {"url": receiver.url}}
        )
        assert created.status_code == 201, created.text
        signing = created.json()["webhook"]["signing"]
        assert created.json()["webhook"]["url"] == receiver.url
        assert "secret" not in created.text
        jwks_response = hooks.get("/v1/stream/__ds/jwks.json", headers={"Authorization": ""})
        assert jwks_response.headers["content-type"].startswith("application/jwk-set+json")
        jwks = jwks_response.json()
        assert signing["kid"] in {k["kid"] for k in jwks["keys"]}
        hooks.put(f"/v1/stream/{stream}", json=[{"n": 1}, {"n": 2}])
        # Two failures, each recorded as a retry (status "failed"), then a delivery that is done.
        eventually(lambda: len(receiver.requests) >= 3, timeout=60)
        eventually(
            lambda: hooks.get(SUBS + sub).json()["streams"][0]["acked_offset"] == offset(2), timeout=60
        )
        bodies = [json.loads(body) for _, body in receiver.requests]
        assert all(_verify(headers, body, jwks) for headers, body in receiver.requests)
        assert [b["generation"] for b in bodies] == sorted(
            {b["generation"] for b in bodies}
        )  # a new wake each
        assert bodies[-1]["streams"] == [
            {
                "path": stream,
                "link_type": "explicit",
                "acked_offset": offset(0),
                "tail_offset": offset(2),
                "has_pending": True,
            }
        ]
        assert bodies[-1]["callback_url"].endswith(f"/v1/stream/__ds/subscriptions/{sub}/callback")
        assert hooks.get(SUBS + sub).json()["status"] == "active"
        # A tampered body does not verify (the check above is not vacuous).
        headers, body = receiver.requests[-1]
        assert not _verify(headers, body.replace(b'"has_pending":true', b'"has_pending":false'), jwks)
    finally:
        receiver.close()


def test_webhook_callback_acks_and_a_second_one_is_fenced(hooks: httpx.Client) -> None:
    receiver = Receiver()
    try:
        sub, stream = _id(), f"events-{uuid.uuid4().hex[:6]}/b"
        assert (
            hooks.put(
                SUBS + sub, json={"type": "webhook", "streams": [stream], "webhook": {"url": receiver.url}}
            ).status_code
            == 201
        )
        hooks.put(f"/v1/stream/{stream}", json=[{"n": 1}])
        eventually(lambda: receiver.requests, timeout=60)
        wake = json.loads(receiver.requests[-1][1])
        ack = {
            "wake_id": wake["wake_id"],
            "generation": wake["generation"],
            "acks": [{"stream": stream, "offset": offset(1)}],
            "done": True,
        }
        answer = httpx.post(wake["callback_url"], json=ack, headers=bearer(wake["callback_token"]))
        assert answer.json() == {"ok": True, "next_wake": False}
        assert_error(
            httpx.post(wake["callback_url"], json=ack, headers=bearer(wake["callback_token"])), 409, "FENCED"
        )
    finally:
        receiver.close()


def test_an_instance_that_may_not_call_a_host_leaves_its_wakes_to_one_that_may(
    hooks: httpx.Client, client: httpx.Client
) -> None:
    """Two instances on one database with different allow-lists (a rolling change of
    THREADLINE_WEBHOOK_ALLOWED_HOSTS): appends land on the instance that may not call 127.0.0.1,
    which learns of them first. It must not take the wake and fail it (a failure costs a
    generation and holds delivery back by the retry backoff): every wake reaches the receiver,
    one generation per append, none failed."""
    receiver = Receiver(answer={"done": True})
    rounds = 8
    try:
        sub, stream = _id(), f"events-{uuid.uuid4().hex[:6]}/policy"
        created = hooks.put(
            SUBS + sub, json={"type": "webhook", "streams": [stream], "webhook": {"url": receiver.url}}
        )
        assert created.status_code == 201, created.text
        assert (
            client.put(f"/v1/stream/{stream}", headers={"Content-Type": "application/json"}).status_code
            == 201
        )
        for n in range(1, rounds + 1):
            _send(client, stream, {"n": n})  # through the instance that does not allow the host
            eventually(
                lambda n=n: hooks.get(SUBS + sub).json()["streams"][0]["acked_offset"] == offset(n),
                timeout=60,
            )
        generations = [json.loads(body)["generation"] for _, body in receiver.requests]
        assert generations == list(range(1, rounds + 1)), generations
        assert hooks.get(SUBS + sub).json()["status"] == "active"
    finally:
        receiver.close()


# --- restarts ------------------------------------------------------------------------------


def test_a_claim_and_its_cursors_survive_a_server_restart(stack: StackEndpoints, tenant: Tenant) -> None:
    settings = settings_for(stack, subscription_sweep_seconds=0.2)
    sub, stream = _id(), f"jobs/{uuid.uuid4().hex[:8]}"
    with (
        ServerThread(settings) as url,
        httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as c,
    ):
        assert _pull_wake(c, sub, streams=[stream], lease_ttl_ms=60_000).status_code == 201
        c.put(f"/v1/stream/{stream}", json=[{"n": 1}, {"n": 2}, {"n": 3}])
        claim = _claim(c, sub).json()
    # Another process (here: a fresh server) serves the same subscription from Postgres.
    with (
        ServerThread(settings) as url,
        httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as c,
    ):
        assert_error(_claim(c, sub, "w2"), 409, "ALREADY_CLAIMED")  # the lease outlived the restart
        assert _ack(c, sub, claim, {stream: offset(2)}, done=True).json() == {"ok": True, "next_wake": True}
        again = _claim(c, sub, "w2").json()
        assert again["generation"] > claim["generation"]
        assert [(s["acked_offset"], s["tail_offset"]) for s in again["streams"]] == [(offset(2), offset(3))]


def test_a_pattern_never_links_its_own_wake_stream(client: httpx.Client) -> None:
    """Otherwise each wake event would be new work, and waking would never stop."""
    sub, room = _id(), f"loop-{uuid.uuid4().hex[:6]}"
    wake = f"{room}/wake"
    assert client.put(f"/v1/stream/{wake}", headers={"Content-Type": "application/json"}).status_code == 201
    body = {"type": "pull-wake", "pattern": f"{room}/**", "wake_stream": wake, "lease_ttl_ms": 1000}
    created = client.put(SUBS + sub, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["streams"] == []
    assert client.put(f"/v1/stream/{room}/data", json=[{"n": 1}]).status_code == 201
    eventually(lambda: client.get(f"/v1/stream/{wake}", params={"offset": "-1"}).json(), timeout=60)
    linked = {s["path"] for s in client.get(SUBS + sub).json()["streams"]}
    assert linked == {f"{room}/data"}
