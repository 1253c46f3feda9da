"""Decoding the ``pgoutput`` logical replication protocol (version 1).

Messages arrive one per row from ``pg_logical_slot_peek_binary_changes``. Only what the sessions
mirror needs is decoded: Begin, Commit, Relation, Insert, Update, Delete (and Truncate, which
is refused loudly: a truncated sessions table cannot be mirrored row by row). Column values come
in Postgres text format and are converted by type OID, so the session our consumer's connection
uses must have ``TimeZone=UTC`` and ``DateStyle=ISO``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from threadline.errors import EngineError

__all__ = [
    "Begin",
    "Change",
    "Commit",
    "DecodeError",
    "Relation",
    "Truncate",
    "decode_message",
    "format_lsn",
    "parse_lsn",
    "parse_text_array",
]


class DecodeError(EngineError):
    """Bytes from the slot that are not pgoutput v1 as this decoder knows it."""


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_text_array(text: str) -> list[str | None]:
    """A one-dimensional Postgres array literal such as ``{a,"b c",NULL,"q\\"x"}``."""
    if not (text.startswith("{") and text.endswith("}")):
        raise DecodeError(f"not an array literal: {text[:40]!r}")
    items: list[str | None] = []
    body = text[1:-1]
    i = 0
    while i < len(body):
        if body[i] == '"':
            i += 1
            chars = []
            while body[i] != '"':
                if body[i] == "\\":
                    i += 1
                chars.append(body[i])
                i += 1
            items.append("".join(chars))
            i += 1  # closing quote
        else:
            end = body.find(",", i)
            end = len(body) if end == -1 else end
            raw = body[i:end]
            items.append(None if raw == "NULL" else raw)
            i = end
        if i < len(body):
            if body[i] != ",":
                raise DecodeError(f"malformed array literal: {text[:40]!r}")
            i += 1
    return items


_TEXT_PARSERS: dict[int, Callable[[str], Any]] = {
    16: lambda v: v == "t",  # bool
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    25: str,  # text
    1043: str,  # varchar
    114: json.loads,  # json
    3802: json.loads,  # jsonb
    1184: datetime.fromisoformat,  # timestamptz (ISO DateStyle, UTC session)
    1009: parse_text_array,  # text[]
}


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # LSN of the commit record: the transaction's version
    commit_time_us: int  # microseconds since 2000-01-01
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int  # confirm up to here once the transaction is stored
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    columns: list[tuple[str, int]]  # (name, type oid)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "insert" | "update" | "delete"
    relation_id: int
    new: list[tuple[str, Any]] | None = None  # tuple items: ("t", text) | ("n", None) | ("u", None)
    old: list[tuple[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: list[int] = field(default_factory=list)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        value = self.data[self.pos : end].decode()
        self.pos = end + 1
        return value

    def tuple_data(self) -> list[tuple[str, Any]]:
        count = self.take("!h")
        items: list[tuple[str, Any]] = []
        for _ in range(count):
            kind = chr(self.take("!c")[0])
            if kind == "t":
                length = self.take("!i")
                items.append(("t", self.data[self.pos : self.pos + length].decode()))
                self.pos += length
            elif kind in ("n", "u"):
                items.append((kind, None))
            else:
                raise DecodeError(f"unsupported tuple value kind {kind!r}")
        return items


def decode_message(data: bytes) -> Begin | Commit | Relation | Change | Truncate | None:
    """Decode one pgoutput message; None for kinds the mirror does not need (Origin, Type...)."""
    reader = _Reader(data)
    tag = chr(reader.take("!c")[0])
    if tag == "B":
        final_lsn, commit_time, xid = reader.take("!QqI")
        return Begin(final_lsn, commit_time, xid)
    if tag == "C":
        _flags, commit_lsn, end_lsn, commit_time = reader.take("!BQQq")
        return Commit(commit_lsn, end_lsn, commit_time)
    if tag == "R":
        relation_id = reader.take("!I")
        namespace, name = reader.string(), reader.string()
        _identity, ncols = reader.take("!Bh")
        columns = []
        for _ in range(ncols):
            _flags = reader.take("!B")
            column_name = reader.string()
            type_oid, _typmod = reader.take("!Ii")
            columns.append((column_name, type_oid))
        return Relation(relation_id, namespace, name, columns)
    if tag == "I":
        relation_id = reader.take("!I")
        if chr(reader.take("!c")[0]) != "N":
            raise DecodeError("insert without a new tuple")
        return Change("insert", relation_id, new=reader.tuple_data())
    if tag == "U":
        relation_id = reader.take("!I")
        marker = chr(reader.take("!c")[0])
        old = None
        if marker in ("K", "O"):
            old = reader.tuple_data()
            marker = chr(reader.take("!c")[0])
        if marker != "N":
            raise DecodeError("update without a new tuple")
        return Change("update", relation_id, new=reader.tuple_data(), old=old)
    if tag == "D":
        relation_id = reader.take("!I")
        marker = chr(reader.take("!c")[0])
        if marker not in ("K", "O"):
            raise DecodeError("delete without an old tuple")
        return Change("delete", relation_id, old=reader.tuple_data())
    if tag == "T":
        count = reader.take("!I")
        _options = reader.take("!B")
        return Truncate([reader.take("!I") for _ in range(count)])
    return None


def row_values(
    relation: Relation, items: list[tuple[str, Any]], fallback: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Column name -> Python value. Unchanged TOASTed values ('u') come from ``fallback``
    (the old row, which REPLICA IDENTITY FULL always carries in full)."""
    if len(items) != len(relation.columns):
        raise DecodeError(f"{relation.name}: {len(items)} values for {len(relation.columns)} columns")
    row: dict[str, Any] = {}
    for (name, type_oid), (kind, text) in zip(relation.columns, items, strict=True):
        if kind == "n":
            row[name] = None
        elif kind == "u":
            if fallback is None or name not in fallback:
                raise DecodeError(f"{relation.name}.{name}: unchanged TOAST value without an old row")
            row[name] = fallback[name]
        else:
            parser = _TEXT_PARSERS.get(type_oid)
            if parser is None:
                raise DecodeError(f"{relation.name}.{name}: no text parser for type oid {type_oid}")
            row[name] = parser(text)
    return row
