"""Stream errors that carry protocol headers."""

from __future__ import annotations

from threadline.errors import ApiError, Conflict
from threadline.streams.names import media_type
from threadline.streams.offsets import format_offset

__all__ = ["StreamGone", "check_content_type", "stream_closed"]


class StreamGone(ApiError):
    """A deleted stream that still has live forks, or a read before the trim point (410)."""

    status_code = 410
    default_code = "stream_gone"

    def __init__(self, message: str = "stream is gone", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


def stream_closed(next_offset: int) -> Conflict:
    return Conflict(
        "stream is closed",
        code="stream_closed",
        headers={"Stream-Closed": "true", "Stream-Next-Offset": format_offset(next_offset)},
    )


def check_content_type(given: str, stream_content_type: str) -> None:
    """409 unless an append's Content-Type names the stream's media type (parameters aside)."""
    if media_type(given) != media_type(stream_content_type):
        raise Conflict(
            f"content type {media_type(given)!r} does not match the stream's "
            f"{media_type(stream_content_type)!r}",
            code="content_type_mismatch",
        )
