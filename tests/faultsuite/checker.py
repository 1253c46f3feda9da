"""The checker: what the producers were told against what the streams hold.

For each producer's stream, read back in full, it proves:

* every acknowledged record is present exactly once, in the order it was acknowledged;
* every abandoned record (answered with a definite failure, never retried) is absent;
* nothing else is there: at most the one record whose outcome was still unknown at the end,
  and then only after every acknowledged one;
* no producer saw a protocol error (a seq gap or fencing means the server lost producer state).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.faultsuite.producers import Ledger

__all__ = ["Verdict", "check_ledger", "read_stream"]


@dataclass
class Verdict:
    verified: int = 0
    problems: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems


async def read_stream(client: httpx.AsyncClient, url: str) -> list[Any]:
    """Every JSON value in a stream, following Stream-Next-Offset until up to date."""
    values: list[Any] = []
    offset = "-1"
    while True:
        response = await client.get(url, params={"offset": offset})
        response.raise_for_status()
        values.extend(json.loads(response.content))
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return values


def check_ledger(ledger: Ledger, stored: list[Any], verdict: Verdict) -> None:
    name = ledger.name
    verdict.counts.update(ledger.counts)
    for error in ledger.protocol_errors:
        verdict.problems.append(f"{name}: protocol error {error}")
    seen = Counter(stored)
    for record, times in seen.items():
        if times > 1:
            verdict.problems.append(f"{name}: {record} stored {times} times")
    for record in ledger.abandoned:
        if record in seen:
            verdict.problems.append(f"{name}: {record} was answered as failed but is stored")
    acked = ledger.acked
    if stored[: len(acked)] != acked:
        first = next((i for i, (a, b) in enumerate(zip(stored, acked, strict=False)) if a != b), None)
        if first is None:
            first = min(len(stored), len(acked))
        missing = [r for r in acked if r not in seen]
        verdict.problems.append(
            f"{name}: stored records differ from the acknowledged ones at position {first} "
            f"(stored {stored[first : first + 2]}, acknowledged {acked[first : first + 2]}); "
            f"{len(missing)} acknowledged records missing, e.g. {missing[:3]}"
        )
    tail = stored[len(acked) :]
    allowed_tail = [ledger.pending] if ledger.pending is not None else []
    if tail and tail != allowed_tail:
        verdict.problems.append(f"{name}: unacknowledged records stored after the last ack: {tail[:3]}")
    if ledger.pending is not None:
        verdict.counts["pending_unknown_at_end"] += 1
    verdict.verified += sum(1 for record in acked if seen[record] == 1)
