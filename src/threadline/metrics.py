"""Failures of the services Threadline depends on, counted in one family for every caller.

Each dependency's errors are translated in one place: ``db.discarding_on_failure`` for Postgres
(requests and group commits; the replication consumer's and the listener's own connections retry
and log instead), ``storage.objects`` for S3, ``storage.clickhouse.clickhouse_errors`` for
ClickHouse (plus the list timeout in ``sessions.lists``). Each counts here, whatever the caller then does with the error (a 503, a retry, a
list served from Postgres instead), so dashboards and alerts can tell which dependency is failing
without knowing every code path that calls it.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter

__all__ = ["DEPENDENCY_ERRORS", "Dependency", "count_dependency_error"]

Dependency = Literal["postgres", "s3", "clickhouse"]
# unavailable: no answer (refused, reset, timed out); refused: it answered with an error.
ErrorKind = Literal["unavailable", "refused"]

DEPENDENCY_ERRORS = Counter(
    "threadline_dependency_errors_total",
    "Calls to Postgres, S3 or ClickHouse that failed, by dependency and kind",
    ["dependency", "kind"],
)
# Every series exists from the start at 0: a rate() over a series that appears only with the
# first failure misses that failure, and dashboards show 0 rather than "no data".
for _dependency, _kind in (
    ("postgres", "unavailable"),
    ("s3", "unavailable"),
    ("clickhouse", "unavailable"),
    ("clickhouse", "refused"),
):
    DEPENDENCY_ERRORS.labels(_dependency, _kind)


def count_dependency_error(dependency: Dependency, kind: ErrorKind = "unavailable") -> None:
    DEPENDENCY_ERRORS.labels(dependency, kind).inc()
