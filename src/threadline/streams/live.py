"""Wake-ups for live readers (long-poll and SSE).

The instance that commits a batch wakes its own readers at once (:meth:`LiveHub.on_commit`) and
publishes the same change with ``NOTIFY`` inside the commit's transaction, so other instances
learn of exactly the committed chunks, in commit order, and wake theirs. A notification carries
the chunk's place in its object, so a remote instance serves all its subscribers with one object
GET (through the chunk cache) and no Postgres query.

Nothing relies on a notification arriving: after the listener reconnects, and every few seconds
while readers wait, the hub re-reads the heads of every watched stream in one query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg

from threadline.streams.wire import NOTIFY_CHANNEL, ChunkRef, TailChange, decode_notification

if TYPE_CHECKING:
    from threadline.streams.reader import ReadResult

__all__ = ["FrameKey", "LiveHub", "StreamTail", "Waiter"]

logger = logging.getLogger(__name__)

_RECENT_CHUNKS = 256
# Waiters woken per event-loop pass when a tail moves. A thousand subscribers woken at once would
# all deliver in one pass, ahead of the writer's next request; in slices, requests that arrive
# meanwhile are read between them.
WAKE_SLICE = 64
# A waiter's timer may fire this early by the loop's clock (uvloop rounds to milliseconds).
_TIMER_SLACK = 0.002


class Waiter:
    """How one live reader waits for its tail: a future per wait, and one timer per reader, not
    per wait. Most waits end with a commit long before their deadline; arming and cancelling a
    timer for each (``asyncio.timeout``) cost more than the rest of a delivery's bookkeeping.
    The timer is armed for the earliest deadline asked for and, when it fires, re-armed for the
    current one if that moved later: with a commit every 50 ms and an idle deadline of 15 s it
    fires once per 15 s."""

    __slots__ = ("_deadline", "_future", "_loop", "_timer")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, tail: StreamTail, deadline: float) -> None:
        """Until ``tail`` moves, or about ``deadline`` (``loop.time()``); the caller checks which."""
        future = self._loop.create_future()
        self._future = future
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)
        tail.waiters[future] = None
        try:
            await future
        finally:
            self._future = None
            tail.waiters.pop(future, None)  # a timeout or cancellation: no future left behind

    def _expire(self) -> None:
        self._timer = None
        future = self._future
        if future is None or future.done():
            return  # not waiting: the next wait arms a timer again
        if self._loop.time() >= self._deadline - _TIMER_SLACK:
            future.set_result(None)
        else:
            self._timer = self._loop.call_at(self._deadline, self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _release(waiters: list[asyncio.Future[None]], start: int) -> None:
    end = start + WAKE_SLICE
    for future in waiters[start:end]:
        if not future.done():
            future.set_result(None)
    if end < len(waiters):
        asyncio.get_running_loop().call_soon(_release, waiters, end)


class FrameKey(NamedTuple):
    """Which encoded bytes: an encoding (e.g. ``ds-sse:json:<cursor>``) of the records from ``offset``."""

    encoding: str
    offset: int


@dataclass(eq=False, slots=True)
class StreamTail:
    """What this instance knows of the newest part of one watched stream."""

    stream_id: int
    next_offset: int = -1  # -1 until the first head read or change
    closed: bool = False
    # Contiguous chunks ending at next_offset (when non-empty), newest last.
    recent: deque[ChunkRef] = field(default_factory=lambda: deque(maxlen=_RECENT_CHUNKS))
    watchers: int = 0
    # Futures of the readers waiting for the next move (see Waiter), oldest first; woken in slices.
    waiters: dict[asyncio.Future[None], None] = field(default_factory=dict)
    # Bumped on every move; what readers built for one version is void at the next.
    version: int = 0
    # What one live reader read and encoded at this version, for the others at the same place:
    # a thousand subscribers woken by one commit read and encode its records once (see
    # StreamService.follow). Cleared when the tail moves.
    reads: dict[int, ReadResult] = field(default_factory=dict)
    frames: dict[FrameKey, bytes] = field(default_factory=dict)

    def apply(self, change: TailChange) -> bool:
        """Fold a change in; True when it moved the tail or closed the stream."""
        if change.next_offset < self.next_offset or (
            change.next_offset == self.next_offset and change.closed <= self.closed
        ):
            return False  # old news (our own commit, seen again through NOTIFY)
        chunk = change.chunk
        if chunk is not None and chunk.end > chunk.start:
            if self.recent and self.recent[-1].end == chunk.start and self.next_offset == chunk.start:
                self.recent.append(chunk)
            else:
                self.recent.clear()
                self.recent.append(chunk)
        elif change.next_offset != self.next_offset:
            self.recent.clear()  # moved without a known place: readers go to the index
        self.next_offset = max(self.next_offset, change.next_offset)
        self.closed = self.closed or change.closed
        self._wake()
        return True

    def _wake(self) -> None:
        self.version += 1
        self.reads.clear()
        self.frames.clear()
        if self.waiters:
            waiters, self.waiters = list(self.waiters), {}
            _release(waiters, 0)

    def chunks_from(self, offset: int) -> list[ChunkRef] | None:
        """The recent chunks covering ``[offset, next_offset)``, or None if they don't reach back."""
        if not self.recent or self.recent[0].start > offset or self.recent[-1].end != self.next_offset:
            return None
        return [chunk for chunk in self.recent if chunk.end > offset]

    async def wait_beyond(self, offset: int, deadline: float, waiter: Waiter | None = None) -> bool:
        """Wait until the tail passes ``offset`` or the stream closes; False at ``deadline``
        (``loop.time()``). A reader that waits again and again passes its own ``waiter``."""
        if self.next_offset > offset or self.closed:
            return True
        own = waiter is None
        waiter = Waiter() if waiter is None else waiter
        loop = asyncio.get_running_loop()
        try:
            while self.next_offset <= offset and not self.closed:
                if loop.time() >= deadline - _TIMER_SLACK:
                    return False
                await waiter.wait(self, deadline)
            return True
        finally:
            if own:
                waiter.close()


