"""Tail changes as NOTIFY payloads: threadline.streams.wire."""

from __future__ import annotations

from itertools import pairwise
from unittest.mock import patch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.streams import wire
from threadline.streams.wire import (
    MAX_NOTIFY_PAYLOAD,
    ChunkRef,
    TailChange,
    decode_notification,
    encode_notifications,
)

POSTGRES_NOTIFY_LIMIT = 8000  # Postgres refuses payloads of this many bytes or more


def test_a_change_without_a_chunk_is_three_fields() -> None:
    assert TailChange(7, 12, False, None).encode() == "7,12,0"
    assert TailChange(7, 12, True, None).encode() == "7,12,1"


def test_a_change_with_a_chunk_carries_its_start_object_key_and_byte_range() -> None:
    change = TailChange(7, 12, True, ChunkRef(10, 12, "batches/18a2b-0f3c", 128, 64))
    assert change.encode() == "7,12,1,10,batches/18a2b-0f3c,128,64"


def test_decoding_gives_the_change_back_with_the_chunk_ending_at_the_next_offset() -> None:
    assert TailChange.decode("7,12,1,10,batches/18a2b-0f3c,128,64") == TailChange(
        7, 12, True, ChunkRef(10, 12, "batches/18a2b-0f3c", 128, 64)
    )
    assert TailChange.decode("3,0,0") == TailChange(3, 0, False, None)


def test_a_payload_is_the_changes_joined_by_semicolons() -> None:
    changes = [TailChange(1, 5, False, ChunkRef(0, 5, "batches/a-b", 0, 10)), TailChange(2, 9, True, None)]
    assert encode_notifications(changes) == ["1,5,0,0,batches/a-b,0,10;2,9,1"]
    assert decode_notification("1,5,0,0,batches/a-b,0,10;2,9,1") == changes


def test_no_changes_make_no_payloads() -> None:
    assert encode_notifications([]) == []


def test_empty_parts_of_a_payload_are_skipped() -> None:
    assert decode_notification("") == []
    assert decode_notification("1,2,0;;3,4,1;") == [
        TailChange(1, 2, False, None),
        TailChange(3, 4, True, None),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        "1,2",
        "1,2,0,3",
        "1,2,0,3,key,4",  # six fields
        "1,2,0,3,key,4,5,6",  # eight fields
        "1,2,2",  # closed must be 0 or 1
        "1,2,true",
        "x,2,0",
        "1,y,0",
        "1,2,0,a,key,4,5",
        "1,2,0,3,key,four,5",
        "1,2,0,3,key,4,five",
        "1,2,0;garbage",  # one bad part spoils the payload
        "hello",
    ],
)
def test_a_malformed_payload_raises_value_error(payload: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ValueError is the documented contract
        decode_notification(payload)


def test_a_thousand_changes_split_into_payloads_under_the_limit_in_order() -> None:
    changes = [
        TailChange(
            stream_id=1_000_000 + i,
            next_offset=10_000 + i,
            closed=i % 97 == 0,
            chunk=ChunkRef(
                9_990 + i, 10_000 + i, f"batches/{1_700_000_000_000_000_000 + i:x}-0123456789ab", i, 512
            ),
        )
        for i in range(1000)
    ]
    payloads = encode_notifications(changes)
    assert len(payloads) > 1
    assert all(len(payload.encode()) < MAX_NOTIFY_PAYLOAD for payload in payloads)
    assert [change for payload in payloads for change in decode_notification(payload)] == changes


def test_a_payload_is_cut_exactly_when_the_next_change_would_reach_the_limit() -> None:
    def sized(length: int) -> TailChange:
        """A change whose encoding is ``length`` characters long."""
        prefix = "1,2,0,0,batches/"
        suffix = ",0,0"
        key = "batches/" + "a" * (length - len(prefix) - len(suffix))
        change = TailChange(1, 2, False, ChunkRef(0, 2, key, 0, 0))
        assert len(change.encode()) == length
        return change

    first = sized(4000)
    just_fits = sized(MAX_NOTIFY_PAYLOAD - 1 - 4000 - 1)  # joined: MAX_NOTIFY_PAYLOAD - 1 characters
    too_long = sized(MAX_NOTIFY_PAYLOAD - 4000 - 1)  # joined: exactly MAX_NOTIFY_PAYLOAD characters
    assert [len(p) for p in encode_notifications([first, just_fits])] == [MAX_NOTIFY_PAYLOAD - 1]
    assert [len(p) for p in encode_notifications([first, too_long])] == [4000, MAX_NOTIFY_PAYLOAD - 4001]


hex_part = st.text(alphabet="0123456789abcdef", min_size=1, max_size=40)
object_keys = st.builds(lambda a, b: f"batches/{a}-{b}", hex_part, hex_part) | st.builds(
    lambda stream, start, end, tag: f"segments/{stream}/{start:016d}-{end:016d}-{tag}",
    st.integers(1, 10**12),
    st.integers(0, 10**15),
    st.integers(0, 10**15),
    hex_part,
)


@st.composite
def tail_changes(draw: st.DrawFn) -> TailChange:
    next_offset = draw(st.integers(0, 2**62))
    closed = draw(st.booleans())
    chunk = None
    if draw(st.booleans()):
        # As the committer builds them: a change's chunk ends at its next offset.
        chunk = ChunkRef(
            start=draw(st.integers(0, next_offset)),
            end=next_offset,
            object_key=draw(object_keys),
            byte_start=draw(st.integers(0, 2**40)),
            byte_length=draw(st.integers(0, 2**32)),
        )
    return TailChange(draw(st.integers(1, 2**62)), next_offset, closed, chunk)


@given(tail_changes())
def test_any_change_decodes_to_itself(change: TailChange) -> None:
    assert TailChange.decode(change.encode()) == change


@given(st.lists(tail_changes(), max_size=400))
def test_payloads_are_under_the_limit_and_carry_every_change_once_in_order(changes: list[TailChange]) -> None:
    payloads = encode_notifications(changes)
    assert MAX_NOTIFY_PAYLOAD < POSTGRES_NOTIFY_LIMIT
    for payload in payloads:
        assert payload
        assert len(payload.encode()) < MAX_NOTIFY_PAYLOAD
    assert [change for payload in payloads for change in decode_notification(payload)] == changes


@given(st.lists(tail_changes(), min_size=1, max_size=400))
def test_a_payload_is_only_cut_where_the_next_change_would_not_fit(changes: list[TailChange]) -> None:
    payloads = encode_notifications(changes)
    for payload, following in pairwise(payloads):
        first_of_next = following.split(";", 1)[0]
        assert len(payload) + 1 + len(first_of_next) >= MAX_NOTIFY_PAYLOAD


@given(st.lists(tail_changes(), min_size=1, max_size=60), st.integers(1, 400))
def test_with_a_small_limit_many_payloads_still_carry_every_change_once_in_order(
    changes: list[TailChange], room: int
) -> None:
    # A limit just above the longest change: every change fits alone, often not two together.
    limit = max(len(change.encode()) for change in changes) + room
    with patch.object(wire, "MAX_NOTIFY_PAYLOAD", limit):
        payloads = encode_notifications(changes)
    for payload in payloads:
        assert len(payload) < limit
    for payload, following in pairwise(payloads):
        assert len(payload) + 1 + len(following.split(";", 1)[0]) >= limit
    assert [change for payload in payloads for change in decode_notification(payload)] == changes
