"""Client-visible offsets: threadline.streams.offsets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.errors import ValidationFailed
from threadline.streams.offsets import NOW, START, format_offset, parse_offset, read_start

positions = st.integers(0, 10**16 - 1)


def test_an_offset_is_sixteen_zeros_an_underscore_and_the_position_in_sixteen_digits() -> None:
    assert format_offset(0) == "0000000000000000_0000000000000000"
    assert format_offset(42) == "0000000000000000_0000000000000042"
    assert format_offset(10**16 - 1) == "0000000000000000_9999999999999999"


def test_minus_one_is_the_start_and_now_is_the_tail() -> None:
    assert (START, NOW) == ("-1", "now")
    assert parse_offset("-1") == "start"
    assert parse_offset("now") == "now"


def test_the_reference_servers_spelling_of_the_start_is_offset_zero() -> None:
    assert parse_offset("0000000000000000_0000000000000000") == 0


@given(positions)
def test_format_then_parse_gives_the_position_back(position: int) -> None:
    assert parse_offset(format_offset(position)) == position


@given(positions, positions)
def test_offsets_sort_as_strings_exactly_as_their_positions_sort(a: int, b: int) -> None:
    assert (format_offset(a) < format_offset(b)) == (a < b)
    assert (format_offset(a) == format_offset(b)) == (a == b)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "-2",
        "NOW",
        "start",
        "0000000000000000_000000000000001",  # 15 digits
        "0000000000000000_00000000000000001",  # 17 digits
        "0000000000000000-0000000000000001",
        "0000000000000000_000000000000000a",
        " 0000000000000000_0000000000000001",
        "0000000000000000_0000000000000001 ",
        "0000000000000000_-000000000000001",
    ],
)
def test_a_malformed_offset_is_400_invalid_offset(text: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_offset(text)
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_offset"


def test_the_error_names_the_parameter_it_came_from() -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_offset("bogus", name="Last-Event-ID")
    assert raised.value.message.startswith("Last-Event-ID must be")


@pytest.mark.parametrize("text", ["0000000000000001_0000000000000000", "9999999999999999_0000000000000005"])
def test_a_non_zero_first_part_is_offset_out_of_range(text: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_offset(text, name="offset")
    assert raised.value.status_code == 400
    assert raised.value.code == "offset_out_of_range"


def test_an_offset_with_a_trailing_newline_is_invalid() -> None:
    with pytest.raises(ValidationFailed):
        parse_offset("0000000000000000_0000000000000005\n")


def test_an_offset_in_non_ascii_digits_is_invalid() -> None:
    with pytest.raises(ValidationFailed):
        parse_offset("\u0660" * 16 + "_" + "\u0660" * 15 + "\u0665")


def test_reading_from_start_begins_at_the_trim_point() -> None:
    assert read_start("start", trim_offset=7, next_offset=20) == 7


def test_reading_from_now_begins_at_the_tail() -> None:
    assert read_start("now", trim_offset=7, next_offset=20) == 20


def test_reading_from_an_offset_up_to_the_tail_begins_there() -> None:
    assert read_start(12, trim_offset=7, next_offset=20) == 12
    assert read_start(20, trim_offset=7, next_offset=20) == 20


def test_reading_from_before_the_trim_point_is_left_to_the_caller() -> None:
    assert read_start(3, trim_offset=7, next_offset=20) == 3


def test_reading_from_past_the_tail_is_400_offset_out_of_range() -> None:
    with pytest.raises(ValidationFailed) as raised:
        read_start(21, trim_offset=7, next_offset=20)
    assert raised.value.status_code == 400
    assert raised.value.code == "offset_out_of_range"


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000))
def test_a_read_starts_at_the_offset_itself_exactly_when_it_is_not_past_the_tail(
    position: int, trim: int, tail: int
) -> None:
    if position <= tail:
        assert read_start(position, trim_offset=trim, next_offset=tail) == position
    else:
        with pytest.raises(ValidationFailed):
            read_start(position, trim_offset=trim, next_offset=tail)
