"""The official Durable Streams conformance suite (npm ``@durable-streams/server-conformance-tests``)
against a live Threadline with auth on, served by `threadline serve --workers 2`.

The bar: every test passes (338 of 338), the 6 "Reserved subscription APIs" tests included (the
harness opts in with ``subscriptions: true``); any skip fails this test, so nothing can go quiet.
The suite's webhook receiver listens on 127.0.0.1, so the server under test allows that host
(``webhook_allowed_hosts``) and nothing else: its "rejects unsafe webhook URLs" test still holds. The suite is installed by `make install` (npm ci in conformance/); the
harness (fetch wrapper adding the bearer token, vitest JSON report) is conformance/conformance.test.mjs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, ServeProcess, make_tenant, settings_for
from threadline.embedded.stack import StackEndpoints

CONFORMANCE_DIR = REPO_ROOT / "conformance"
TEST_FILE = "conformance.test.mjs"
LONG_POLL_SECONDS = 0.5
SUITE_TIMEOUT_SECONDS = 300
EXPECTED_TOTAL = 338
EXPECTED_PASSED = 338
# Tests the suite may skip: none since subscriptions are implemented (a skip fails the run).
RESERVED_SKIPPED: frozenset[str] = frozenset()
WEBHOOK_RECEIVER_HOST = "127.0.0.1"
VITEST_TEST_TIMEOUT_MS = 30_000
MAX_LISTED = 60
MESSAGE_CHARS = 300


def _check_installed() -> str:
    npx = shutil.which("npx")
    assert npx, "npx not found: the conformance suite needs Node.js 20+ with npm on PATH"
    for needed in ("node_modules/@durable-streams/server-conformance-tests", "node_modules/vitest"):
        assert (CONFORMANCE_DIR / needed).is_dir(), (
            f"the conformance suite is not installed ({CONFORMANCE_DIR / needed} is missing): "
            "run `make install` (it runs `npm ci --prefix conformance`)"
        )
    return npx


def _run_suite(npx: str, base_url: str, token: str, report: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CONFORMANCE_TEST_URL": base_url,
        "CONFORMANCE_TOKEN": token,
        "CONFORMANCE_LONG_POLL_MS": str(int(LONG_POLL_SECONDS * 1000)),
        "NO_COLOR": "1",
    }
    # `npx --no`: never download anything, use the vitest that `make install` put in node_modules.
    command = [
        npx,
        "--no",
        "vitest",
        "run",
        TEST_FILE,
        "--no-coverage",
        # The suite's own per-test default is 5 s: property tests doing hundreds of appends
        # timed out on a loaded 2-core machine (main too). Tests that set their own keep it.
        f"--testTimeout={VITEST_TEST_TIMEOUT_MS}",
        "--reporter=json",
        f"--outputFile={report}",
    ]
    try:
        return subprocess.run(
            command,
            cwd=CONFORMANCE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the conformance suite did not finish within {SUITE_TIMEOUT_SECONDS}s") from exc


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _listing(entries: list[str]) -> str:
    shown = "\n".join(f"  - {entry}" for entry in entries[:MAX_LISTED])
    if len(entries) > MAX_LISTED:
        shown += f"\n  … and {len(entries) - MAX_LISTED} more"
    return shown


def test_durable_streams_conformance_suite_passes(stack: StackEndpoints, tmp_path: Path) -> None:
    npx = _check_installed()
    # A short long-poll timeout, as the suite expects: two offset=now long-polls would otherwise
    # outlast vitest's 5 s per-test timeout.
    tenant = make_tenant(settings_for(stack), "conformance")
    report = tmp_path / "conformance-report.json"
    # The production server with two workers: requests of one test land on either, so a read
    # that follows an append, or a long-poll that waits for one, crosses processes.
    server = ServeProcess(
        stack,
        tmp_path / "serve.log",
        workers=2,
        THREADLINE_LONG_POLL_TIMEOUT_SECONDS=str(LONG_POLL_SECONDS),
        THREADLINE_AUTH_CACHE_SECONDS="0",  # as every other test server
        THREADLINE_WEBHOOK_ALLOWED_HOSTS=WEBHOOK_RECEIVER_HOST,
    )
    try:
        completed = _run_suite(npx, server.url, tenant.key, report)
    finally:
        server.stop()
    assert report.is_file(), (
        f"vitest wrote no report (exit {completed.returncode}):\n"
        f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    check_report(json.loads(report.read_text()))


def check_report(results: dict[str, Any]) -> None:
    """Assert on a vitest JSON report: no failures, every test passed, nothing skipped."""
    passed: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    for suite_file in results["testResults"]:
        if suite_file.get("message"):
            # An error outside any test (import error, bad URL, a failing hook).
            failed.append(f"{suite_file['name']}: {_one_line(suite_file['message'], MESSAGE_CHARS)}")
        for test in suite_file["assertionResults"]:
            name = " > ".join([*test["ancestorTitles"], test["title"]])
            if test["status"] == "passed":
                passed.append(name)
            elif test["status"] in ("skipped", "todo"):
                skipped.append(name)
            else:  # "failed", or "pending" for a test that never finished
                message = _one_line((test.get("failureMessages") or [""])[0], MESSAGE_CHARS)
                failed.append(f"{name} [{test['status']}]: {message}")

    assert not failed, f"{len(failed)} conformance tests failed:\n{_listing(failed)}"
    unexpected_skips = sorted(set(skipped) - RESERVED_SKIPPED)
    assert not unexpected_skips, (
        f"skipped outside the reserved subscription group:\n{_listing(unexpected_skips)}"
    )
    assert sorted(skipped) == sorted(RESERVED_SKIPPED), f"reserved tests not skipped as expected: {skipped}"
    assert len(passed) == EXPECTED_PASSED, f"{len(passed)} passed, expected {EXPECTED_PASSED}"
    assert results["numTotalTests"] == EXPECTED_TOTAL, results["numTotalTests"]