def _setter(event: asyncio.Event) -> Any:
    return lambda _conn: event.set()


class LiveHub:
    """Tails of the streams someone on this instance is watching, kept current."""

    def __init__(self, database_url: str, *, resync_interval: float = 5.0) -> None:
        self._database_url = database_url
        self._resync_interval = resync_interval
        self._tails: dict[int, StreamTail] = {}
        self._committing: set[str] = set()
        self._connected = asyncio.Event()
        self._listeners: list[Callable[[Sequence[TailChange]], None]] = []
        self.notifications = 0

    def add_listener(self, listener: Callable[[Sequence[TailChange]], None]) -> None:
        """Call ``listener`` with every tail change this instance learns of (its own commits, and
        other instances' through NOTIFY and the resync), watched or not: how subscriptions wake
        without polling. It runs on the event loop and must only note the change and return."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Sequence[TailChange]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def watched(self) -> int:
        return len(self._tails)

    @contextlib.contextmanager
    def watch(self, stream_id: int) -> Iterator[StreamTail]:
        """Register interest before reading the head, so no commit falls between the two."""
        tail = self._tails.get(stream_id)
        if tail is None:
            tail = self._tails[stream_id] = StreamTail(stream_id)
        tail.watchers += 1
        try:
            yield tail
        finally:
            tail.watchers -= 1
            if tail.watchers == 0 and self._tails.get(stream_id) is tail:
                del self._tails[stream_id]

    def on_commit(self, changes: Sequence[TailChange]) -> None:
        for listener in self._listeners:
            listener(changes)
        for change in changes:
            tail = self._tails.get(change.stream_id)
            if tail is not None:
                tail.apply(change)

    @contextlib.contextmanager
    def committing(self, object_key: str | None) -> Iterator[None]:
        """While this instance commits the flush that wrote ``object_key``, its NOTIFY is ours to
        ignore: the committer applies the same changes itself once COMMIT returns, right after
        acknowledging the appenders. Applied from the NOTIFY instead (it can arrive first), the
        wake-up would put every subscriber's delivery ahead of the writer's acknowledgement.
        If the commit's outcome is never learned (connection lost), the resync catches up."""
        if object_key is None:
            yield
            return
        self._committing.add(object_key)
        try:
            yield
        finally:
            self._committing.discard(object_key)

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self.notifications += 1
        assert isinstance(payload, str)
        try:
            changes = decode_notification(payload)
        except ValueError:
            logger.warning("ignoring malformed stream notification", extra={"payload": payload[:200]})
            return
        if self._committing:
            changes = [c for c in changes if c.chunk is None or c.chunk.object_key not in self._committing]
        self.on_commit(changes)

    async def wait_connected(self, wait_seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait_seconds)
        return self._connected.is_set()

    async def run(self) -> None:
        """LISTEN forever, reconnecting; re-read watched heads after every (re)connect."""
        backoff = 0.2
        while True:
            conn: asyncpg.Connection[Any] | None = None
            try:
                conn = await asyncpg.connect(self._database_url)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notification)
                self._connected.set()
                backoff = 0.2
                while not lost.is_set():
                    await self._resync(conn)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._resync_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("stream listener connection failed", extra={"error": str(exc)})
            finally:
                self._connected.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _resync(self, conn: asyncpg.Connection[Any]) -> None:
        if not self._tails:
            return
        rows = await conn.fetch(
            "SELECT id, next_offset, closed_at IS NOT NULL AS closed FROM streams WHERE id = ANY($1::bigint[])",
            list(self._tails),
        )
        self.on_commit([TailChange(row["id"], row["next_offset"], row["closed"], None) for row in rows])
