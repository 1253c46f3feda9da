"""Idempotent producers that append as fast as the server answers and keep a ledger of answers.

Each producer owns one stream (a plain stream or a session's ``out`` channel) and numbers its
appends with ``Producer-Id`` / ``-Epoch`` / ``-Seq``. Every record is a unique JSON string.

What an answer means, and what the producer does:

* 200 (appended) or 204 (a duplicate of an earlier attempt): acknowledged; the next record takes
  the next seq.
* No answer (connection refused or reset, timeout), a 5xx other than 503, or 503
  ``outcome_unknown``: the outcome is unknown, so the same record is sent again with the same
  seq until a definite answer — the server's dedup makes that safe.
* A definite failure (503 ``database_unavailable`` / ``storage_unavailable``, or another 4xx) of
  a record none of whose attempts had an unknown outcome: the record is *abandoned* and the next
  record is sent with the same seq. The server promised nothing was stored; if it lied, the
  abandoned record is in the stream and the next one is answered 204 (a duplicate of the
  abandoned one) and missing — both of which the checker sees.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx

__all__ = ["Ledger", "produce"]

JSON = "application/json"
UNKNOWN_BACKOFF_SECONDS = 0.1  # after a failed attempt: the fault is likely still on
FINISH_SECONDS = 180.0  # after stop, how long a producer may retry its last unknown record


@dataclass
class Ledger:
    """Everything one producer was told, in order."""

    name: str
    path: str
    acked: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    pending: str | None = None  # a record whose outcome was still unknown when the run ended
    counts: Counter[str] = field(default_factory=Counter)
    protocol_errors: list[str] = field(default_factory=list)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


async def produce(
    client: httpx.AsyncClient, servers: list[str], ledger: Ledger, producer_id: str, stop: asyncio.Event
) -> None:
    """Append records until ``stop`` is set, then settle the last one (see the module docstring)."""
    seq = 0
    index = 0
    rng = random.Random(producer_id)
    while not stop.is_set():
        record = f"{ledger.name}-{index:07d}"
        index += 1
        body = json.dumps(record).encode()
        unknown = False
        finish_by: float | None = None
        attempt = 0
        while True:
            if stop.is_set() and finish_by is None:
                finish_by = asyncio.get_running_loop().time() + FINISH_SECONDS
            if finish_by is not None and asyncio.get_running_loop().time() > finish_by:
                ledger.pending = record if unknown else None
                if not unknown:
                    ledger.abandoned.append(record)
                return
            server = servers[(rng.randrange(len(servers)) + attempt) % len(servers)]
            attempt += 1
            headers = {
                "Content-Type": JSON,
                "Producer-Id": producer_id,
                "Producer-Epoch": "0",
                "Producer-Seq": str(seq),
            }
            try:
                response = await client.post(server + ledger.path, content=body, headers=headers)
            except httpx.TransportError as exc:
                ledger.counts["no_answer"] += 1
                ledger.counts[f"no_answer:{type(exc).__name__}"] += 1
                unknown = True
                ledger.counts["retries"] += 1
                await asyncio.sleep(UNKNOWN_BACKOFF_SECONDS)
                continue
            status = response.status_code
            if status in (200, 204):
                ledger.acked.append(record)
                ledger.counts["acked"] += 1
                if status == 204:
                    ledger.counts["acked_duplicate"] += 1
                    if not unknown:  # nothing of this record was ever in doubt
                        ledger.counts["unexpected_duplicate"] += 1
                seq += 1
                break
            code = _error_code(response)
            ledger.counts[f"http_{status}"] += 1
            if status == 503 and code == "outcome_unknown":
                ledger.counts["outcome_unknown"] += 1
                unknown = True
            elif status in (403, 409) and code.startswith("producer"):
                # A seq gap or a fenced epoch: the server lost or invented producer state.
                ledger.protocol_errors.append(f"{record} seq {seq}: {status} {response.text[:200]}")
                ledger.counts["protocol_error"] += 1
                return
            elif status >= 500 and status != 503:
                ledger.counts["server_error"] += 1  # a 500 is a bug, and its outcome unknown
                unknown = True
            elif not unknown:
                ledger.abandoned.append(record)  # definite failure: must be absent
                ledger.counts["definite_failure"] += 1
                await asyncio.sleep(UNKNOWN_BACKOFF_SECONDS)  # the dependency is still down
                break
            ledger.counts["retries"] += 1
            await asyncio.sleep(UNKNOWN_BACKOFF_SECONDS)
