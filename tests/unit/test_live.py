"""What an instance knows of a watched stream's tail: threadline.streams.live.StreamTail (pure parts)."""

from __future__ import annotations

import asyncio
import contextlib
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from threadline.streams.live import WAKE_SLICE, StreamTail, Waiter
from threadline.streams.wire import ChunkRef, TailChange


def chunk(start: int, end: int, key: str = "batches/a-b") -> ChunkRef:
    return ChunkRef(start, end, key, start * 10, (end - start) * 10)


def append(c: ChunkRef, *, closed: bool = False) -> TailChange:
    """The change the committer publishes for an append: its chunk ends at the new tail."""
    return TailChange(1, c.end, closed, c)


def test_a_new_tail_knows_nothing() -> None:
    tail = StreamTail(1)
    assert (tail.next_offset, tail.closed, list(tail.recent), tail.version) == (-1, False, [], 0)
    assert tail.chunks_from(0) is None


def test_an_append_moves_the_tail_remembers_its_chunk_and_wakes_waiters() -> None:
    async def go() -> None:
        tail = StreamTail(1)
        waiting = asyncio.ensure_future(tail.wait_beyond(0, asyncio.get_running_loop().time() + 60))
        await asyncio.sleep(0)
        assert len(tail.waiters) == 1
        assert tail.apply(append(chunk(0, 5))) is True
        assert tail.next_offset == 5
        assert list(tail.recent) == [chunk(0, 5)]
        assert tail.version == 1
        assert tail.waiters == {}
        assert await waiting is True

    asyncio.run(go())


def test_the_same_change_seen_again_is_old_news() -> None:
    async def go() -> None:
        tail = StreamTail(1)
        tail.apply(append(chunk(0, 5)))
        waiter = Waiter()
        waiting = asyncio.ensure_future(waiter.wait(tail, asyncio.get_running_loop().time() + 60))
        await asyncio.sleep(0)
        assert tail.apply(append(chunk(0, 5))) is False
        assert (tail.next_offset, tail.version, list(tail.recent)) == (5, 1, [chunk(0, 5)])
        await asyncio.sleep(0)
        assert not waiting.done()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert tail.waiters == {}  # a cancelled wait leaves nothing behind
        waiter.close()

    asyncio.run(go())


