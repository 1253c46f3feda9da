"""Offsets are opaque to clients: ``<16 digits>_<16 digits>``, the second part the record position.

Fixed width makes offsets compare as strings exactly as they compare as numbers, which the
Durable Streams protocol and browsers' ``Last-Event-ID`` resumption rely on. The shape matches
the Durable Streams reference server's, so clients (and the conformance suite) that spell the
start of a stream as ``0000000000000000_0000000000000000`` work unchanged; the first part is
reserved and always zero here.
"""

from __future__ import annotations

import re
from typing import Literal

from threadline.errors import InvalidOffset, OffsetOutOfRange

__all__ = ["NOW", "START", "Position", "format_offset", "parse_offset", "read_start"]

START = "-1"
NOW = "now"
_OFFSET = re.compile(r"([0-9]{16})_([0-9]{16})")  # ASCII digits only, whole string (fullmatch)

# "start": the first record still kept (offset 0 unless the stream was trimmed); "now": the tail.
Position = int | Literal["start", "now"]


def format_offset(position: int) -> str:
    return f"{0:016d}_{position:016d}"


def parse_offset(text: str, *, name: str = "offset") -> Position:
    """``-1`` is the start of the stream, ``now`` its tail, anything else one of our offsets."""
    if text == START:
        return "start"
    if text == NOW:
        return "now"
    match = _OFFSET.fullmatch(text)
    if match is None:
        raise InvalidOffset(f"{name} must be -1, now, or an offset returned by this server")
    if int(match.group(1)) != 0:
        raise OffsetOutOfRange(f"{name} is beyond the end of the stream")
    return int(match.group(2))


def read_start(position: Position, *, trim_offset: int, next_offset: int) -> int:
    """The record position a read from ``position`` starts at. Past the tail is a 400; before the
    trim point is the caller's 410 (the reader refuses it), so only ``start`` skips trimmed records."""
    if position == "start":
        return trim_offset
    if position == "now":
        return next_offset
    if position > next_offset:
        raise OffsetOutOfRange("offset is beyond the end of the stream")
    return position
