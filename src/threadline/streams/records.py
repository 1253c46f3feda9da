"""How records are laid out in object storage, and how JSON mode turns bodies into records.

One append to one stream becomes one *blob*::

    u32 count | u32 length[count] | payload[0] payload[1] ...      (little-endian)

Blobs are self-delimiting, so a chunk (a byte range of an object, indexed in Postgres) may hold
several consecutive blobs of the same stream. The lengths come first so that a read of whole
blobs in bytes mode is one slice per blob, not one per record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import orjson

from threadline.errors import (
    BatchTooLarge,
    EmptyAppend,
    InvalidJson,
    RecordTooLarge,
)

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "MAX_RECORD_BYTES",
    "blob_at",
    "check_batch",
    "encode_blob",
    "iter_records",
    "json_array",
    "split_json",
]

MAX_RECORD_BYTES = 1024 * 1024
MAX_BATCH_RECORDS = 1000
MAX_BATCH_BYTES = 4 * 1024 * 1024

_U32 = struct.Struct("<I")


def encode_blob(records: Sequence[bytes]) -> bytes:
    count = len(records)
    header = struct.pack(f"<{count + 1}I", count, *(len(record) for record in records))
    return header + b"".join(records)


def iter_records(
    data: bytes | memoryview, first_offset: int, from_offset: int = 0, to_offset: int | None = None
) -> Iterator[memoryview]:
    """The payloads in ``data`` (whole blobs) with ``from_offset <= offset < to_offset``.

    ``first_offset`` is the offset of the first record in ``data``.
    """
    view = memoryview(data)
    position = 0
    offset = first_offset
    end = len(view)
    stop = to_offset if to_offset is not None else 1 << 62
    while position < end and offset < stop:
        (count,) = _U32.unpack_from(view, position)
        lengths = struct.unpack_from(f"<{count}I", view, position + 4)
        cursor = position + 4 + 4 * count
        if offset + count <= from_offset:
            offset += count
            cursor += sum(lengths)
        elif offset >= from_offset and offset + count <= stop:
            # The whole blob: its payloads are one contiguous run.
            for length in lengths:
                yield view[cursor : cursor + length]
                cursor += length
            offset += count
        else:
            for length in lengths:
                if from_offset <= offset < stop:
                    yield view[cursor : cursor + length]
                cursor += length
                offset += 1
        position = cursor


def blob_at(data: bytes | memoryview, first_offset: int, offset: int) -> tuple[bytes, int, int]:
    """The record at ``offset`` with its append's first offset and record count."""
    view = memoryview(data)
    position = 0
    start = first_offset
    while position < len(view):
        (count,) = _U32.unpack_from(view, position)
        lengths = struct.unpack_from(f"<{count}I", view, position + 4)
        cursor = position + 4 + 4 * count
        if start <= offset < start + count:
            index = offset - start
            begin = cursor + sum(lengths[:index])
            return bytes(view[begin : begin + lengths[index]]), start, count
        position = cursor + sum(lengths)
        start += count
    raise LookupError(f"offset {offset} is not in this chunk")


def check_batch(records: Sequence[bytes]) -> None:
    """Per-request limits (SPEC §4): 1 MiB a record, 1,000 records and 4 MiB a batch."""
    if len(records) > MAX_BATCH_RECORDS:
        raise BatchTooLarge(
            f"an append carries at most {MAX_BATCH_RECORDS} records, got {len(records)}",
        )
    total = 0
    for record in records:
        if len(record) > MAX_RECORD_BYTES:
            raise RecordTooLarge(f"a record is at most {MAX_RECORD_BYTES} bytes, got {len(record)}")
        total += len(record)
    if total > MAX_BATCH_BYTES:
        raise BatchTooLarge(f"an append carries at most {MAX_BATCH_BYTES} bytes")


def split_json(body: bytes, *, allow_empty_array: bool) -> list[bytes]:
    """JSON mode: a value is one record; an array is flattened into one record per element."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"body is not valid JSON: {exc}") from None
    if isinstance(value, list):
        if not value and not allow_empty_array:
            raise EmptyAppend("an empty JSON array appends nothing")
        return [orjson.dumps(item) for item in value]
    return [orjson.dumps(value)]


def json_array(records: Sequence[bytes | memoryview]) -> bytes:
    """JSON mode reads return one array of every record read."""
    return b"[" + b",".join(records) + b"]"
