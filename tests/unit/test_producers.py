"""Idempotent producers: threadline.streams.producers.decide."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.errors import ApiError, Conflict, Forbidden, ValidationFailed
from threadline.streams.producers import Producer, ProducerState, decide


def state(epoch: int, last_seq: int) -> ProducerState:
    return ProducerState(epoch=epoch, last_seq=last_seq, last_next_offset=100)


def test_a_new_producer_starting_at_zero_is_accepted() -> None:
    assert decide(None, Producer("p", epoch=0, seq=0)) == "accept"


def test_a_new_producer_may_start_at_any_epoch_with_seq_zero() -> None:
    assert decide(None, Producer("p", epoch=7, seq=0)) == "accept"


def test_a_new_producer_not_starting_at_zero_is_a_gap_with_the_expected_and_received_seq() -> None:
    with pytest.raises(Conflict) as raised:
        decide(None, Producer("p", epoch=0, seq=3))
    error = raised.value
    assert error.status_code == 409
    assert error.code == "producer_seq_gap"
    assert error.headers == {"Producer-Expected-Seq": "0", "Producer-Received-Seq": "3"}
    assert "'p'" in error.message


def test_the_next_sequence_in_the_same_epoch_is_accepted() -> None:
    assert decide(state(2, 4), Producer("p", epoch=2, seq=5)) == "accept"


def test_a_retry_of_the_last_sequence_is_a_duplicate() -> None:
    assert decide(state(2, 4), Producer("p", epoch=2, seq=4)) == "duplicate"


def test_a_retry_of_an_older_sequence_is_a_duplicate() -> None:
    assert decide(state(2, 4), Producer("p", epoch=2, seq=0)) == "duplicate"


def test_skipping_ahead_is_a_409_gap_naming_the_expected_and_received_seq() -> None:
    with pytest.raises(Conflict) as raised:
        decide(state(2, 4), Producer("p", epoch=2, seq=7))
    error = raised.value
    assert error.status_code == 409
    assert error.code == "producer_seq_gap"
    assert error.headers == {"Producer-Expected-Seq": "5", "Producer-Received-Seq": "7"}


def test_a_stale_epoch_is_fenced_with_403_and_the_current_epoch() -> None:
    with pytest.raises(Forbidden) as raised:
        decide(state(3, 10), Producer("p", epoch=2, seq=11))
    error = raised.value
    assert error.status_code == 403
    assert error.code == "producer_fenced"
    assert error.headers == {"Producer-Epoch": "3"}


def test_a_stale_epoch_is_fenced_even_when_its_seq_looks_like_a_duplicate() -> None:
    with pytest.raises(Forbidden):
        decide(state(3, 10), Producer("p", epoch=0, seq=0))


def test_a_new_epoch_starting_at_zero_is_accepted() -> None:
    assert decide(state(3, 10), Producer("p", epoch=4, seq=0)) == "accept"


def test_a_new_epoch_not_starting_at_zero_is_a_400() -> None:
    with pytest.raises(ValidationFailed) as raised:
        decide(state(3, 10), Producer("p", epoch=4, seq=11))
    error = raised.value
    assert error.status_code == 400
    assert error.code == "producer_epoch_seq"
    assert error.headers == {}


# The protocol's rules, written out independently of decide's branch order.
def expected_outcome(current: ProducerState | None, producer: Producer) -> tuple[str, int | None, str | None]:
    """("accept" | "duplicate" | "error", status, code)."""
    if current is None:
        return ("accept", None, None) if producer.seq == 0 else ("error", 409, "producer_seq_gap")
    if producer.epoch < current.epoch:
        return ("error", 403, "producer_fenced")
    if producer.epoch > current.epoch:
        return ("accept", None, None) if producer.seq == 0 else ("error", 400, "producer_epoch_seq")
    if producer.seq <= current.last_seq:
        return ("duplicate", None, None)
    if producer.seq == current.last_seq + 1:
        return ("accept", None, None)
    return ("error", 409, "producer_seq_gap")


states = st.none() | st.builds(
    ProducerState,
    epoch=st.integers(0, 5),
    last_seq=st.integers(0, 8),
    last_next_offset=st.integers(0, 1000),
)
producers = st.builds(Producer, id=st.just("p"), epoch=st.integers(0, 6), seq=st.integers(0, 10))


@given(states, producers)
def test_every_append_is_exactly_one_of_accept_duplicate_or_a_protocol_error(
    current: ProducerState | None, producer: Producer
) -> None:
    expected = expected_outcome(current, producer)
    try:
        outcome: tuple[str, int | None, str | None] = (decide(current, producer), None, None)
    except ApiError as exc:
        outcome = ("error", exc.status_code, exc.code)
    assert outcome == expected


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=60))
def test_a_server_that_keeps_the_accepted_state_accepts_each_epoch_as_0_1_2_without_gaps(
    attempts: list[tuple[int, int]],
) -> None:
    current: ProducerState | None = None
    accepted: list[tuple[int, int]] = []
    for epoch, seq in attempts:
        try:
            decision = decide(current, Producer("p", epoch, seq))
        except ApiError:
            continue
        if decision == "accept":
            accepted.append((epoch, seq))
            current = ProducerState(epoch, seq, last_next_offset=0)
        else:
            assert current is not None
            assert (epoch, seq) <= (current.epoch, current.last_seq)
    # Epochs never go back, and within an epoch the accepted seqs are exactly 0, 1, 2, ...
    assert [epoch for epoch, _ in accepted] == sorted(epoch for epoch, _ in accepted)
    for epoch in {epoch for epoch, _ in accepted}:
        seqs = [seq for e, seq in accepted if e == epoch]
        assert seqs == list(range(len(seqs)))
