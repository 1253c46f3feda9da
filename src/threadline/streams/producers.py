"""Idempotent producers: ``Producer-Id`` / ``Producer-Epoch`` / ``Producer-Seq``.

A producer numbers its appends 0, 1, 2, … within an epoch; a restarted producer bumps the epoch
and starts again at 0, which fences every writer still using the old epoch. The server keeps the
highest accepted ``(epoch, seq)`` per producer and stream, so a retry of an acknowledged append
is recognised and answered without appending again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from threadline.errors import (
    ProducerEpochSeq,
    ProducerFenced,
    ProducerSeqGap,
)

__all__ = ["Producer", "ProducerState", "decide"]


@dataclass(frozen=True, slots=True)
class Producer:
    id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class ProducerState:
    epoch: int
    last_seq: int
    last_next_offset: int


Decision = Literal["accept", "duplicate"]


def decide(state: ProducerState | None, producer: Producer) -> Decision:
    """Accept, recognise a duplicate, or raise the protocol's error for this append."""
    if state is None or producer.epoch > state.epoch:
        if producer.seq != 0:
            if state is None:
                raise ProducerSeqGap(
                    f"producer {producer.id!r} is new here: its first Producer-Seq must be 0",
                    headers={"Producer-Expected-Seq": "0", "Producer-Received-Seq": str(producer.seq)},
                )
            raise ProducerEpochSeq(
                f"a new Producer-Epoch must start at Producer-Seq 0, got {producer.seq}",
            )
        return "accept"
    if producer.epoch < state.epoch:
        raise ProducerFenced(
            f"Producer-Epoch {producer.epoch} is stale; the current epoch is {state.epoch}",
            headers={"Producer-Epoch": str(state.epoch)},
        )
    if producer.seq <= state.last_seq:
        return "duplicate"
    if producer.seq > state.last_seq + 1:
        raise ProducerSeqGap(
            f"Producer-Seq {producer.seq} skips ahead; expected {state.last_seq + 1}",
            headers={
                "Producer-Expected-Seq": str(state.last_seq + 1),
                "Producer-Received-Seq": str(producer.seq),
            },
        )
    return "accept"
