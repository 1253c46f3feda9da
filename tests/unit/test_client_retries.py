"""The SDK's retry decisions (no I/O): which answers are tried again and which are not."""

from __future__ import annotations

import httpx
import pytest

from threadline.client._config import RetryPolicy
from threadline.client._errors import GatewayFailed, error_from_response
from threadline.client._requests import Request
from threadline.client._transport import Attempts
from threadline.errors import DatabaseUnavailable, InternalError, OutcomeUnknown

APPEND = Request("POST", "/v1/stream/s", body=b"x")
READ = Request("GET", "/v1/stream/s")
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


def proxy_page(status: int) -> httpx.Response:
    return httpx.Response(status, text="<html><body><h1>502 Bad Gateway</h1>nginx</body></html>")


@pytest.mark.parametrize("status", [502, 504])
def test_a_proxys_bare_502_or_504_is_retried_only_where_a_repeat_cannot_apply_twice(status: int) -> None:
    # A read, or an append under producer numbers: sent again after the backoff.
    for request in (READ, PRODUCER_APPEND):
        attempts = Attempts(RetryPolicy(), request, refreshable=False)
        assert attempts.after_response(proxy_page(status)) is not None
        assert attempts.attempt == 1
    # A plain append may have been stored: raised, never resent.
    attempts = Attempts(RetryPolicy(), APPEND, refreshable=False)
    with pytest.raises(GatewayFailed) as raised:
        attempts.after_response(proxy_page(status))
    assert raised.value.status_code == status
    assert attempts.attempt == 0


def test_retries_of_a_proxys_502_end_with_gateway_failed() -> None:
    attempts = Attempts(RetryPolicy(max_retries=1), READ, refreshable=False)
    attempts.after_response(proxy_page(502))
    with pytest.raises(GatewayFailed):
        attempts.after_response(proxy_page(502))


def test_only_a_bare_502_is_a_proxys_a_500_stays_an_internal_error() -> None:
    assert isinstance(error_from_response(502, {}, b"<html>bad gateway</html>"), GatewayFailed)
    assert isinstance(error_from_response(500, {}, b"<html>oops</html>"), InternalError)
    body = b'{"error": {"code": "internal_error", "message": "boom"}}'
    assert isinstance(error_from_response(502, {}, body), InternalError)  # a JSON error is the server's
