"""Record layout in object storage and JSON mode: threadline.streams.records."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from threadline.errors import PayloadTooLarge, ValidationFailed
from threadline.streams.records import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MAX_RECORD_BYTES,
    blob_at,
    check_batch,
    encode_blob,
    iter_records,
    json_array,
    split_json,
)

MIB = 1024 * 1024


# --- blobs -----------------------------------------------------------------------------------


def test_a_blob_is_the_count_then_the_lengths_then_the_payloads_little_endian() -> None:
    assert encode_blob([b"ab", b"", b"xyz"]) == struct.pack("<IIII", 3, 2, 0, 3) + b"abxyz"


def test_an_empty_append_is_a_blob_of_four_zero_bytes_with_no_records() -> None:
    assert encode_blob([]) == b"\x00\x00\x00\x00"
    assert list(iter_records(encode_blob([]), 0)) == []


def test_records_are_read_back_as_memoryviews_of_the_payloads() -> None:
    data = encode_blob([b"one", b"two"]) + encode_blob([b"three"])
    views = list(iter_records(data, 10))
    assert all(isinstance(view, memoryview) for view in views)
    assert [bytes(view) for view in views] == [b"one", b"two", b"three"]


def test_a_read_from_the_middle_of_a_blob_starts_at_that_record() -> None:
    data = encode_blob([b"a", b"b", b"c"]) + encode_blob([b"d", b"e"])
    assert [bytes(v) for v in iter_records(data, 10, from_offset=11)] == [b"b", b"c", b"d", b"e"]


def test_a_read_stops_before_to_offset_even_inside_a_blob() -> None:
    data = encode_blob([b"a", b"b", b"c"]) + encode_blob([b"d", b"e"])
    assert [bytes(v) for v in iter_records(data, 10, from_offset=11, to_offset=14)] == [b"b", b"c", b"d"]


def test_a_read_entirely_past_the_data_is_empty() -> None:
    data = encode_blob([b"a", b"b"])
    assert list(iter_records(data, 10, from_offset=12)) == []
    assert list(iter_records(data, 10, from_offset=0, to_offset=10)) == []


def test_blob_at_returns_the_record_with_its_appends_first_offset_and_count() -> None:
    data = encode_blob([b"a", b"bb"]) + encode_blob([]) + encode_blob([b"ccc", b"d", b"ee"])
    assert blob_at(data, 5, 5) == (b"a", 5, 2)
    assert blob_at(data, 5, 6) == (b"bb", 5, 2)
    assert blob_at(data, 5, 7) == (b"ccc", 7, 3)
    assert blob_at(data, 5, 9) == (b"ee", 7, 3)


def test_blob_at_outside_the_chunk_is_a_lookup_error() -> None:
    data = encode_blob([b"a", b"bb"])
    with pytest.raises(LookupError):
        blob_at(data, 5, 7)
    with pytest.raises(LookupError):
        blob_at(data, 5, 4)


appends = st.lists(st.lists(st.binary(max_size=12), max_size=6), max_size=8)


@given(st.lists(st.binary(max_size=64), max_size=30))
def test_any_list_of_byte_strings_encodes_and_decodes_back(records: list[bytes]) -> None:
    assert [bytes(v) for v in iter_records(encode_blob(records), 0)] == records


@given(
    appends,
    st.integers(0, 1 << 40),
    st.integers(-3, 60),
    st.none() | st.integers(-3, 60),
)
def test_a_slice_of_several_concatenated_blobs_is_exactly_the_expected_records(
    blobs: list[list[bytes]], first: int, from_delta: int, to_delta: int | None
) -> None:
    data = b"".join(encode_blob(blob) for blob in blobs)
    flat = [record for blob in blobs for record in blob]
    from_offset = max(0, first + from_delta)
    to_offset = None if to_delta is None else first + to_delta
    expected = [
        record
        for index, record in enumerate(flat)
        if from_offset <= first + index and (to_offset is None or first + index < to_offset)
    ]
    got = [bytes(v) for v in iter_records(data, first, from_offset, to_offset)]
    assert got == expected


@given(appends, st.integers(0, 1 << 40))
def test_blob_at_finds_every_record_of_several_concatenated_blobs(
    blobs: list[list[bytes]], first: int
) -> None:
    data = b"".join(encode_blob(blob) for blob in blobs)
    offset = first
    for blob in blobs:
        for index, record in enumerate(blob):
            assert blob_at(data, first, offset + index) == (record, offset, len(blob))
        offset += len(blob)
    with pytest.raises(LookupError):
        blob_at(data, first, offset)


# --- limits ----------------------------------------------------------------------------------


def test_a_record_of_exactly_one_mib_is_allowed() -> None:
    check_batch([b"x" * MAX_RECORD_BYTES])
    assert MAX_RECORD_BYTES == MIB


def test_a_record_over_one_mib_is_413_record_too_large() -> None:
    with pytest.raises(PayloadTooLarge) as raised:
        check_batch([b"small", b"x" * (MIB + 1)])
    assert raised.value.status_code == 413
    assert raised.value.code == "record_too_large"
    assert str(MIB + 1) in raised.value.message


def test_a_thousand_records_are_allowed_and_one_more_is_batch_too_large() -> None:
    assert MAX_BATCH_RECORDS == 1000
    check_batch([b""] * 1000)
    with pytest.raises(PayloadTooLarge) as raised:
        check_batch([b""] * 1001)
    assert raised.value.status_code == 413
    assert raised.value.code == "batch_too_large"
    assert "1001" in raised.value.message


def test_exactly_four_mib_in_a_batch_is_allowed_and_one_byte_more_is_batch_too_large() -> None:
    assert MAX_BATCH_BYTES == 4 * MIB
    check_batch([b"x" * MIB] * 4)
    with pytest.raises(PayloadTooLarge) as raised:
        check_batch([b"x" * MIB] * 4 + [b"y"])
    assert raised.value.code == "batch_too_large"


def test_too_many_records_is_reported_before_a_record_that_is_too_large() -> None:
    with pytest.raises(PayloadTooLarge) as raised:
        check_batch([b"x" * (MIB + 1)] + [b""] * 1000)
    assert raised.value.code == "batch_too_large"


# --- JSON mode -------------------------------------------------------------------------------


def test_a_json_value_is_one_record_in_canonical_form() -> None:
    assert split_json(b' {"a" : 1, "b": [true, null]} ', allow_empty_array=False) == [
        b'{"a":1,"b":[true,null]}'
    ]


def test_a_json_scalar_is_one_record() -> None:
    assert split_json(b'"hi"', allow_empty_array=False) == [b'"hi"']
    assert split_json(b"null", allow_empty_array=False) == [b"null"]


def test_a_json_array_is_one_record_per_element() -> None:
    assert split_json(b'[1, "x", {"b": null}, [2, 3]]', allow_empty_array=False) == [
        b"1",
        b'"x"',
        b'{"b":null}',
        b"[2,3]",
    ]


def test_a_long_json_array_is_split_whole_limits_are_check_batchs_job() -> None:
    body = b"[" + b",".join(b"%d" % i for i in range(1500)) + b"]"
    records = split_json(body, allow_empty_array=False)
    assert records == [b"%d" % i for i in range(1500)]


def test_an_empty_json_array_appends_nothing_when_allowed() -> None:
    assert split_json(b"[]", allow_empty_array=True) == []


def test_an_empty_json_array_is_refused_when_not_allowed() -> None:
    with pytest.raises(ValidationFailed) as raised:
        split_json(b" [ ] ", allow_empty_array=False)
    assert raised.value.status_code == 400
    assert raised.value.code == "empty_append"


def test_an_array_holding_an_empty_array_is_one_record() -> None:
    assert split_json(b"[[]]", allow_empty_array=False) == [b"[]"]


@pytest.mark.parametrize("body", [b"", b"{", b"[1,]", b"nope", b"\xff", b'{"a":1} {"b":2}', b"NaN"])
def test_invalid_json_is_400_invalid_json(body: bytes) -> None:
    with pytest.raises(ValidationFailed) as raised:
        split_json(body, allow_empty_array=True)
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_json"


def test_a_json_read_is_one_array_of_the_records() -> None:
    assert json_array([b"1", memoryview(b'"x"'), b'{"a":[]}']) == b'[1,"x",{"a":[]}]'


def test_a_json_read_of_no_records_is_an_empty_array() -> None:
    assert json_array([]) == b"[]"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=5), children, max_size=4
        )
    ),
    max_leaves=12,
)


@given(st.lists(json_values, max_size=30))
def test_split_json_of_a_json_array_of_canonical_records_gives_the_records_back(values: list[Any]) -> None:
    records = [orjson.dumps(value) for value in values]
    assert split_json(json_array(records), allow_empty_array=True) == records


@given(json_values)
def test_any_non_array_json_value_is_exactly_one_record(value: Any) -> None:
    assume(not isinstance(value, list))
    body = orjson.dumps(value)
    assert split_json(body, allow_empty_array=False) == [body]
