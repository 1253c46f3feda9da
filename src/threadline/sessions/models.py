"""Session request bodies and the session resource as clients see it.

Field rules come from SPEC §3. Bodies are strict: an unknown field is a 400, not ignored, so a
typo (``externalID``) never silently creates a session without the caller's idempotency key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from threadline.sessions.fields import session_status
from threadline.streams.offsets import format_offset

__all__ = [
    "MAX_METADATA_BYTES",
    "ChannelView",
    "CloseSessionBody",
    "CreateSessionBody",
    "ForkSessionBody",
    "ForkedFrom",
    "MintTokenBody",
    "PatchSessionBody",
    "SessionView",
    "session_status",
]

MAX_METADATA_BYTES = 32 * 1024
FRIENDLY_ID_PREFIX = "session_"


def _external_id(value: str) -> str:
    if value.startswith(FRIENDLY_ID_PREFIX):
        raise ValueError(f"externalId may not start with '{FRIENDLY_ID_PREFIX}' (reserved for session ids)")
    if "/" in value:
        # It addresses the session in paths (/api/v1/sessions/{session}, sessions/<ref>/out).
        raise ValueError("externalId may not contain '/' (it is used in URL paths)")
    return value


def _tags(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))  # drop duplicates, keep order


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes serialized; the limit is {MAX_METADATA_BYTES}")
    return value


ExternalId = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256), AfterValidator(_external_id)
]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Tags = Annotated[list[Tag], Field(max_length=10), AfterValidator(_tags)]
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False, str_strip_whitespace=False)


class CreateSessionBody(_Body):
    type: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    externalId: ExternalId | None = None
    taskIdentifier: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)] | None
    ) = None
    tags: Tags = Field(default_factory=list)
    metadata: Metadata = Field(default_factory=dict)
    expiresAt: AwareDatetime | None = None


class ForkSessionBody(_Body):
    """``POST /api/v1/sessions/{session}/fork``. Offsets are the API's offset strings (or ``-1``
    for the first kept record, ``now`` for the tail); absent means the channel's tail. Absent
    ``type``/``tags``/``metadata`` are the parent's."""

    outOffset: str | None = None
    inOffset: str | None = None
    externalId: ExternalId | None = None
    type: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)] | None = None
    tags: Tags | None = None
    metadata: Metadata | None = None


class PatchSessionBody(_Body):
    """Only the fields present are changed; ``externalId``/``expiresAt`` may be set to null."""

    tags: Tags | None = None
    metadata: Metadata | None = None
    externalId: ExternalId | None = None
    expiresAt: AwareDatetime | None = None


class CloseSessionBody(_Body):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=256)] | None = None


class MintTokenBody(_Body):
    expiresInSeconds: int | None = Field(default=None, ge=60)
    scopes: list[Literal["read", "write"]] = Field(default=["read", "write"], min_length=1)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ChannelView:
    records: int
    bytes: int
    tail_offset: int
    closed: bool
    first_record_at: datetime | None
    last_record_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "bytes": self.bytes,
            "tailOffset": format_offset(self.tail_offset),
            "closed": self.closed,
            "firstRecordAt": _iso(self.first_record_at),
            "lastRecordAt": _iso(self.last_record_at),
        }


@dataclass(frozen=True, slots=True)
class ForkedFrom:
    """Where a fork came from: its parent and the parent's channel offsets it forked at."""

    session: str
    out_offset: int
    in_offset: int

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "outOffset": format_offset(self.out_offset),
            "inOffset": format_offset(self.in_offset),
        }


@dataclass(frozen=True, slots=True)
class SessionView:
    id: str
    environment_id: str
    external_id: str | None
    type: str
    task_identifier: str | None
    tags: list[str]
    metadata: dict[str, Any]
    closed_at: datetime | None
    closed_reason: str | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_active_at: datetime
    channels: dict[str, ChannelView]
    forked_from: ForkedFrom | None = None  # None: a root
    stored_root_id: str | None = None  # NULL for a root (see root_id)

    @property
    def root_id(self) -> str:
        """The first session of this one's fork tree: its own id for a root."""
        return self.stored_root_id or self.id

    @property
    def status(self) -> str:
        return session_status(self.closed_at, self.expires_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "externalId": self.external_id,
            "type": self.type,
            "taskIdentifier": self.task_identifier,
            "tags": self.tags,
            "metadata": self.metadata,
            "status": self.status,
            "closedAt": _iso(self.closed_at),
            "closedReason": self.closed_reason,
            "expiresAt": _iso(self.expires_at),
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
            "lastActiveAt": _iso(self.last_active_at),
            "channels": {name: channel.to_json() for name, channel in self.channels.items()},
            "forkedFrom": self.forked_from.to_json() if self.forked_from is not None else None,
            "rootId": self.root_id,
        }
