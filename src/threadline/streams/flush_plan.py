"""A flush's decisions and what it writes, apart from how it talks to Postgres.

The committer decides every append of a flush against the heads of its streams: under row locks
(lock-and-decide), or, in the steady state, against the heads it remembers from its own last
commit of those streams (:class:`KnownHeads`), in which case the one-statement commit checks that
the heads still hold those values before it writes. Both paths decide with :func:`decide_append`
and write the same :class:`FlushWrite`, so they cannot disagree on what an append means.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from threadline.errors import SessionExpired, StreamGone, StreamNotFound, StreamSeqConflict
from threadline.streams.errors import check_content_type, stream_closed
from threadline.streams.producers import Producer, ProducerState, decide
from threadline.streams.wire import NOTIFY_CHANNEL, ChunkRef, TailChange, encode_notifications

__all__ = [
    "AppendOutcome",
    "AppendRequest",
    "Decided",
    "FlushWrite",
    "Head",
    "KnownHeads",
    "ProducerKey",
    "decide_append",
    "tail_changes",
]

ProducerKey = tuple[int, str]


@dataclass(eq=False, slots=True)
class AppendRequest:
    stream_id: int
    records: Sequence[bytes]
    content_type: str | None = None  # the request's; None skips the match (close-only, empty body)
    close: bool = False
    producer: Producer | None = None
    stream_seq: str | None = None


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    start_offset: int  # offset of the first record appended (== next_offset when none)
    next_offset: int  # Stream-Next-Offset after this append
    appended: int
    closed: bool  # the stream is closed after this append
    duplicate: bool = False  # a producer retry of an append already acknowledged
    producer_epoch: int | None = None
    producer_seq: int | None = None  # for a duplicate: the highest sequence accepted


@dataclass(slots=True)
class Head:
    """One stream's head, as the flush's decisions change it."""

    next_offset: int
    content_type: str
    closed: bool
    deleted: bool
    expired: bool
    session_expired: bool
    last_stream_seq: str | None
    session_id: str | None
    records: int = 0
    bytes: int = 0
    close_now: bool = False
    stream_seq_changed: bool = False
    chunks: list[ChunkRef] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        return bool(self.records or self.close_now or self.stream_seq_changed)

    @property
    def writable(self) -> bool:
        """Appends could still be accepted: worth remembering for the next flush."""
        return not (self.closed or self.deleted or self.expired or self.session_expired)


@dataclass(frozen=True, slots=True)
class Decided:
    """Where one append's records went in the batch object."""

    blob_start: int
    blob_length: int
    size: int


def decide_append(
    request: AppendRequest,
    placed: Decided,
    head: Head | None,
    key: str,
    producers: dict[ProducerKey, ProducerState],
    changed_producers: set[ProducerKey],
) -> AppendOutcome:
    """Decide one append against ``head`` (and ``producers``) and apply it to them.

    Raises the append's ApiError when it is refused; a refused append changes nothing.
    """
    if head is None or head.expired:
        raise StreamNotFound("stream not found")
    if head.deleted:
        raise StreamGone()
    producer = request.producer
    state = producers.get((request.stream_id, producer.id)) if producer is not None else None
    if producer is not None and decide(state, producer) == "duplicate":
        assert state is not None
        return AppendOutcome(
            start_offset=state.last_next_offset,
            next_offset=state.last_next_offset,
            appended=0,
            closed=head.closed,
            duplicate=True,
            producer_epoch=state.epoch,
            producer_seq=state.last_seq,
        )
    if head.closed:
        if not request.records and request.close:
            return AppendOutcome(head.next_offset, head.next_offset, 0, closed=True)
        raise stream_closed(head.next_offset)
    if head.session_expired:
        raise SessionExpired("the session has expired; its channels take no appends")
    if request.records and request.content_type is not None:
        check_content_type(request.content_type, head.content_type)
    if request.stream_seq is not None:
        if head.last_stream_seq is not None and request.stream_seq <= head.last_stream_seq:
            raise StreamSeqConflict(
                f"Stream-Seq {request.stream_seq!r} is not after {head.last_stream_seq!r}",
            )
        head.last_stream_seq = request.stream_seq
        head.stream_seq_changed = True
    start = head.next_offset
    count = len(request.records)
    if count:
        chunk = ChunkRef(start, start + count, key, placed.blob_start, placed.blob_length)
        last = head.chunks[-1] if head.chunks else None
        if last is not None and last.end == start and last.byte_start + last.byte_length == placed.blob_start:
            head.chunks[-1] = ChunkRef(
                last.start, chunk.end, key, last.byte_start, last.byte_length + placed.blob_length
            )
        else:
            head.chunks.append(chunk)
        head.next_offset += count
        head.records += count
        head.bytes += placed.size
    if request.close:
        head.closed = True
        head.close_now = True
    if producer is not None:
        producers[(request.stream_id, producer.id)] = ProducerState(
            producer.epoch, producer.seq, head.next_offset
        )
        changed_producers.add((request.stream_id, producer.id))
    return AppendOutcome(
        start,
        head.next_offset,
        count,
        closed=head.closed,
        producer_epoch=producer.epoch if producer else None,
        producer_seq=producer.seq if producer else None,
    )


