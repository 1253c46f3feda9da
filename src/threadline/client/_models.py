"""What the API returns, as typed, frozen values (parsed from JSON in one place each)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

__all__ = [
    "AppendResult",
    "ChannelStats",
    "Io",
    "ReadResult",
    "Record",
    "Session",
    "SessionCounts",
    "SessionToken",
    "StreamInfo",
    "parse_datetime",
]

Io = Literal["out", "in"]
ChannelT = TypeVar("ChannelT")


def parse_datetime(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _required_datetime(value: str) -> datetime:
    parsed = parse_datetime(value)
    assert parsed is not None
    return parsed


@dataclass(frozen=True, slots=True)
class ChannelStats:
    records: int
    bytes: int
    tail_offset: str
    closed: bool
    first_record_at: datetime | None
    last_record_at: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChannelStats:
        return cls(
            records=int(data["records"]),
            bytes=int(data["bytes"]),
            tail_offset=str(data["tailOffset"]),
            closed=bool(data["closed"]),
            first_record_at=parse_datetime(data.get("firstRecordAt")),
            last_record_at=parse_datetime(data.get("lastRecordAt")),
        )


@dataclass(frozen=True, slots=True)
class ForkedFrom:
    """Where a forked session came from: its parent and the parent's offsets it forked at."""

    session: str
    out_offset: str
    in_offset: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ForkedFrom:
        return cls(
            session=str(data["session"]), out_offset=str(data["outOffset"]), in_offset=str(data["inOffset"])
        )


@dataclass(frozen=True)
class Session(Generic[ChannelT]):
    """A session as the server last described it; ``out`` and ``in_`` are its channel handles.

    ``lsn`` is the write's ``Threadline-Lsn`` (for read-your-writes lists: ``min_lsn=``); ``None``
    on sessions that were read, not written.
    """

    id: str
    external_id: str | None
    type: str
    task_identifier: str | None
    tags: tuple[str, ...]
    metadata: Mapping[str, Any]
    status: Literal["ACTIVE", "CLOSED", "EXPIRED"]
    closed_at: datetime | None
    closed_reason: str | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_active_at: datetime
    channels: Mapping[str, ChannelStats]
    forked_from: ForkedFrom | None = None  # None: a root session
    root_id: str = ""  # the first session of its fork tree (a root's own id); from_json fills it
    lsn: str | None = field(default=None, compare=False)
    _channel: Callable[[str, Io], ChannelT] | None = field(default=None, repr=False, compare=False)

    @property
    def out(self) -> ChannelT:
        """The agent → client channel."""
        return self._open("out")

    @property
    def in_(self) -> ChannelT:
        """The client → agent channel."""
        return self._open("in")

    def _open(self, io: Io) -> ChannelT:
        if self._channel is None:
            raise RuntimeError("this Session was built without a client; use client.sessions.channel()")
        return self._channel(self.id, io)

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        *,
        lsn: str | None = None,
        channel: Callable[[str, Io], ChannelT] | None = None,
    ) -> Session[ChannelT]:
        return cls(
            id=str(data["id"]),
            external_id=data.get("externalId"),
            type=str(data["type"]),
            task_identifier=data.get("taskIdentifier"),
            tags=tuple(data.get("tags") or ()),
            metadata=dict(data.get("metadata") or {}),
            status=data["status"],
            closed_at=parse_datetime(data.get("closedAt")),
            closed_reason=data.get("closedReason"),
            expires_at=parse_datetime(data.get("expiresAt")),
            created_at=_required_datetime(data["createdAt"]),
            updated_at=_required_datetime(data["updatedAt"]),
            last_active_at=_required_datetime(data["lastActiveAt"]),
            channels={name: ChannelStats.from_json(c) for name, c in (data.get("channels") or {}).items()},
            forked_from=ForkedFrom.from_json(data["forkedFrom"]) if data.get("forkedFrom") else None,
            root_id=str(data.get("rootId") or data["id"]),
            lsn=lsn,
            _channel=channel,
        )


@dataclass(frozen=True, slots=True)
class SessionCounts:
    count: int
    by_status: Mapping[str, int]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionCounts:
        return cls(count=int(data["count"]), by_status=dict(data.get("byStatus") or {}))


@dataclass(frozen=True, slots=True)
class SessionToken:
    token: str
    session_id: str
    scopes: tuple[str, ...]
    expires_at: datetime

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionToken:
        return cls(
            token=str(data["token"]),
            session_id=str(data["sessionId"]),
            scopes=tuple(data["scopes"]),
            expires_at=_required_datetime(data["expiresAt"]),
        )


@dataclass(frozen=True, slots=True)
class Record:
    """One record and the offset *after* it: resume from ``offset`` to read what follows."""

    value: Any
    offset: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed: records ``offset`` up to ``next_offset``. ``duplicate`` is true
    when an idempotent producer's retry found its batch already written (nothing was appended)."""

    next_offset: str
    records: int | None = None
    offset: str | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ReadResult:
    """One catch-up read: the records from where it started, and where to continue."""

    records: tuple[Record, ...]
    next_offset: str
    up_to_date: bool
    closed: bool


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's metadata (``HEAD``)."""

    name: str
    content_type: str
    next_offset: str
    closed: bool
    ttl_seconds: int | None
    expires_at: datetime | None
