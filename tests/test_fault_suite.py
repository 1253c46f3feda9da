"""The fault suite in a reduced form (``make faults`` runs it longer, with more producers).

Real processes and real faults — see tests/faultsuite/harness.py — with a few seconds of
full-speed appends around each. The checker's verdict is the assertion: every acknowledged record
present exactly once and in order, every definitely failed one absent, Postgres and ClickHouse
equal once replication has caught up.
"""

from __future__ import annotations

import pytest

from tests.faultsuite.harness import FAULTS, Options, run_faults

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_acknowledged_appends_survive_every_fault_exactly_once() -> None:
    report = run_faults(Options(producers=4, load_seconds=2.0, hold_seconds=3.0, faults=FAULTS))
    print(report.table())
    assert report.ok, report.table()
    counts = report.verdict.counts
    assert report.verdict.verified == counts["acked"] > 0
    # The faults were real: appends failed or went unanswered while they lasted.
    assert counts["http_503"] + counts["no_answer"] + counts["outcome_unknown"] > 0, report.table()
    assert counts["server_error"] == 0, report.table()  # never a 500
    assert report.sessions, report.table()
