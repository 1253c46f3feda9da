"""Request parsing the stream routes share: paths, offsets, integer and flag headers, producers.

HTTP in, plain values out: what the values mean is the stream service's business.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from threadline.errors import ValidationFailed
from threadline.streams.offsets import Position, parse_offset
from threadline.streams.producers import Producer

__all__ = ["STREAM_PREFIX", "flag_header", "integer_header", "producer_headers", "query_offset"]

STREAM_PREFIX = "/v1/stream/"

_INTEGER = re.compile(r"^(0|[1-9][0-9]{0,17})$")


def integer_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not _INTEGER.match(value):
        raise ValidationFailed(f"{name} must be a non-negative integer without sign or leading zeros")
    return int(value)


def flag_header(request: Request, name: str) -> bool:
    value = request.headers.get(name)
    return value is not None and value.strip().lower() == "true"


def query_offset(request: Request) -> Position | None:
    """The request's ``?offset=``, parsed (None when absent; more than one is a 400)."""
    offsets = request.query_params.getlist("offset")
    if len(offsets) > 1:
        raise ValidationFailed("send one offset")
    return parse_offset(offsets[0]) if offsets else None


def producer_headers(request: Request) -> Producer | None:
    """``Producer-Id`` / ``-Epoch`` / ``-Seq``: all three or none."""
    producer_id = request.headers.get("Producer-Id")
    epoch = request.headers.get("Producer-Epoch")
    seq = request.headers.get("Producer-Seq")
    given = [value is not None for value in (producer_id, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise ValidationFailed("Producer-Id, Producer-Epoch and Producer-Seq go together")
    if not producer_id or not producer_id.strip():
        raise ValidationFailed("Producer-Id must not be empty")
    parsed_epoch = integer_header(request, "Producer-Epoch")
    parsed_seq = integer_header(request, "Producer-Seq")
    assert parsed_epoch is not None
    assert parsed_seq is not None
    return Producer(producer_id, parsed_epoch, parsed_seq)
