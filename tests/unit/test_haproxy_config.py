"""The committed HAProxy configuration against the server's own limits and the SDK's retry rules.

The balancer must not cut a healthy long-poll or SSE response, and its own error answers must be
read by clients the way the server's are: these tie ``deploy/haproxy/haproxy.cfg`` to the
settings and the error catalogue, so changing one without the other fails here.
"""

from __future__ import annotations

import json
import re

import annotated_types
import pytest

from threadline.client._errors import error_from_response
from threadline.config import Settings
from threadline.embedded.cluster import haproxy_template, render_haproxy_config
from threadline.errors import OutcomeUnknown, ServiceUnavailable

TEMPLATE = haproxy_template()
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    return int(match.group(1)) * _UNITS[match.group(2) or "ms"]  # HAProxy's default unit is ms


def _timeout(name: str) -> float:
    match = re.search(rf"^\s*timeout {name} (\S+)$", TEMPLATE, re.MULTILINE)
    assert match, f"timeout {name} is not set"
    return _seconds(match.group(1))


def _upper_bound(field: str) -> float:
    for constraint in Settings.model_fields[field].metadata:
        if isinstance(constraint, annotated_types.Le):
            return float(constraint.le)  # type: ignore[arg-type]
    raise AssertionError(f"{field} has no upper bound")


@pytest.mark.parametrize("side", ["client", "server"])
def test_inactivity_timeouts_outlast_the_longest_quiet_response(side: str) -> None:
    quietest = max(_upper_bound("long_poll_timeout_seconds"), _upper_bound("sse_heartbeat_seconds"))
    assert _timeout(side) > quietest


def test_nothing_holds_response_bytes_back() -> None:
    assert not re.search(r"^\s*(compression|option http-buffer-request)", TEMPLATE, re.MULTILINE)
    # Without it the kernel may merge an SSE event with what follows: ~100 ms more per delivery.
    assert re.search(r"^\s*option http-no-delay$", TEMPLATE, re.MULTILINE)


def test_instances_are_checked_on_readyz() -> None:
    assert re.search(r"^\s*http-check send meth GET uri /readyz$", TEMPLATE, re.MULTILINE)
    assert re.search(r"^\s*http-check expect status 200$", TEMPLATE, re.MULTILINE)


@pytest.mark.parametrize(
    ("status", "expected"), [(503, ServiceUnavailable), (502, OutcomeUnknown), (504, OutcomeUnknown)]
)
def test_balancer_errors_read_like_the_servers(status: int, expected: type[Exception]) -> None:
    match = re.search(
        rf"^\s*http-error status {status} content-type application/json hdr Retry-After 1 string '(.+)'$",
        TEMPLATE,
        re.MULTILINE,
    )
    assert match, f"no JSON http-error for {status}"
    if status != 503:  # sent as a 503: the SDK retries 503s and maps outcome_unknown only on one
        assert re.search(
            rf"^\s*http-after-response set-status 503 if .*{{ status {status} }}", TEMPLATE, re.MULTILINE
        )
    body = match.group(1).encode()
    assert set(json.loads(body)["error"]) == {"code", "message", "details"}
    error = error_from_response(503, {"retry-after": "1"}, body)
    assert type(error) is expected


def test_render_fills_every_placeholder() -> None:
    rendered = render_haproxy_config(
        TEMPLATE,
        bind="127.0.0.1:8080",
        stats_bind="127.0.0.1:8081",
        servers={"tl1": "127.0.0.1:9001", "tl2": "127.0.0.1:9002"},
    )
    assert not [line for line in rendered.splitlines() if "${" in line and not line.startswith("#")]
    assert re.findall(r"^\s+server (\S+) (\S+)$", rendered, re.MULTILINE) == [
        ("tl1", "127.0.0.1:9001"),
        ("tl2", "127.0.0.1:9002"),
    ]
    assert "bind 127.0.0.1:8080" in rendered
