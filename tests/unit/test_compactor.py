"""Which batch chunks the compactor merges: threadline.streams.compactor.plan_runs."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from threadline.streams.compactor import plan_runs
from threadline.streams.wire import ChunkRef


def chunks(*spans: tuple[int, int, int]) -> list[ChunkRef]:
    """``(start, end, byte_length)`` each, in distinct objects."""
    return [ChunkRef(start, end, f"batches/{i:04x}", 0, size) for i, (start, end, size) in enumerate(spans)]


def test_contiguous_chunks_make_one_run() -> None:
    c = chunks((0, 1, 10), (1, 3, 10), (3, 4, 10))
    assert plan_runs(c, max_bytes=100) == [c]


def test_a_gap_in_offsets_ends_a_run() -> None:
    c = chunks((0, 1, 10), (1, 2, 10), (3, 4, 10), (4, 5, 10))
    assert plan_runs(c, max_bytes=100) == [c[:2], c[2:]]


def test_a_single_chunk_is_never_a_run() -> None:
    assert plan_runs(chunks((0, 1, 10)), max_bytes=100) == []
    assert plan_runs(chunks((0, 1, 10), (2, 3, 10), (4, 5, 10)), max_bytes=100) == []


def test_no_chunks_make_no_runs() -> None:
    assert plan_runs([], max_bytes=100) == []


def test_a_run_may_reach_max_bytes_exactly() -> None:
    c = chunks((0, 1, 4), (1, 2, 6))
    assert plan_runs(c, max_bytes=10) == [c]


def test_a_run_ends_before_the_chunk_that_would_take_it_over_max_bytes() -> None:
    c = chunks((0, 1, 5), (1, 2, 5), (2, 3, 5), (3, 4, 5))
    assert plan_runs(c, max_bytes=10) == [c[:2], c[2:]]


def test_a_chunk_left_alone_by_the_size_limit_is_dropped() -> None:
    c = chunks((0, 1, 4), (1, 2, 4), (2, 3, 4))
    assert plan_runs(c, max_bytes=8) == [c[:2]]


def test_a_chunk_larger_than_max_bytes_is_never_part_of_a_run() -> None:
    c = chunks((0, 1, 3), (1, 2, 20), (2, 3, 3), (3, 4, 3))
    assert plan_runs(c, max_bytes=10) == [c[2:]]


def test_the_default_limit_is_eight_mib() -> None:
    mib = 1024 * 1024
    c = chunks((0, 1, 4 * mib), (1, 2, 4 * mib), (2, 3, 1))
    assert plan_runs(c) == [c[:2]]


@st.composite
def chunk_lists(draw: st.DrawFn) -> list[ChunkRef]:
    """Chunks ordered by offset, as the compactor's query returns them, with random gaps."""
    result: list[ChunkRef] = []
    offset = draw(st.integers(0, 1000))
    for i in range(draw(st.integers(0, 40))):
        offset += draw(st.sampled_from([0, 0, 0, 1, 5]))  # mostly contiguous
        end = offset + draw(st.integers(1, 5))
        key = f"batches/{draw(st.integers(0, 3)):x}"
        result.append(ChunkRef(offset, end, key, i * 7, draw(st.integers(0, 40))))
        offset = end
    return result


@given(chunk_lists(), st.integers(1, 120))
def test_runs_are_contiguous_slices_of_at_least_two_chunks_within_max_bytes_in_order(
    c: list[ChunkRef], max_bytes: int
) -> None:
    runs = plan_runs(c, max_bytes=max_bytes)
    last_index = -1
    for run in runs:
        assert len(run) >= 2
        assert sum(chunk.byte_length for chunk in run) <= max_bytes
        assert all(a.end == b.start for a, b in pairwise(run))
        first = c.index(run[0])
        assert first > last_index  # in order, no chunk in two runs
        assert c[first : first + len(run)] == run  # a slice of the input, nothing skipped
        last_index = first + len(run) - 1


@given(chunk_lists(), st.integers(1, 120))
def test_runs_are_greedy_no_run_could_take_the_chunk_after_it(c: list[ChunkRef], max_bytes: int) -> None:
    runs = plan_runs(c, max_bytes=max_bytes)
    in_runs = {id(chunk) for run in runs for chunk in run}
    for run in runs:
        after = c.index(run[-1]) + 1
        if after < len(c):
            nxt = c[after]
            assert nxt.start != run[-1].end or sum(x.byte_length for x in run) + nxt.byte_length > max_bytes
    # A chunk left out could not have started a run with the chunk after it either.
    for index, chunk in enumerate(c[:-1]):
        if id(chunk) not in in_runs:
            nxt = c[index + 1]
            assert nxt.start != chunk.end or chunk.byte_length + nxt.byte_length > max_bytes
