"""The official Durable Streams conformance suite (npm ``@durable-streams/server-conformance-tests``)
against a live Threadline with auth on.

The bar: every non-reserved test passes (332 of 338). The 6 "Reserved subscription APIs" tests are
skipped by the suite itself unless a server opts into subscriptions; anything else skipped fails
this test, so nothing can go quiet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, ServerThread, make_tenant, settings_for
from threadline.embedded.stack import StackEndpoints

CONFORMANCE_DIR = REPO_ROOT / "conformance"
EXPECTED_PASSED = 332
RESERVED_GROUP = "Reserved subscription APIs"
RESERVED_TESTS = 6


def _run_suite(base_url: str, token: str, report: Path) -> subprocess.CompletedProcess[str]:
    npx = shutil.which("npx")
    assert npx, "npx (Node.js) is needed to run the conformance suite"
    env = {
        **os.environ,
        "CONFORMANCE_TEST_URL": base_url,
        "CONFORMANCE_TOKEN": token,
        "CONFORMANCE_LONG_POLL_MS": "500",
    }
    return subprocess.run(
        [
            npx,
            "vitest",
            "run",
            "conformance.test.mjs",
            "--no-coverage",
            "--reporter=json",
            f"--outputFile={report}",
        ],
        cwd=CONFORMANCE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_durable_streams_conformance_suite_passes(stack: StackEndpoints, tmp_path: Path) -> None:
    assert (CONFORMANCE_DIR / "node_modules" / "@durable-streams").is_dir(), (
        "the conformance suite is not installed: run `make install` (npm ci --prefix conformance)"
    )
    # A short long-poll timeout, as the suite expects (two offset=now long-polls would otherwise
    # outlast vitest's 5 s test timeout).
    settings = settings_for(stack, long_poll_timeout_seconds=0.5)
    tenant = make_tenant(settings, "conformance")
    report = tmp_path / "report.json"
    with ServerThread(settings) as base_url:
        completed = _run_suite(base_url, tenant.key, report)
    assert report.exists(), f"vitest wrote no report:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    results: dict[str, Any] = json.loads(report.read_text())

    failed: list[str] = []
    skipped: list[str] = []
    passed = 0
    for suite_file in results["testResults"]:
        for test in suite_file["assertionResults"]:
            name = " > ".join([*test["ancestorTitles"], test["title"]])
            if test["status"] == "passed":
                passed += 1
            elif test["status"] in ("skipped", "pending", "todo"):
                skipped.append(name)
            else:
                message = (test.get("failureMessages") or [""])[0].replace("\n", " ")[:300]
                failed.append(f"{name}: {message}")

    assert not failed, f"{len(failed)} conformance tests failed:\n" + "\n".join(failed[:60])
    unexpected_skips = [name for name in skipped if not name.startswith(RESERVED_GROUP)]
    assert not unexpected_skips, f"skipped outside the reserved group: {unexpected_skips}"
    assert len(skipped) == RESERVED_TESTS, skipped
    assert passed == EXPECTED_PASSED, f"{passed} passed, expected {EXPECTED_PASSED}"
