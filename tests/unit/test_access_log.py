"""Which requests get an access-log line (THREADLINE_ACCESS_LOG)."""

from __future__ import annotations

import pytest

from threadline.config import Settings
from threadline.logs import AccessLog


def test_all_logs_every_request() -> None:
    log = AccessLog.parse("all")
    assert all(log.wants(status) for status in (200, 204, 304, 404, 503))


def test_errors_logs_only_failed_requests() -> None:
    log = AccessLog.parse("errors")
    assert [log.wants(status) for status in (200, 204, 301, 400, 404, 500, 503)] == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
    ]


def test_off_logs_nothing_not_even_errors() -> None:
    log = AccessLog.parse("off")
    assert not any(log.wants(status) for status in (200, 404, 500))


def test_sample_logs_every_error_and_one_in_n_of_the_rest() -> None:
    log = AccessLog.parse("sample:10")
    successes = [log.wants(200) for _ in range(100)]
    assert successes.count(True) == 10
    assert successes[9]  # evenly spaced, not random
    assert not any(successes[:9])
    assert all(log.wants(500) for _ in range(5))
    assert all(log.wants(404) for _ in range(5))


@pytest.mark.parametrize("value", ["some", "sample:0", "sample:", "sample:x", "ALL", "sample:-1"])
def test_unknown_policies_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="access"):
        AccessLog.parse(value)
    with pytest.raises(ValueError, match="access_log"):
        Settings(access_log=value)


def test_the_default_is_valid_and_samples() -> None:
    log = AccessLog.parse(Settings().access_log)
    assert log.wants(500)
    assert [log.wants(200) for _ in range(100)].count(True) == 1
