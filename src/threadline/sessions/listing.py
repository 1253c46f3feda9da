"""List and count queries: parsing the query string, and the keyset cursor.

The query string is parsed strictly. ``filter[tagz]=x`` is a 400: a misspelt filter that is
silently ignored returns every session, which is worse than an error.

Cursors are keyset positions ``(sort key, id)`` in microseconds, base64url-encoded JSON. They are
opaque to clients but carry the sort they were made for, so a cursor reused with another sort is
refused instead of returning a wrong page.

Both list sources (Postgres and ClickHouse) page the same way, and the rules for it live here once:
:func:`keyset_scan` says which index range one page reads, and :func:`page_window` turns the rows
that scan returned into the page and its next/previous cursors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, Literal, TypeVar

from threadline.errors import InvalidCursor, UnknownParameter, ValidationFailed
from threadline.sessions.fields import FILTER_KEYS, SessionFilters, parse_filters
from threadline.sessions.fields import single_value as _single

__all__ = [
    "CountQuery",
    "Cursor",
    "KeysetScan",
    "ListQuery",
    "PageWindow",
    "SessionFilters",
    "keyset_scan",
    "page_window",
    "parse_count_query",
    "parse_list_query",
    "parse_lsn",
]

T = TypeVar("T")

SortField = Literal["createdAt", "lastActiveAt"]
_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
# The filter keys (and SessionFilters, re-exported here) come from sessions.fields.
_LIST_KEYS = set(FILTER_KEYS) | {"sort", "page[size]", "page[after]", "page[before]", "minLsn"}
_COUNT_KEYS = set(FILTER_KEYS) | {"minLsn"}


# 0001-01-01 to 9999-12-31T23:59:59.999999Z: keys outside cannot be a Python datetime (a
# Postgres list would fail converting them back).
_MIN_KEY_US = -62_135_596_800_000_000
_MAX_KEY_US = 253_402_300_799_999_999


@dataclass(frozen=True, slots=True)
class Cursor:
    sort: SortField
    key_us: int  # sort key, microseconds since the epoch
    id: str

    def encode(self) -> str:
        raw = json.dumps({"s": self.sort, "k": self.key_us, "i": self.id}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, *, sort: SortField, param: str) -> Cursor:
        try:
            padded = token + "=" * (-len(token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode()))
            cursor = cls(sort=data["s"], key_us=int(data["k"]), id=str(data["i"]))
        except (
            binascii.Error,
            ValueError,
            KeyError,
            TypeError,
            UnicodeDecodeError,
            OverflowError,
            RecursionError,
        ):
            raise InvalidCursor(f"{param} is not a valid cursor") from None
        if not _MIN_KEY_US <= cursor.key_us <= _MAX_KEY_US or "\x00" in cursor.id:
            raise InvalidCursor(f"{param} is not a valid cursor")
        if cursor.sort != sort:
            raise InvalidCursor(f"{param} was made for sort={cursor.sort}, not sort={sort}")
        return cursor


@dataclass(frozen=True, slots=True)
class ListQuery:
    filters: SessionFilters = field(default_factory=SessionFilters)
    sort: SortField = "createdAt"
    descending: bool = True
    page_size: int = 20
    after: Cursor | None = None
    before: Cursor | None = None
    min_lsn: str | None = None


@dataclass(frozen=True, slots=True)
class CountQuery:
    filters: SessionFilters = field(default_factory=SessionFilters)
    min_lsn: str | None = None


@dataclass(frozen=True, slots=True)
class KeysetScan:
    """The one ordered index range a page reads: ``(sort key, id)`` strictly past ``start``.

    Walking backwards (``page[before]``) over a descending list is walking forwards over an
    ascending one, so every page is a single scan in one direction, reversed afterwards if needed.
    """

    ascending: bool
    start: Cursor | None
    limit: int  # one more than the page size: the extra row only says whether more exist

    @property
    def comparison(self) -> Literal[">", "<"]:
        return ">" if self.ascending else "<"

    @property
    def direction(self) -> Literal["ASC", "DESC"]:
        return "ASC" if self.ascending else "DESC"


def keyset_scan(query: ListQuery) -> KeysetScan:
    backwards = query.before is not None
    return KeysetScan(
        ascending=query.descending == backwards,
        start=query.after or query.before,
        limit=query.page_size + 1,
    )


@dataclass(frozen=True, slots=True)
class PageWindow(Generic[T]):
    """One page of rows in the order the client asked for, with its cursors."""

    items: list[T]
    next: str | None
    previous: str | None


def page_window(query: ListQuery, scanned: Sequence[T], key: Callable[[T], tuple[int, str]]) -> PageWindow[T]:
    """Cut the rows a :func:`keyset_scan` returned into the page and its next/previous cursors.

    ``key`` gives a row's ``(sort key in microseconds, id)`` as the scanned store had it: a cursor
    must point into the order that store paged by, even if another copy of the row has moved since.
    A page reached with ``page[before]`` always has a next page (the one it came from); one reached
    with ``page[after]`` always has a previous page.
    """
    backwards = query.before is not None
    has_more = len(scanned) > query.page_size
    items = list(scanned[: query.page_size])
    if backwards:
        items.reverse()
    if not items:
        return PageWindow([], None, None)

    def cursor_for(item: T) -> str:
        key_us, item_id = key(item)
        return Cursor(sort=query.sort, key_us=key_us, id=item_id).encode()

    more_after = backwards or has_more
    more_before = has_more if backwards else query.after is not None
    return PageWindow(
        items=items,
        next=cursor_for(items[-1]) if more_after else None,
        previous=cursor_for(items[0]) if more_before else None,
    )


def from_micros(value: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)


def parse_lsn(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not _LSN.match(raw):
        raise ValidationFailed("minLsn must be a Postgres LSN such as 0/16B3748 (from Threadline-Lsn)")
    return raw.upper()


def _check_keys(params: Mapping[str, list[str]], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise UnknownParameter(
            f"unknown query parameter(s): {', '.join(unknown)}",
            details={"unknown": unknown, "allowed": sorted(allowed)},
        )


def parse_list_query(params: Mapping[str, list[str]], *, now: datetime | None = None) -> ListQuery:
    _check_keys(params, _LIST_KEYS)
    now = now or datetime.now(UTC)
    sort_raw = _single(params, "sort") or "-createdAt"
    descending = sort_raw.startswith("-")
    sort_field = sort_raw.removeprefix("-")
    if sort_field not in ("createdAt", "lastActiveAt"):
        raise ValidationFailed("sort must be one of createdAt, -createdAt, lastActiveAt, -lastActiveAt")
    sort: SortField = "createdAt" if sort_field == "createdAt" else "lastActiveAt"
    size_raw = _single(params, "page[size]")
    page_size = 20
    if size_raw is not None:
        if not (size_raw.isascii() and size_raw.isdigit()) or not 1 <= int(size_raw) <= 100:
            raise ValidationFailed("page[size] must be an integer from 1 to 100")
        page_size = int(size_raw)
    after_raw = _single(params, "page[after]")
    before_raw = _single(params, "page[before]")
    if after_raw is not None and before_raw is not None:
        raise ValidationFailed("page[after] and page[before] cannot be used together")
    return ListQuery(
        filters=parse_filters(params, now),
        sort=sort,
        descending=descending,
        page_size=page_size,
        after=None if after_raw is None else Cursor.decode(after_raw, sort=sort, param="page[after]"),
        before=None if before_raw is None else Cursor.decode(before_raw, sort=sort, param="page[before]"),
        min_lsn=parse_lsn(_single(params, "minLsn")),
    )


def parse_count_query(params: Mapping[str, list[str]], *, now: datetime | None = None) -> CountQuery:
    _check_keys(params, _COUNT_KEYS)
    return CountQuery(
        filters=parse_filters(params, now or datetime.now(UTC)), min_lsn=parse_lsn(_single(params, "minLsn"))
    )
