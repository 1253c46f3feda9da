"""Server-sent events and resuming a subscription by offset (no I/O here).

Parsed by hand rather than with ``httpx-sse``: the format is a dozen lines of rules, the client
then needs only httpx, and resuming is ours anyway (``httpx-sse`` does not reconnect; a
subscription must reconnect at the offset of the last record it *delivered*, refresh the
credential first, and tell a server-side timeout from a failure).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from threadline.client._config import RetryPolicy
from threadline.client._models import ReadResult, Record
from threadline.client._requests import Request, offset_position, read_stream, subscribe_channel
from threadline.client._transport import is_retryable
from threadline.errors import Unauthorized

__all__ = ["Event", "EventDecoder", "Resumer"]


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    data: str
    id: str | None


class EventDecoder:
    """Feed lines (without their line break); an event comes out at each blank line."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        if not line:
            if not self._data and not self._event:
                self._id = None
                return None
            event = Event(self._event or "message", "\n".join(self._data), self._id)
            self._data, self._event, self._id = [], "", None
            return event
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


class Resumer:
    """A subscription's position and what to do when a connection ends.

    Records are delivered at most once: a record is handed out only if its offset is past the
    last one delivered, and every reconnect starts from that offset. A reconnect after a failure
    waits with backoff; one after the server ended the response (``Timeout-Seconds``) does not.
    Every reconnect fetches the credential again; a 401 is retried once with a fresh one.
    """

    def __init__(self, start: str, policy: RetryPolicy, reconnect_timeout: float) -> None:
        self.offset = start
        self.done = False
        self.refresh = False
        self._policy = policy
        self._reconnect_timeout = reconnect_timeout
        self._failures = 0
        self._failing_since: float | None = None
        self._unauthorized = False

    def channel_request(self, session: str, io: str, timeout_seconds: int | None) -> Request:
        return subscribe_channel(session, io, self.offset, timeout_seconds)

    def poll_request(self, name: str) -> Request:
        return read_stream(name, self.offset, live="long-poll")

    def _is_new(self, offset: str) -> bool:
        if self.offset in ("-1", "now"):
            return True
        return offset_position(offset) > offset_position(self.offset)

    def on_event(self, event: Event) -> Record | None:
        """A record to deliver, if the event is one not delivered yet."""
        self._connected()
        if event.event == "closed":
            self.done = True
            return None
        if event.event != "message" or event.id is None or not self._is_new(event.id):
            return None
        self.offset = event.id
        return Record(json.loads(event.data), event.id)

    def on_read(self, result: ReadResult) -> list[Record]:
        self._connected()
        records = [record for record in result.records if self._is_new(record.offset)]
        self.offset = result.next_offset
        if result.closed and result.up_to_date:
            self.done = True
        return records

    def on_no_content(self) -> None:
        """204: the end of a closed channel."""
        self.done = True

    def after_end(self) -> None:
        """The server ended the response (its timeout): reconnect at once, with a fresh credential."""
        self.refresh = True

    def after_failure(self, exc: BaseException) -> float:
        """Seconds to wait before reconnecting; re-raises what cannot be ridden out."""
        self.refresh = True
        if isinstance(exc, Unauthorized) and not self._unauthorized:
            self._unauthorized = True
            return 0.0
        if not is_retryable(exc):
            raise exc
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > self._reconnect_timeout:
            raise exc
        self._failures += 1
        return self._policy.backoff(min(self._failures - 1, 10))

    def _connected(self) -> None:
        self._failures = 0
        self._failing_since = None
        self._unauthorized = False