def test_a_wait_times_out_at_its_deadline_and_leaves_no_future_behind() -> None:
    async def go() -> None:
        tail = StreamTail(1)
        tail.apply(append(chunk(0, 5)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.05
        assert await tail.wait_beyond(5, deadline) is False
        assert loop.time() >= deadline - 0.002
        assert tail.waiters == {}
        assert await tail.wait_beyond(4, loop.time() + 60) is True  # already beyond: no wait

    asyncio.run(go())


def test_one_waiter_keeps_one_timer_across_waits_and_rearms_it_when_it_fires_early() -> None:
    """A reader woken by commits again and again moves its deadline later each time: its one
    timer fires at the first deadline, finds a later one, re-arms, and times out only then."""

    async def go() -> None:
        tail = StreamTail(1)
        tail.apply(append(chunk(0, 1)))
        loop = asyncio.get_running_loop()
        waiter = Waiter()
        first = loop.time() + 0.2
        waiting = asyncio.ensure_future(tail.wait_beyond(1, first, waiter))
        await asyncio.sleep(0)
        timer = waiter._timer
        assert timer is not None
        tail.apply(append(chunk(1, 2)))
        assert await waiting is True
        later = loop.time() + 0.5
        waiting = asyncio.ensure_future(tail.wait_beyond(2, later, waiter))
        await asyncio.sleep(0)
        assert waiter._timer is timer  # the same timer, not a new one per wait
        assert await waiting is False  # woken by the timer, re-armed, then timed out at `later`
        assert loop.time() >= later - 0.002
        waiter.close()

    asyncio.run(go())


def test_many_waiters_are_woken_in_slices_so_other_work_runs_between() -> None:
    async def go() -> None:
        tail = StreamTail(1)
        tail.apply(append(chunk(0, 1)))
        loop = asyncio.get_running_loop()
        order: list[str] = []

        async def reader() -> None:
            await tail.wait_beyond(1, loop.time() + 60)
            order.append("delivery")

        readers = [asyncio.ensure_future(reader()) for _ in range(WAKE_SLICE * 3)]
        await asyncio.sleep(0)
        assert len(tail.waiters) == WAKE_SLICE * 3
        tail.apply(append(chunk(1, 2)))
        # Work that becomes ready right after the commit (the writer's next request):
        loop.call_soon(order.append, "other")
        await asyncio.gather(*readers)
        assert order.count("delivery") == WAKE_SLICE * 3
        assert order.index("other") <= WAKE_SLICE  # not behind all of them

    asyncio.run(go())


def test_a_change_behind_the_tail_is_old_news() -> None:
    tail = StreamTail(1)
    tail.apply(append(chunk(0, 5)))
    tail.apply(append(chunk(5, 9)))
    assert tail.apply(append(chunk(3, 5))) is False
    assert tail.apply(TailChange(1, 7, True, None)) is False
    assert (tail.next_offset, tail.closed, tail.version) == (9, False, 2)


def test_contiguous_appends_are_kept_newest_last() -> None:
    tail = StreamTail(1)
    for c in (chunk(0, 5), chunk(5, 6), chunk(6, 9)):
        tail.apply(append(c))
    assert list(tail.recent) == [chunk(0, 5), chunk(5, 6), chunk(6, 9)]
    assert tail.next_offset == 9


def test_an_append_that_skips_ahead_starts_the_recent_chunks_over() -> None:
    tail = StreamTail(1)
    tail.apply(append(chunk(0, 5)))
    tail.apply(append(chunk(7, 9)))  # the change for [5, 7) was missed
    assert list(tail.recent) == [chunk(7, 9)]
    assert tail.next_offset == 9
    assert tail.chunks_from(5) is None
    assert tail.chunks_from(7) == [chunk(7, 9)]


def test_a_move_without_a_chunk_forgets_the_recent_chunks() -> None:
    tail = StreamTail(1)
    tail.apply(append(chunk(0, 5)))
    assert tail.apply(TailChange(1, 8, False, None)) is True
    assert (tail.next_offset, list(tail.recent)) == (8, [])
    assert tail.chunks_from(5) is None


def test_an_empty_chunk_counts_as_a_move_without_a_place() -> None:
    tail = StreamTail(1)
    tail.apply(append(chunk(0, 5)))
    assert tail.apply(TailChange(1, 6, False, ChunkRef(6, 6, "batches/x-y", 0, 0))) is True
    assert (tail.next_offset, list(tail.recent)) == (6, [])


def test_a_close_at_the_tail_is_news_once_and_keeps_the_recent_chunks() -> None:
    tail = StreamTail(1)
    tail.apply(append(chunk(0, 5)))
    assert tail.apply(TailChange(1, 5, True, None)) is True
    assert (tail.closed, tail.next_offset, tail.version) == (True, 5, 2)
    assert list(tail.recent) == [chunk(0, 5)]
    assert tail.apply(TailChange(1, 5, True, None)) is False
    assert tail.apply(TailChange(1, 5, False, None)) is False
    assert tail.closed is True


def test_a_last_append_that_closes_the_stream_moves_and_closes_at_once() -> None:
    tail = StreamTail(1)
    tail.apply(append(chunk(0, 5)))
    assert tail.apply(append(chunk(5, 7), closed=True)) is True
    assert (tail.next_offset, tail.closed) == (7, True)
    assert list(tail.recent) == [chunk(0, 5), chunk(5, 7)]


def test_a_closed_tail_stays_closed_when_a_late_open_change_moves_it() -> None:
    tail = StreamTail(1)
    tail.apply(TailChange(1, 5, True, None))
    assert tail.apply(TailChange(1, 6, False, None)) is True
    assert tail.closed is True


def test_chunks_from_returns_the_chunks_that_reach_from_the_offset_to_the_tail() -> None:
    tail = StreamTail(1)
    for c in (chunk(0, 5), chunk(5, 6), chunk(6, 9)):
        tail.apply(append(c))
    assert tail.chunks_from(0) == [chunk(0, 5), chunk(5, 6), chunk(6, 9)]
    assert tail.chunks_from(4) == [chunk(0, 5), chunk(5, 6), chunk(6, 9)]
    assert tail.chunks_from(5) == [chunk(5, 6), chunk(6, 9)]
    assert tail.chunks_from(8) == [chunk(6, 9)]
    assert tail.chunks_from(9) == []


def test_chunks_from_before_the_oldest_recent_chunk_is_none() -> None:
    tail = StreamTail(1)
    tail.apply(TailChange(1, 10, False, None))
    tail.apply(append(chunk(10, 12)))
    assert tail.chunks_from(10) == [chunk(10, 12)]
    assert tail.chunks_from(9) is None


def test_only_the_newest_256_chunks_are_kept() -> None:
    tail = StreamTail(1)
    for i in range(300):
        tail.apply(append(chunk(i, i + 1)))
    assert len(tail.recent) == 256
    assert tail.recent[0] == chunk(44, 45)
    assert tail.chunks_from(43) is None
    assert tail.chunks_from(44) == [chunk(i, i + 1) for i in range(44, 300)]


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[ChunkRef], list[TailChange], bool]:
    """A stream's true history of appends, and the changes one instance sees of it: its own
    commits and NOTIFYs, some twice, some out of order, some lost (then a resync without a chunk)."""
    bounds = [0]
    for _ in range(draw(st.integers(1, 25))):
        bounds.append(bounds[-1] + draw(st.integers(1, 4)))
    history = [chunk(a, b, key=f"batches/{i:x}-0") for i, (a, b) in enumerate(pairwise(bounds))]
    closed = draw(st.booleans())
    seen: list[TailChange] = []
    for index, c in enumerate(history):
        last = index == len(history) - 1
        change = append(c, closed=closed and last)
        fate = draw(st.sampled_from(["once", "once", "once", "twice", "lost", "early"]))
        if fate == "lost":
            seen.append(TailChange(1, c.end, closed and last, None))  # the resync's head read
        elif fate == "early" and seen:  # overtakes changes sent before it
            seen.insert(draw(st.integers(0, len(seen) - 1)), change)
        else:
            seen.append(change)
            if fate == "twice":
                seen.append(change)
    return history, seen, closed


@given(deliveries())
def test_whatever_arrives_the_tail_ends_right_and_chunks_from_only_serves_the_true_records(
    case: tuple[list[ChunkRef], list[TailChange], bool],
) -> None:
    history, seen, closed = case
    tail = StreamTail(1)
    versions = [tail.version]
    for change in seen:
        moved = tail.apply(change)
        versions.append(tail.version)
        assert moved == (versions[-1] == versions[-2] + 1)
    assert tail.next_offset == history[-1].end
    assert tail.closed is closed
    # The recent chunks are true chunks, contiguous, ending at the tail.
    assert all(c in history for c in tail.recent)
    assert all(a.end == b.start for a, b in pairwise(tail.recent))
    if tail.recent:
        assert tail.recent[-1].end == tail.next_offset
    for offset in range(tail.next_offset + 1):
        served = tail.chunks_from(offset)
        if served is None:
            assert not tail.recent or tail.recent[0].start > offset
            continue
        if offset == tail.next_offset:
            assert served == []
            continue
        assert served[0].start <= offset < served[0].end
        assert served[-1].end == tail.next_offset
        assert all(a.end == b.start for a, b in pairwise(served))
