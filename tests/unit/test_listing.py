"""List queries and keyset paging: threadline.sessions.listing (not the filter[...] parsing)."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.errors import ValidationFailed
from threadline.sessions.listing import (
    Cursor,
    KeysetScan,
    ListQuery,
    PageWindow,
    SortField,
    keyset_scan,
    page_window,
    parse_list_query,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
Row = tuple[int, str]  # (sort key in microseconds, id): what the store orders by

sorts = st.sampled_from(["createdAt", "lastActiveAt"])


def token(raw: str | bytes) -> str:
    data = raw.encode() if isinstance(raw, str) else raw
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def parse(**params: str | list[str]) -> ListQuery:
    """``parse(page_size="5", sort="x")`` parses ``?page[size]=5&sort=x``."""
    return parse_list_query(
        {
            key.replace("_", "[", 1) + "]" if "_" in key else key: v if isinstance(v, list) else [v]
            for key, v in params.items()
        },
        now=NOW,
    )


# --- cursors ---------------------------------------------------------------------------------


def test_a_cursor_is_unpadded_base64url_json_of_sort_key_and_id() -> None:
    encoded = Cursor(sort="createdAt", key_us=1_700_000_000_000_000, id="session_x").encode()
    assert encoded == token('{"s":"createdAt","k":1700000000000000,"i":"session_x"}')
    assert "=" not in encoded


# Keys are microseconds of a datetime: 0001-01-01 to 9999-12-31.
KEYS = st.integers(-62_135_596_800_000_000, 253_402_300_799_999_999)


@given(sorts, KEYS, st.text(st.characters(exclude_characters="\x00"), max_size=40))
def test_any_cursor_decodes_to_itself(sort: SortField, key_us: int, item_id: str) -> None:
    cursor = Cursor(sort=sort, key_us=key_us, id=item_id)
    encoded = cursor.encode()
    assert re.fullmatch(r"[A-Za-z0-9_-]*", encoded)
    assert Cursor.decode(encoded, sort=sort, param="page[after]") == cursor


@pytest.mark.parametrize("key", [-62_135_596_800_000_001, 253_402_300_800_000_000, 300_000_000_000_000_000])
def test_a_cursor_whose_key_is_no_datetime_is_invalid_cursor(key: int) -> None:
    encoded = Cursor(sort="createdAt", key_us=key, id="x").encode()
    with pytest.raises(ValidationFailed) as raised:
        Cursor.decode(encoded, sort="createdAt", param="page[after]")
    assert raised.value.code == "invalid_cursor"


def test_a_cursor_made_for_another_sort_is_refused() -> None:
    encoded = Cursor(sort="createdAt", key_us=1, id="s").encode()
    with pytest.raises(ValidationFailed) as raised:
        Cursor.decode(encoded, sort="lastActiveAt", param="page[before]")
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_cursor"
    assert raised.value.message == "page[before] was made for sort=createdAt, not sort=lastActiveAt"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "!!!",
        "e",  # one base64 character cannot be decoded
        token("not json"),
        token(b"\xff\xfe\x00"),
        token("null"),
        token("[]"),
        token('"createdAt"'),
        token("{}"),
        token('{"s":"createdAt","k":1}'),
        token('{"s":"createdAt","i":"x"}'),
        token('{"k":1,"i":"x"}'),
        token('{"s":"createdAt","k":"soon","i":"x"}'),
        token('{"s":"createdAt","k":null,"i":"x"}'),
        token('{"s":"createdAt","k":[1],"i":"x"}'),
        token('{"s":"createdAt","k":NaN,"i":"x"}'),
        token('{"s":"updatedAt","k":1,"i":"x"}'),
        token('{"s":null,"k":1,"i":"x"}'),
    ],
)
def test_a_garbage_cursor_is_400_invalid_cursor(garbage: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        Cursor.decode(garbage, sort="createdAt", param="page[after]")
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_cursor"


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.fixed_dictionaries(
        {"s": sorts, "k": st.integers() | st.floats(allow_infinity=False), "i": json_values},
        optional={"x": json_values},
    )
    | st.fixed_dictionaries(
        {},
        optional={
            "s": sorts | json_values,
            "k": st.integers() | json_values,
            "i": json_values,
            "x": json_values,
        },
    ),
    sorts,
)
def test_any_json_object_as_a_cursor_decodes_or_is_invalid_cursor_and_nothing_else(
    payload: dict[str, Any], sort: SortField
) -> None:
    encoded = token(json.dumps(payload))
    outcome: Cursor | str
    try:
        outcome = Cursor.decode(encoded, sort=sort, param="page[after]")
    except ValidationFailed as exc:
        outcome = exc.code
    if isinstance(outcome, Cursor):
        assert outcome.sort == sort == payload["s"]
        assert outcome.key_us == int(payload["k"])
        assert outcome.id == str(payload["i"])
    else:
        assert outcome == "invalid_cursor"


def test_a_cursor_with_an_infinite_key_is_invalid_cursor() -> None:
    with pytest.raises(ValidationFailed):
        Cursor.decode(token('{"s":"createdAt","k":1e999,"i":"x"}'), sort="createdAt", param="page[after]")


def test_a_deeply_nested_cursor_is_invalid_cursor() -> None:
    with pytest.raises(ValidationFailed):
        Cursor.decode(token("[" * 5000), sort="createdAt", param="page[after]")


# --- keyset scans ----------------------------------------------------------------------------

A = Cursor(sort="createdAt", key_us=100, id="session_a")


@pytest.mark.parametrize(
    ("descending", "after", "before", "scan"),
    [
        (True, None, None, KeysetScan(ascending=False, start=None, limit=11)),
        (False, None, None, KeysetScan(ascending=True, start=None, limit=11)),
        (True, A, None, KeysetScan(ascending=False, start=A, limit=11)),
        (False, A, None, KeysetScan(ascending=True, start=A, limit=11)),
        (True, None, A, KeysetScan(ascending=True, start=A, limit=11)),
        (False, None, A, KeysetScan(ascending=False, start=A, limit=11)),
    ],
)
def test_a_page_is_one_scan_past_its_cursor_backwards_pages_scan_the_other_way(
    descending: bool, after: Cursor | None, before: Cursor | None, scan: KeysetScan
) -> None:
    query = ListQuery(descending=descending, page_size=10, after=after, before=before)
    assert keyset_scan(query) == scan


def test_an_ascending_scan_compares_greater_and_a_descending_one_less() -> None:
    assert (KeysetScan(True, None, 1).comparison, KeysetScan(True, None, 1).direction) == (">", "ASC")
    assert (KeysetScan(False, None, 1).comparison, KeysetScan(False, None, 1).direction) == ("<", "DESC")


# --- paging over a simulated store -----------------------------------------------------------


def store_scan(rows: Sequence[Row], scan: KeysetScan) -> list[Row]:
    """What a store with an index on (sort key, id) returns for ``scan``."""
    ordered = sorted(rows, reverse=not scan.ascending)
    if scan.start is not None:
        start = (scan.start.key_us, scan.start.id)
        ordered = [row for row in ordered if (row > start if scan.ascending else row < start)]
    return ordered[: scan.limit]


def fetch(rows: Sequence[Row], query: ListQuery) -> PageWindow[Row]:
    return page_window(query, store_scan(rows, keyset_scan(query)), key=lambda row: row)


def cursor_at(encoded: str | None, sort: SortField) -> Row | None:
    if encoded is None:
        return None
    cursor = Cursor.decode(encoded, sort=sort, param="p")
    return (cursor.key_us, cursor.id)


def test_the_first_page_has_a_next_cursor_at_its_last_row_and_no_previous() -> None:
    rows = [(10, "a"), (20, "b"), (20, "c"), (30, "d")]
    page = fetch(rows, ListQuery(sort="createdAt", descending=True, page_size=3))
    assert page.items == [(30, "d"), (20, "c"), (20, "b")]
    assert cursor_at(page.next, "createdAt") == (20, "b")
    assert page.previous is None


def test_a_page_after_a_cursor_has_a_previous_cursor_at_its_first_row() -> None:
    rows = [(10, "a"), (20, "b"), (20, "c"), (30, "d")]
    after = Cursor("createdAt", 20, "b")
    page = fetch(rows, ListQuery(sort="createdAt", descending=True, page_size=3, after=after))
    assert page.items == [(10, "a")]
    assert page.next is None
    assert cursor_at(page.previous, "createdAt") == (10, "a")


def test_a_page_before_a_cursor_is_in_client_order_and_always_has_a_next_page() -> None:
    rows = [(10, "a"), (20, "b"), (20, "c"), (30, "d")]
    before = Cursor("createdAt", 10, "a")
    page = fetch(rows, ListQuery(sort="createdAt", descending=True, page_size=2, before=before))
    assert page.items == [(20, "c"), (20, "b")]
    assert cursor_at(page.next, "createdAt") == (20, "b")
    assert cursor_at(page.previous, "createdAt") == (20, "c")


def test_an_empty_page_has_no_cursors() -> None:
    assert fetch([], ListQuery(page_size=5)) == PageWindow([], None, None)
    past_the_end = ListQuery(page_size=5, after=Cursor("createdAt", 0, ""))
    assert fetch([(10, "a")], past_the_end) == PageWindow([], None, None)


rows_strategy = st.lists(
    st.tuples(st.integers(0, 6), st.sampled_from([f"session_{i:02d}" for i in range(30)])),
    unique=True,
    max_size=30,
)


@given(rows_strategy, st.integers(1, 7), st.booleans(), sorts)
def test_paging_forward_then_backward_visits_every_row_once_in_order(
    rows: list[Row], size: int, descending: bool, sort: SortField
) -> None:
    order = sorted(rows, reverse=descending)

    # Forward from the first page, following `next`.
    forward: list[list[Row]] = []
    query = ListQuery(sort=sort, descending=descending, page_size=size)
    while True:
        page = fetch(rows, query)
        forward.append(page.items)
        if forward[1:]:
            assert cursor_at(page.previous, sort) == page.items[0]
        else:
            assert page.previous is None
        if page.next is None:
            break
        assert cursor_at(page.next, sort) == page.items[-1]
        query = ListQuery(
            sort=sort,
            descending=descending,
            page_size=size,
            after=Cursor.decode(page.next, sort=sort, param="p"),
        )
    assert [row for items in forward for row in items] == order
    assert len(forward) == max(1, math.ceil(len(order) / size))
    assert all(len(items) == size for items in forward[:-1])

    # Backward from the last page, following `previous`.
    backward: list[list[Row]] = [forward[-1]]
    previous = page.previous
    while previous is not None:
        query = ListQuery(
            sort=sort,
            descending=descending,
            page_size=size,
            before=Cursor.decode(previous, sort=sort, param="p"),
        )
        page = fetch(rows, query)
        at = cursor_at(previous, sort)
        assert at is not None
        first = order.index(at)
        assert page.items == order[max(0, first - size) : first]
        assert cursor_at(page.next, sort) == page.items[-1]
        backward.append(page.items)
        previous = page.previous
        if previous is not None:
            assert cursor_at(previous, sort) == page.items[0]
    assert [row for items in reversed(backward) for row in items] == order


@given(rows_strategy, st.integers(1, 7), st.booleans(), st.tuples(st.integers(-1, 7), st.text(max_size=12)))
def test_a_page_after_any_position_is_the_next_rows_past_it_even_if_that_row_is_gone(
    rows: list[Row], size: int, descending: bool, position: Row
) -> None:
    order = sorted(rows, reverse=descending)
    past = [row for row in order if (row < position if descending else row > position)]
    after = Cursor("createdAt", *position)
    page = fetch(rows, ListQuery(descending=descending, page_size=size, after=after))
    assert page.items == past[:size]
    if page.items:
        assert cursor_at(page.previous, "createdAt") == page.items[0]
        assert cursor_at(page.next, "createdAt") == (page.items[-1] if len(past) > size else None)


# --- parse_list_query (sort and page parameters) ---------------------------------------------


def test_the_default_list_is_newest_created_first_twenty_a_page() -> None:
    query = parse_list_query({}, now=NOW)
    assert (query.sort, query.descending, query.page_size) == ("createdAt", True, 20)
    assert (query.after, query.before, query.min_lsn) == (None, None, None)


@pytest.mark.parametrize(
    ("sort", "field", "descending"),
    [
        ("createdAt", "createdAt", False),
        ("-createdAt", "createdAt", True),
        ("lastActiveAt", "lastActiveAt", False),
        ("-lastActiveAt", "lastActiveAt", True),
    ],
)
def test_sort_names_a_field_and_a_minus_means_descending(sort: str, field: str, descending: bool) -> None:
    query = parse(sort=sort)
    assert (query.sort, query.descending) == (field, descending)


@pytest.mark.parametrize("sort", ["updatedAt", "--createdAt", "+createdAt", "created_at", "CREATEDAT", "-"])
def test_an_unknown_sort_is_a_400(sort: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse(sort=sort)
    assert raised.value.status_code == 400
    assert raised.value.code == "validation_error"
    assert raised.value.message.startswith("sort must be one of")


@pytest.mark.parametrize(("size", "expected"), [("1", 1), ("20", 20), ("100", 100), ("007", 7)])
def test_page_size_from_1_to_100_is_taken(size: str, expected: int) -> None:
    assert parse(page_size=size).page_size == expected


@pytest.mark.parametrize("size", ["0", "101", "-1", "1.5", "ten", "", " 5", "1e2"])
def test_page_size_outside_1_to_100_or_not_a_number_is_a_400(size: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse(page_size=size)
    assert raised.value.code == "validation_error"
    assert raised.value.message == "page[size] must be an integer from 1 to 100"


def test_page_size_in_superscript_digits_is_a_400() -> None:
    with pytest.raises(ValidationFailed):
        parse(page_size="²")


def test_page_after_and_page_before_are_decoded_for_the_requested_sort() -> None:
    cursor = Cursor("lastActiveAt", 5, "session_x")
    assert parse(sort="lastActiveAt", page_after=cursor.encode()).after == cursor
    assert parse(sort="-lastActiveAt", page_before=cursor.encode()).before == cursor


def test_page_after_and_page_before_together_are_a_400() -> None:
    cursor = Cursor("createdAt", 5, "session_x").encode()
    with pytest.raises(ValidationFailed) as raised:
        parse(page_after=cursor, page_before=cursor)
    assert raised.value.message == "page[after] and page[before] cannot be used together"


def test_a_page_cursor_from_another_sort_is_invalid_cursor() -> None:
    cursor = Cursor("createdAt", 5, "session_x").encode()
    with pytest.raises(ValidationFailed) as raised:
        parse(sort="lastActiveAt", page_after=cursor)
    assert raised.value.code == "invalid_cursor"
    assert raised.value.message.startswith("page[after] was made for sort=createdAt")


def test_a_garbage_page_cursor_is_invalid_cursor_naming_the_parameter() -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse(page_before="%%%")
    assert raised.value.code == "invalid_cursor"
    assert raised.value.message == "page[before] is not a valid cursor"


@pytest.mark.parametrize("key", ["sort", "page[size]", "page[after]"])
def test_a_parameter_given_twice_is_a_400(key: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_list_query({key: ["1", "2"]}, now=NOW)
    assert raised.value.code == "validation_error"
    assert raised.value.message.startswith(f"{key} was given 2 times")


def test_an_unknown_parameter_is_400_unknown_parameter() -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_list_query({"page[sise]": ["5"], "limit": ["5"]}, now=NOW)
    assert raised.value.code == "unknown_parameter"
    assert raised.value.details["unknown"] == ["limit", "page[sise]"]


def test_min_lsn_is_upper_cased() -> None:
    assert parse(minLsn="0/16b3748").min_lsn == "0/16B3748"


@pytest.mark.parametrize("lsn", ["16B3748", "0/", "/1", "0/123456789", "g/1", "0/1/2"])
def test_a_malformed_min_lsn_is_a_400(lsn: str) -> None:
    with pytest.raises(ValidationFailed):
        parse(minLsn=lsn)


def test_a_cursor_whose_id_holds_a_nul_is_invalid_cursor() -> None:
    encoded = Cursor(sort="createdAt", key_us=1, id="a\x00b").encode()
    with pytest.raises(ValidationFailed) as raised:
        Cursor.decode(encoded, sort="createdAt", param="page[after]")
    assert raised.value.code == "invalid_cursor"
