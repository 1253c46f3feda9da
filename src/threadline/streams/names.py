"""Stream names and content types.

A stream is addressed by its name below ``/v1/stream/``. A session's channels are the streams
``sessions/<session id>/out`` and ``sessions/<session id>/in``; that prefix is reserved so a
stand-alone stream can never pose as a session channel.
"""

from __future__ import annotations

import re

from threadline.errors import InvalidStreamName

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "SESSION_CHANNEL_CONTENT_TYPE",
    "SESSION_PREFIX",
    "is_json",
    "is_media_type",
    "media_type",
    "parse_session_channel",
    "session_channel_name",
    "validate_name",
]

SESSION_PREFIX = "sessions/"
# The Durable Streams protocol's control namespace (subscriptions, JWKS): never an application stream.
RESERVED_PREFIX = "__ds"
# Chat records (tokens, tool calls, user messages) are JSON values; JSON mode gives clients
# message boundaries and whole-array reads.
SESSION_CHANNEL_CONTENT_TYPE = "application/json"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_NAME_LENGTH = 1024

# RFC 9110 §8.3.1: type "/" subtype, each a token; parameters after ";" are kept as sent.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=-]+")  # whole segment (fullmatch): no trailing newline


def validate_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidStreamName(f"stream name must be 1-{MAX_NAME_LENGTH} characters")
    if name == RESERVED_PREFIX or name.startswith(RESERVED_PREFIX + "/"):
        raise InvalidStreamName(
            "stream names starting with __ds/ are reserved for Durable Streams control APIs"
        )
    for segment in name.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidStreamName(
                "stream name segments must be non-empty and use URL-safe characters",
            )
    return name


def session_channel_name(session_id: str, io: str) -> str:
    return f"{SESSION_PREFIX}{session_id}/{io}"


def parse_session_channel(name: str) -> tuple[str, str] | None:
    """``(session ref, io)`` when ``name`` is a session channel, else None."""
    if not name.startswith(SESSION_PREFIX):
        return None
    rest = name[len(SESSION_PREFIX) :]
    ref, sep, io = rest.rpartition("/")
    if not sep or not ref or "/" in ref or io not in ("out", "in"):
        return None
    return ref, io


def media_type(content_type: str | None) -> str:
    """The media type without parameters, lower-cased: what content-type matching compares."""
    if not content_type:
        return DEFAULT_CONTENT_TYPE
    return content_type.split(";", 1)[0].strip().lower() or DEFAULT_CONTENT_TYPE


def is_media_type(content_type: str) -> bool:
    """A concrete media type (``type/subtype``, parameters allowed), not a range like ``*/*``:
    what a stream's content type must be, since every read answers with it as Content-Type."""
    kind = content_type.split(";", 1)[0].strip()
    return _MEDIA_TYPE.fullmatch(kind) is not None and "*" not in kind.split("/")


def is_json(content_type: str) -> bool:
    return media_type(content_type) == "application/json"
