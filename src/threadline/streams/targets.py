"""Where an append goes: a stream name resolved to its row id and content type, remembered.

Every append needs the stream's id (to queue it) and its content type (to split a JSON body and
refuse a mismatched one before the commit). Both are fixed for the life of a stream row, so the
append path can skip the Postgres lookup after the first append to a name. Nothing else about
the stream is trusted from memory: the committer decides every append under the row lock
(missing, expired, deleted, closed, producer state), so a stale entry can only point at a row
that is gone or was replaced by a new stream of the same name, and that shows up as
``stream_not_found`` / ``stream_gone`` from the commit, on which the caller forgets the entry
and resolves the name again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import Counter

__all__ = ["AppendTarget", "AppendTargets"]

LOOKUPS = Counter("threadline_append_target_lookups_total", "Append-path name resolutions", ["result"])


@dataclass(frozen=True, slots=True)
class AppendTarget:
    id: int
    content_type: str


class AppendTargets:
    """A bounded LRU of (environment id, stream name) -> :class:`AppendTarget`."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], AppendTarget] = OrderedDict()

    def get(self, environment_id: str, name: str) -> AppendTarget | None:
        key = (environment_id, name)
        target = self._entries.get(key)
        if target is None:
            LOOKUPS.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        LOOKUPS.labels("hit").inc()
        return target

    def remember(self, environment_id: str, name: str, stream_id: int, content_type: str) -> AppendTarget:
        target = AppendTarget(stream_id, content_type)
        key = (environment_id, name)
        self._entries[key] = target
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return target

    def forget(self, environment_id: str, name: str) -> None:
        self._entries.pop((environment_id, name), None)

    def __len__(self) -> int:
        return len(self._entries)
