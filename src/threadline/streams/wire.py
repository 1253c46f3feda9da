"""What crosses process boundaries about a stream's tail: chunk references and tail changes,
and how they travel as Postgres ``NOTIFY`` payloads.

One module for the format, so the committer (which publishes appends), the session channels
(which publish closes) and the live hub (which decodes both on every instance) cannot drift
apart. A payload is ``;``-separated changes, each ``,``-separated::

    <stream id>,<next offset>,<closed 0|1>[,<chunk start>,<object key>,<byte start>,<byte length>]

The chunk part says where the newest records lie, so a remote instance serves its subscribers
with one object GET and no index query; a close (or a change whose place is unknown) has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_NOTIFY_PAYLOAD",
    "NOTIFY_CHANNEL",
    "ChunkRef",
    "TailChange",
    "decode_notification",
    "encode_notifications",
]

NOTIFY_CHANNEL = "threadline_streams"
# Postgres refuses NOTIFY payloads of 8,000 bytes or more.
MAX_NOTIFY_PAYLOAD = 7900


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Records ``[start, end)`` of a stream are ``byte_length`` bytes at ``byte_start`` of an object."""

    start: int
    end: int
    object_key: str
    byte_start: int
    byte_length: int


@dataclass(frozen=True, slots=True)
class TailChange:
    stream_id: int
    next_offset: int
    closed: bool
    chunk: ChunkRef | None  # None: the change is a close, or its place is unknown

    def encode(self) -> str:
        if self.chunk is None:
            return f"{self.stream_id},{self.next_offset},{int(self.closed)}"
        c = self.chunk
        return (
            f"{self.stream_id},{self.next_offset},{int(self.closed)},"
            f"{c.start},{c.object_key},{c.byte_start},{c.byte_length}"
        )

    @classmethod
    def decode(cls, text: str) -> TailChange:
        """Raises ValueError on anything :meth:`encode` cannot have written."""
        parts = text.split(",")
        if len(parts) not in (3, 7) or parts[2] not in ("0", "1"):
            raise ValueError(f"not a tail change: {text[:100]!r}")
        stream_id, next_offset, closed = int(parts[0]), int(parts[1]), parts[2] == "1"
        chunk = None
        if len(parts) == 7:
            chunk = ChunkRef(int(parts[3]), next_offset, parts[4], int(parts[5]), int(parts[6]))
        return cls(stream_id, next_offset, closed, chunk)


def encode_notifications(changes: Sequence[TailChange]) -> list[str]:
    """NOTIFY payloads (each under Postgres' limit) for ``changes``, in order."""
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for change in changes:
        text = change.encode()
        if current and size + len(text) + 1 > MAX_NOTIFY_PAYLOAD:
            payloads.append(";".join(current))
            current, size = [], 0
        current.append(text)
        size += len(text) + 1
    if current:
        payloads.append(";".join(current))
    return payloads


def decode_notification(payload: str) -> list[TailChange]:
    """The changes in one payload, in order. Raises ValueError on a malformed one."""
    return [TailChange.decode(part) for part in payload.split(";") if part]
