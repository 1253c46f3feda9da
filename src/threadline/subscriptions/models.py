"""Subscription request bodies and the values the service hands back.

Field names are the protocol's (snake_case JSON), so Durable Streams clients send them unchanged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from threadline.errors import ValidationFailed
from threadline.streams.names import validate_name
from threadline.streams.offsets import format_offset
from threadline.subscriptions.patterns import validate_pattern

__all__ = [
    "AckBody",
    "AckItem",
    "ClaimBody",
    "MembershipBody",
    "ReleaseBody",
    "StreamCursor",
    "SubscriptionSpec",
    "SubscriptionView",
    "Wake",
    "validate_subscription_id",
]

DEFAULT_LEASE_TTL_MS = 30_000
_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
MAX_STREAMS = 1000


def validate_subscription_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValidationFailed("subscription id must be 1-128 characters of A-Z a-z 0-9 . _ ~ -")
    return value


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    url: str = Field(min_length=1, max_length=2048)


class SubscriptionSpec(BaseModel):
    """``PUT /v1/stream/__ds/subscriptions/{id}``. ``session_type`` is Threadline's extension:
    only channels of sessions of that type match (e.g. every ``in`` channel of "chat" sessions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["webhook", "pull-wake"]
    pattern: str | None = None
    streams: list[str] | None = Field(default=None, max_length=MAX_STREAMS)
    webhook: WebhookConfig | None = None
    wake_stream: str | None = None
    lease_ttl_ms: int = Field(default=DEFAULT_LEASE_TTL_MS, ge=1_000, le=600_000)
    description: str | None = Field(default=None, max_length=1000)
    session_type: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        return None if value is None else validate_pattern(value)

    @field_validator("streams")
    @classmethod
    def _streams(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted({validate_name(path) for path in value})

    @field_validator("wake_stream")
    @classmethod
    def _wake_stream(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value)

    @model_validator(mode="after")
    def _shape(self) -> SubscriptionSpec:
        if self.pattern is None and not self.streams:
            raise ValueError("a subscription needs a pattern or streams")
        if self.type == "webhook" and self.webhook is None:
            raise ValueError("a webhook subscription needs webhook.url")
        if self.type == "pull-wake" and self.wake_stream is None:
            raise ValueError("a pull-wake subscription needs wake_stream")
        if self.type == "webhook" and self.wake_stream is not None:
            raise ValueError("wake_stream is for pull-wake subscriptions")
        if self.type == "pull-wake" and self.webhook is not None:
            raise ValueError("webhook is for webhook subscriptions")
        return self

    def config_hash(self, canonical_streams: list[str]) -> str:
        """Hash of the normalized configuration (§6.2): a re-PUT with the same hash re-confirms."""
        normalized = {
            "type": self.type,
            "pattern": self.pattern,
            "streams": sorted(set(canonical_streams)),
            "webhook": None if self.webhook is None else {"url": self.webhook.url},
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
            "session_type": self.session_type,
        }
        return hashlib.sha256(orjson.dumps(normalized, option=orjson.OPT_SORT_KEYS)).hexdigest()


class MembershipBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    streams: list[str] = Field(min_length=1, max_length=MAX_STREAMS)

    @field_validator("streams")
    @classmethod
    def _streams(cls, value: list[str]) -> list[str]:
        return sorted({validate_name(path) for path in value})


class ClaimBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    worker: str = Field(default="worker", min_length=1, max_length=200)


class AckItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    stream: str = Field(min_length=1, max_length=1024)
    offset: str = Field(min_length=1, max_length=64)


class ReleaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    wake_id: str = Field(min_length=1, max_length=64)
    generation: int = Field(ge=0)


class AckBody(ReleaseBody):
    acks: list[AckItem] = Field(default_factory=list, max_length=MAX_STREAMS)
    done: bool = False


@dataclass(frozen=True, slots=True)
class StreamCursor:
    """One linked stream: where its subscriber is (``acked``) and where the stream is (``tail``)."""

    path: str
    explicit: bool
    acked: int
    tail: int

    @property
    def pending(self) -> bool:
        return self.tail > self.acked

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "link_type": "explicit" if self.explicit else "glob",
            "acked_offset": format_offset(self.acked),
        }

    def wake_entry(self) -> dict[str, Any]:
        return {**self.summary(), "tail_offset": format_offset(self.tail), "has_pending": self.pending}


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    id: str
    kind: str
    pattern: str | None
    session_type: str | None
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None
    created_at: datetime
    failed: bool
    base_url: str
    streams: list[StreamCursor]


@dataclass(frozen=True, slots=True)
class Wake:
    """A wake handed to a worker (claim) or a webhook: who may ack it, and the streams' state."""

    subscription_id: str
    wake_id: str
    generation: int
    token: str
    streams: list[StreamCursor]
    lease_ttl_ms: int
