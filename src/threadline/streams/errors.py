"""Stream errors that carry protocol headers, built in one place."""

from __future__ import annotations

from threadline.errors import ContentTypeMismatch, StreamClosed
from threadline.streams.names import media_type
from threadline.streams.offsets import format_offset

__all__ = ["check_content_type", "stream_closed"]


def stream_closed(next_offset: int) -> StreamClosed:
    """409 for an append to a closed stream, with where it ends (the protocol's headers)."""
    return StreamClosed(
        "stream is closed",
        headers={"Stream-Closed": "true", "Stream-Next-Offset": format_offset(next_offset)},
    )


def check_content_type(given: str, stream_content_type: str) -> None:
    """409 unless an append's Content-Type names the stream's media type (parameters aside)."""
    if media_type(given) != media_type(stream_content_type):
        raise ContentTypeMismatch(
            f"content type {media_type(given)!r} does not match the stream's "
            f"{media_type(stream_content_type)!r}"
        )
