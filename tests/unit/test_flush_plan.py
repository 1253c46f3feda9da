"""The committer's pure planning: decisions against a head, what a flush writes, and the heads it
remembers for the one-statement commit."""

from __future__ import annotations

import pytest

from threadline.errors import ApiError
from threadline.streams.flush_plan import (
    AppendRequest,
    Decided,
    FlushWrite,
    Head,
    KnownHeads,
    ProducerKey,
    decide_append,
    tail_changes,
)
from threadline.streams.producers import Producer, ProducerState

JSON = "application/json"


def _head(next_offset: int = 0, **overrides: object) -> Head:
    values: dict[str, object] = {
        "next_offset": next_offset,
        "content_type": JSON,
        "closed": False,
        "deleted": False,
        "expired": False,
        "session_expired": False,
        "last_stream_seq": None,
        "session_id": None,
    }
    values.update(overrides)
    return Head(**values)  # type: ignore[arg-type]


def test_adjacent_appends_of_a_stream_index_as_one_chunk() -> None:
    head = _head(10)
    producers: dict[ProducerKey, ProducerState] = {}
    changed: set[ProducerKey] = set()
    first = decide_append(
        AppendRequest(1, [b"1", b"2"], JSON), Decided(0, 8, 2), head, "k", producers, changed
    )
    second = decide_append(AppendRequest(1, [b"3"], JSON), Decided(8, 5, 1), head, "k", producers, changed)
    assert (first.start_offset, first.next_offset, second.start_offset, second.next_offset) == (
        10,
        12,
        12,
        13,
    )
    assert [(c.start, c.end, c.byte_start, c.byte_length) for c in head.chunks] == [(10, 13, 0, 13)]
    assert (head.records, head.bytes, head.moved) == (3, 3, True)


def test_a_refused_append_changes_nothing() -> None:
    head = _head(5, last_stream_seq="b")
    with pytest.raises(ApiError) as refused:
        decide_append(AppendRequest(1, [b"1"], JSON, stream_seq="a"), Decided(0, 4, 1), head, "k", {}, set())
    assert refused.value.code == "stream_seq_conflict"
    assert (head.next_offset, head.chunks, head.moved) == (5, [], False)


def test_a_producer_retry_is_a_duplicate_answered_with_the_recorded_offset() -> None:
    head = _head(7)
    producers = {(1, "p"): ProducerState(0, 3, 7)}
    changed: set[ProducerKey] = set()
    outcome = decide_append(
        AppendRequest(1, [b"x"], JSON, producer=Producer("p", 0, 3)),
        Decided(0, 4, 1),
        head,
        "k",
        producers,
        changed,
    )
    assert outcome.duplicate
    assert (outcome.next_offset, outcome.appended, changed, head.moved) == (7, 0, set(), False)


def test_the_write_lists_only_moved_heads_and_changed_producers() -> None:
    heads = {1: _head(0), 2: _head(4)}
    producers: dict[ProducerKey, ProducerState] = {(2, "q"): ProducerState(1, 0, 4)}
    changed: set[ProducerKey] = set()
    decide_append(
        AppendRequest(1, [b"a"], JSON, producer=Producer("p", 0, 0)),
        Decided(0, 4, 1),
        heads[1],
        "k",
        producers,
        changed,
    )
    write = FlushWrite.build("k", 4, heads, producers, changed, tail_changes(heads))
    assert not write.empty
    (key, size, chunk_streams, *_rest) = write.args
    assert (key, size, chunk_streams) == ("k", 4, [1])
    head_ids, head_next = write.args[7], write.args[8]
    assert (head_ids, head_next) == ([1], [1])
    assert (write.args[13], write.args[14], write.args[17]) == ([1], ["p"], [1])
    assert FlushWrite.build(None, 0, {3: _head(2)}, {}, set(), []).empty


def test_known_heads_are_all_or_nothing_and_copies() -> None:
    known = KnownHeads()
    known.remember({1: _head(3, last_stream_seq="s", session_id="sess")}, {(1, "p"): ProducerState(0, 2, 3)})
    assert known.heads_for([1, 2]) is None
    heads = known.heads_for([1])
    assert heads is not None
    heads[1].next_offset = 99  # a flush's working copy never changes what is remembered
    again = known.heads_for([1])
    assert again is not None
    assert (again[1].next_offset, again[1].last_stream_seq, again[1].session_id) == (3, "s", "sess")
    assert known.producer_states([(1, "p"), (1, "new"), (2, "p")]) == {
        (1, "p"): ProducerState(0, 2, 3),
        (1, "new"): None,
        (2, "p"): None,
    }


def test_known_heads_forget_streams_that_take_no_more_appends() -> None:
    known = KnownHeads()
    known.remember({1: _head(1), 2: _head(1), 3: _head(1), 4: _head(1)}, {})
    known.remember(
        {1: _head(2, closed=True), 2: _head(2, deleted=True), 3: _head(2, session_expired=True)},
        {},
    )
    assert len(known) == 1
    known.forget([4])
    assert len(known) == 0


def test_known_heads_keep_producers_across_commits_and_stay_bounded() -> None:
    known = KnownHeads(max_streams=2, max_producers_per_stream=2)
    known.remember({1: _head(1)}, {(1, "a"): ProducerState(0, 0, 1)})
    known.remember({1: _head(2)}, {(1, "b"): ProducerState(0, 0, 2)})
    assert known.producer_states([(1, "a")])[(1, "a")] == ProducerState(0, 0, 1)
    known.remember({1: _head(3)}, {(1, "c"): ProducerState(0, 0, 3)})
    assert known.producer_states([(1, "a")])[(1, "a")] is None  # the least recent producer went
    known.remember({2: _head(0)}, {})
    known.remember({3: _head(0)}, {})
    assert known.heads_for([1]) is None  # the least recent stream went
    assert known.heads_for([2, 3]) is not None
