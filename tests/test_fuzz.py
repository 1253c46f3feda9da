"""Schemathesis against a live server and its ``/openapi.json``: every documented operation, with
valid and invalid inputs, must never answer 5xx, and every answer must match the document: a
documented status, content type, body schema and headers.

Two parts: one test per operation (the document's examples, a coverage pass over each parameter's
edges, then random cases, valid and invalid), and a stateful run that follows the document's links
(create a session, then get, patch, append to, subscribe to and close it; create a stream, then
append to, read, head and delete it).

Bounded for CI: a fixed seed and ``THREADLINE_FUZZ_EXAMPLES`` examples per operation (default 25).
``make fuzz`` runs the same tests with more examples and a random seed, which it prints; rerun a
failure with ``THREADLINE_FUZZ_SEED=<seed> THREADLINE_FUZZ_EXAMPLES=<n> pytest tests/test_fuzz.py``.

Nothing is excluded from fuzzing (only the 2xx-reached check skips the three subscription operations that need a live wake's token). SSE answers are read for at most 2 events or 2 s (then the connection is
closed, as a client would), and this server's long-polls wait 1 s instead of 30.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ServerThread, StackEndpoints, make_tenant, settings_for
from threadline.api.openapi import build_openapi

EXAMPLES = int(os.environ.get("THREADLINE_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("THREADLINE_FUZZ_SEED", "20250917"))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

# The document the server serves (test_the_served_document_is_the_one_fuzzed checks they are
# equal), built here so pytest can make one test per operation before any server runs.
schema = schemathesis.openapi.from_dict(
    build_openapi(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": 10,
            # An SSE answer is read for 2 events or until the request timeout, then closed.
            "max-stream-events": 2,
            "operations": [
                {"include-operation-id": ["subscribeChannel", "readStream"], "request-timeout": 2}
            ],
            "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none"},
        }
    ),
)


# Subscription ack, release and callback answer 2xx only to the token of a live wake, which the
# fuzzer cannot have (a claim's answer is not linked into a header); they are still fuzzed for
# 5xx and conformance, and tests/test_subscriptions.py drives their 2xx paths.
NEEDS_WAKE_TOKEN = [{"wakeToken": []}]


@dataclass(frozen=True)
class FuzzServer:
    url: str
    key: str
    # The server's request counter before fuzzing: (method, route, status) -> requests.
    before: Counter[tuple[str, str, int]]


def answered(url: str) -> Counter[tuple[str, str, int]]:
    """What the server says it answered, from its own request counter (``/metrics``): counted
    by the server, so it includes the stateful runner's requests. The registry is per process
    (other tests' servers add to it too), hence the difference from a snapshot."""
    counts: Counter[tuple[str, str, int]] = Counter()
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("threadline_http_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            route = re.sub(r"\{(\w+):\w+\}", r"{\1}", labels["route"])  # {name:path} -> {name}
            counts[(labels["method"], route, int(labels["status"]))] += int(float(line.rsplit(" ", 1)[1]))
    return counts


@pytest.fixture(scope="module")
def fuzz_server(stack: StackEndpoints) -> Iterator[FuzzServer]:
    """A server of its own: long-polls give up after 1 s instead of 30 (a generated long-poll
    on an idle stream would hold each example for 30 s) and SSE heartbeats come every 0.5 s (so a
    silent SSE read ends at its 2 s bound); and a tenant of its own, so the sessions it creates
    never show up in other tests' lists and counts."""
    settings = settings_for(stack, long_poll_timeout_seconds=1.0, sse_heartbeat_seconds=0.5)
    with ServerThread(settings) as url:
        print(f"fuzzing {url} with seed {SEED}, {EXAMPLES} examples per operation")
        key = make_tenant(settings, "fuzz").key
        # What the document's examples name (a stream to trim, a session whose channels the
        # realtime examples use), so each example reaches a handler past its lookups.
        auth = {"Authorization": f"Bearer {key}"}
        created = httpx.put(f"{url}/v1/stream/chat/room-1", headers=auth)
        assert created.status_code in (200, 201), created.text
        # The pull-wake subscription example's wake stream (it must exist before a PUT names it).
        created = httpx.put(f"{url}/v1/stream/agents/wake", headers=auth)
        assert created.status_code in (200, 201), created.text
        # The subscription the examples name, as the PUT example would create it.
        example = build_openapi()["paths"]["/v1/stream/__ds/subscriptions/{id}"]["put"]["requestBody"]
        created = httpx.put(
            f"{url}/v1/stream/__ds/subscriptions/agents",
            json=example["content"]["application/json"]["example"],
            headers=auth,
        )
        assert created.status_code in (200, 201), created.text
        created = httpx.post(
            f"{url}/api/v1/sessions", json={"type": "chat", "externalId": "conv-42"}, headers=auth
        )
        assert created.status_code in (200, 201), created.text
        yield FuzzServer(url, key, answered(url))


def test_the_served_document_is_the_one_fuzzed(fuzz_server: FuzzServer) -> None:
    assert httpx.get(f"{fuzz_server.url}/openapi.json").json() == build_openapi()


@schema.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case, fuzz_server: FuzzServer) -> None:
    headers = {"Authorization": f"Bearer {fuzz_server.key}"}
    case.call_and_validate(base_url=fuzz_server.url, headers=headers, checks=CHECKS)


def test_stateful_workflows_answer_as_documented(fuzz_server: FuzzServer, tmp_path: Path) -> None:
    """Schemathesis' own runner for the stateful phase: it follows the links (and the ones it
    infers), and copes with what a live server does to Hypothesis (a scenario that changed the
    server cannot be replayed to the same answers), which a hand-driven state machine cannot."""
    url, key = fuzz_server.url, fuzz_server.key
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        # No crash cache (./.schemathesis, replayed by later runs): a run depends on its seed
        # alone. SSE answers are read for 2 events or 2 s, as in the per-operation tests.
        "[cache]\nenabled = false\n\n"
        '[[operations]]\ninclude-operation-id = ["subscribeChannel", "readStream"]\nrequest-timeout = 2\n'
    )
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{url}/openapi.json",
        "--phases=stateful",
        f"--checks={','.join(check.__name__ for check in CHECKS)}",
        f"--seed={SEED}",
        f"--max-examples={EXAMPLES}",
        "--workers=1",
        "--request-timeout=10",
        "--generation-database=none",
        f"--header=Authorization: Bearer {key}",
    ]
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, check=False)  # pytest-timeout bounds it
    print(run.stdout[-4000:], f"stateful phase: {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-4000:]


def test_every_operation_was_reached(fuzz_server: FuzzServer) -> None:
    """The runs above got past authentication and validation: the server answered every
    documented operation with a 2xx at least once (a fuzzer that only ever hears 400 proves
    nothing about the handlers behind the checks)."""
    since = answered(fuzz_server.url) - fuzz_server.before
    assert since, "run the whole file: this checks what the tests above reached"
    missing = {}
    for path, item in build_openapi()["paths"].items():
        for method in ("get", "put", "post", "patch", "delete", "head"):
            if method in item and item[method].get("security") != NEEDS_WAKE_TOKEN:
                seen = {
                    status: n
                    for (m, route, status), n in since.items()
                    if (m, route) == (method.upper(), path)
                }
                if not any(200 <= status < 300 for status in seen):
                    missing[f"{method.upper()} {path}"] = seen
    assert not missing, f"operations never answered 2xx (answers by status): {missing}"