def tail_changes(heads: dict[int, Head]) -> list[TailChange]:
    """What live readers learn from the flush, per stream in offset order."""
    changes: list[TailChange] = []
    for stream_id, head in heads.items():
        for index, chunk in enumerate(head.chunks):
            last = index == len(head.chunks) - 1
            changes.append(TailChange(stream_id, chunk.end, head.closed and last, chunk))
        if head.close_now and not head.chunks:
            changes.append(TailChange(stream_id, head.next_offset, True, None))
    return changes


@dataclass(frozen=True, slots=True)
class FlushWrite:
    """The arguments of ``threadline_flush_write`` (pg_migrations/0007): everything a decided
    flush writes, as parallel arrays so the statement's shape never depends on the batch."""

    args: tuple[Any, ...]
    empty: bool  # nothing to write: no head moved, no producer state changed

    @classmethod
    def build(
        cls,
        key: str | None,
        size: int,
        heads: dict[int, Head],
        producers: dict[ProducerKey, ProducerState],
        changed_producers: set[ProducerKey],
        changes: list[TailChange],
    ) -> FlushWrite:
        chunk_rows = [(stream_id, chunk) for stream_id, head in heads.items() for chunk in head.chunks]
        moved = {stream_id: head for stream_id, head in heads.items() if head.moved}
        producer_items = [(k, producers[k]) for k in sorted(changed_producers)]
        args = (
            key,
            size,
            [stream_id for stream_id, _ in chunk_rows],
            [chunk.start for _, chunk in chunk_rows],
            [chunk.end for _, chunk in chunk_rows],
            [chunk.byte_start for _, chunk in chunk_rows],
            [chunk.byte_length for _, chunk in chunk_rows],
            list(moved),
            [head.next_offset for head in moved.values()],
            [head.records for head in moved.values()],
            [head.bytes for head in moved.values()],
            [head.close_now for head in moved.values()],
            [head.last_stream_seq if head.stream_seq_changed else None for head in moved.values()],
            [k[0] for k, _ in producer_items],
            [k[1] for k, _ in producer_items],
            [state.epoch for _, state in producer_items],
            [state.last_seq for _, state in producer_items],
            [state.last_next_offset for _, state in producer_items],
            encode_notifications(changes),
            NOTIFY_CHANNEL,
        )
        return cls(args, empty=not moved and not changed_producers)


@dataclass(slots=True)
class _Known:
    next_offset: int
    content_type: str
    last_stream_seq: str | None
    session_id: str | None
    producers: OrderedDict[str, ProducerState] = field(default_factory=OrderedDict)


class KnownHeads:
    """The heads of writable streams as this committer's last commit of each left them, and the
    producer states it read or wrote with them. Only a hint: the one-statement commit checks
    every value it relied on, so an entry made stale by another worker or instance costs a
    fallback to lock-and-decide, never a wrong decision. Bounded (least recently used go first)."""

    def __init__(self, max_streams: int = 20_000, max_producers_per_stream: int = 64) -> None:
        self._max_streams = max_streams
        self._max_producers = max_producers_per_stream
        self._heads: OrderedDict[int, _Known] = OrderedDict()

    def __len__(self) -> int:
        return len(self._heads)

    def heads_for(self, stream_ids: Iterable[int]) -> dict[int, Head] | None:
        """Fresh working copies of the heads of ``stream_ids``; None unless every one is known."""
        heads: dict[int, Head] = {}
        for stream_id in stream_ids:
            known = self._heads.get(stream_id)
            if known is None:
                return None
            heads[stream_id] = Head(
                next_offset=known.next_offset,
                content_type=known.content_type,
                closed=False,
                deleted=False,
                expired=False,
                session_expired=False,
                last_stream_seq=known.last_stream_seq,
                session_id=known.session_id,
            )
        return heads

    def producer_states(self, keys: Iterable[ProducerKey]) -> dict[ProducerKey, ProducerState | None]:
        """The remembered state of each producer; None means "expected absent" (a producer this
        committer has not seen on that stream: the guard checks it really is absent)."""
        states: dict[ProducerKey, ProducerState | None] = {}
        for stream_id, producer_id in keys:
            known = self._heads.get(stream_id)
            states[(stream_id, producer_id)] = known.producers.get(producer_id) if known else None
        return states

    def remember(self, heads: dict[int, Head], producers: dict[ProducerKey, ProducerState]) -> None:
        """Record ``heads`` as committed, with the producer states read or written with them.
        Producer states remembered earlier stay: a stale one costs one fallback, which reads and
        remembers the real one."""
        for stream_id, head in heads.items():
            previous = self._heads.pop(stream_id, None)
            if not head.writable:
                continue
            known = _Known(head.next_offset, head.content_type, head.last_stream_seq, head.session_id)
            if previous is not None:
                known.producers = previous.producers
            self._heads[stream_id] = known
        for (stream_id, producer_id), state in producers.items():
            entry = self._heads.get(stream_id)
            if entry is None:
                continue
            entry.producers.pop(producer_id, None)
            entry.producers[producer_id] = state
            while len(entry.producers) > self._max_producers:
                entry.producers.popitem(last=False)
        while len(self._heads) > self._max_streams:
            self._heads.popitem(last=False)

    def forget(self, stream_ids: Iterable[int]) -> None:
        for stream_id in stream_ids:
            self._heads.pop(stream_id, None)
