"""The SDK's retry decisions (no I/O): which answers are tried again and which are not."""

from __future__ import annotations

import httpx
import pytest

from threadline.client._config import RetryPolicy
from threadline.client._requests import Request
from threadline.client._transport import Attempts
from threadline.errors import DatabaseUnavailable, OutcomeUnknown

APPEND = Request("POST", "/v1/stream/s", body=b"x")
PRODUCER_APPEND = Request("POST", "/v1/stream/s", body=b"x", idempotent=True)


def answer(code: str) -> httpx.Response:
    body = {"error": {"code": code, "message": code}}
    return httpx.Response(503, json=body, headers={"Retry-After": "1"})


def test_a_503_that_says_nothing_was_stored_is_retried() -> None:
    attempts = Attempts(RetryPolicy(), APPEND, refreshable=False)
    assert attempts.after_response(answer("database_unavailable")) == 1.0
    assert attempts.attempt == 1


def test_an_unknown_outcome_is_never_resent_for_a_plain_append() -> None:
    attempts = Attempts(RetryPolicy(), APPEND, refreshable=False)
    with pytest.raises(OutcomeUnknown):
        attempts.after_response(answer("outcome_unknown"))
    assert attempts.attempt == 0


def test_an_unknown_outcome_is_resent_when_a_producer_makes_it_safe() -> None:
    attempts = Attempts(RetryPolicy(), PRODUCER_APPEND, refreshable=False)
    assert attempts.after_response(answer("outcome_unknown")) == 1.0


def test_retries_end_with_the_last_answer_as_an_error() -> None:
    attempts = Attempts(RetryPolicy(max_retries=1), APPEND, refreshable=False)
    attempts.after_response(answer("database_unavailable"))
    with pytest.raises(DatabaseUnavailable):
        attempts.after_response(answer("database_unavailable"))
