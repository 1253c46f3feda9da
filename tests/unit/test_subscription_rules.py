"""The pure rules behind subscriptions: glob patterns, the webhook host allow-list, retry backoff,
webhook signatures, configuration hashes and wake tokens."""

from __future__ import annotations

import asyncio
import base64
import random

import pytest
from cryptography.exceptions import InvalidSignature
from hypothesis import given
from hypothesis import strategies as st

from threadline.errors import AlreadyClaimed, ValidationFailed, WebhookUrlRejected
from threadline.subscriptions.models import SubscriptionSpec
from threadline.subscriptions.patterns import literal_prefix, matches, validate_pattern
from threadline.subscriptions.service import _new_token, _token_pk
from threadline.subscriptions.webhooks import SigningKey, WebhookPolicy, retry_delay_seconds, signature_header


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("events/*", "events/a", True),
        ("events/*", "events/a/b", False),
        ("events/*", "events", False),
        ("events/**", "events", True),
        ("events/**", "events/a/b/c", True),
        ("events/**", "eventsx/a", False),
        ("**/in", "sessions/s1/in", True),
        ("**/in", "in", True),
        ("sessions/*/in", "sessions/session_1/in", True),
        ("sessions/*/in", "sessions/session_1/out", False),
        ("sessions/*/in", "sessions/a/b/in", False),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        ("a/**/z", "a/b/c/y", False),
        ("logs/app-*", "logs/app-1", True),
        ("logs/app-*", "logs/web-1", False),
        ("a.b/*", "axb/c", False),  # "." is literal
        ("**", "anything/at/all", True),
    ],
)
def test_glob_patterns(pattern: str, path: str, expected: bool) -> None:
    assert matches(validate_pattern(pattern), path) is expected


@given(st.lists(st.from_regex(r"[a-z0-9_-]{1,6}", fullmatch=True), min_size=1, max_size=5))
def test_every_path_matches_itself_and_its_star_and_double_star_forms(segments: list[str]) -> None:
    path = "/".join(segments)
    assert matches(path, path)
    assert matches("/".join(["*"] * len(segments)), path)
    assert matches("**", path)
    assert matches(segments[0] + "/**", path)
    assert path.startswith(literal_prefix(segments[0] + "/**"))


@pytest.mark.parametrize("pattern", ["", "a//b", "a/../b", "a/**b", "a b", "a/./b"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValidationFailed):
        validate_pattern(pattern)


def test_literal_prefix_narrows_candidates() -> None:
    assert literal_prefix("sessions/*/in") == "sessions/"
    assert literal_prefix("logs/app-*") == "logs/app-"
    assert literal_prefix("exact/name") == "exact/name"


@pytest.mark.parametrize(
    ("allowed", "url", "ok"),
    [
        ("", "https://hooks.example.com/x", False),  # nothing allowed by default
        ("*", "https://hooks.example.com/x", True),
        ("*", "http://hooks.example.com/x", False),  # a wildcard means https only
        ("*", "https://10.0.0.1/x", False),  # and public addresses only
        ("*", "https://[::1]/x", False),
        ("*", "https://169.254.169.254/latest", False),
        ("*.example.com", "https://hooks.example.com/x", True),
        ("*.example.com", "https://example.org/x", False),
        ("*.example.com", "https://evilexample.com/x", False),
        ("127.0.0.1", "http://127.0.0.1:8000/hook", True),  # listed exactly: loopback and http ok
        ("127.0.0.1", "http://127.0.0.2/hook", False),
        ("127.0.0.1", "http://localhost/hook", False),
        ("hooks.internal", "http://hooks.internal/x", True),
        ("*", "ftp://example.com/x", False),
        ("*", "https://user:pw@example.com/x", False),
        ("*", "not a url", False),
        ("*", "https://example.com:99999/x", False),
        ("*", "https://[::ffff:10.0.0.1]/x", False),  # IPv4-mapped private address
    ],
)
def test_webhook_allow_list(allowed: str, url: str, ok: bool) -> None:
    policy = WebhookPolicy(allowed)
    if ok:
        policy.check_url(url)
    else:
        with pytest.raises(WebhookUrlRejected):
            policy.check_url(url)


def test_delivery_check_refuses_names_that_resolve_to_private_addresses() -> None:
    policy = WebhookPolicy("*")
    # "localhost" passes the shape check under "*" but resolves to loopback.
    with pytest.raises(WebhookUrlRejected):
        asyncio.run(policy.check_delivery("https://localhost/hook"))
    asyncio.run(policy.check_delivery("https://93.184.215.14/hook"))  # a public literal: no DNS


def test_retry_backoff_doubles_to_a_minute_with_jitter() -> None:
    rng = random.Random(1)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (30, 60.0)]:
        delays = [retry_delay_seconds(attempt, rng=rng) for _ in range(200)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > base * 0.2  # it is jittered


def test_signatures_verify_with_the_published_key_and_only_for_the_exact_body() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_private_bytes(key.private_bytes())
    assert again.kid == key.kid
    assert key.kid.startswith("ds_")
    assert SigningKey.generate().kid != key.kid
    body = b'{"subscription_id":"s"}'
    header = signature_header(key, 1_700_000_000, body)
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert fields["t"] == "1700000000"
    assert fields["kid"] == key.kid
    signature = base64.urlsafe_b64decode(fields["ed25519"] + "==")
    key.public.verify(signature, b"1700000000." + body)
    with pytest.raises(InvalidSignature):
        key.public.verify(signature, b"1700000001." + body)
    jwk = key.jwk()
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")


def test_config_hash_ignores_stream_order_and_sees_every_field() -> None:
    base = SubscriptionSpec.model_validate({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w"})
    assert base.config_hash(["x", "y"]) == base.config_hash(["y", "x", "x"])
    others = [
        {"type": "pull-wake", "pattern": "a/**", "wake_stream": "w"},
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w2"},
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 1000},
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "description": "d"},
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "session_type": "chat"},
    ]
    hashes = {SubscriptionSpec.model_validate(o).config_hash(["x", "y"]) for o in others}
    assert base.config_hash(["x", "y"]) not in hashes
    assert len(hashes) == len(others)


def test_wake_tokens_name_their_row_and_nothing_else_parses() -> None:
    token = _new_token(42)
    assert _token_pk(token) == 42
    assert _new_token(42) != token
    for bad in (
        "",
        "tl_sk_abc",
        "tlw_x_abc",
        "tlw_42_",
        "tlw__abc",
        "Bearer tlw_1_a",
        "tlw_" + "9" * 30 + "_a",
    ):
        assert _token_pk(bad) is None, bad


def test_already_claimed_carries_its_holder_beside_the_code_and_in_details() -> None:
    error = AlreadyClaimed("busy", current_holder="w2", generation=7)
    body = error.body()["error"]
    assert (body["code"], body["current_holder"], body["generation"]) == ("ALREADY_CLAIMED", "w2", 7)
    # What the SDK rebuilds from an answer keeps them.
    rebuilt = AlreadyClaimed("busy", details=body["details"])
    assert (rebuilt.current_holder, rebuilt.generation) == ("w2", 7)
