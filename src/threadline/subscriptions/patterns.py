"""Glob patterns over stream paths (protocol §6.2): ``*`` is one path segment (or, inside a
segment, any run of characters but ``/``), ``**`` is zero or more whole segments.

Pure functions: the service matches stream names here. Postgres matches them too, when a stream
is created (``pg_migrations/0008``), with :func:`sql_regex`: the same expression, anchored. The
expression uses only what Python's ``re`` and Postgres's advanced regular expressions read alike
(``(?:…)``, ``[^/]``, ``*``, backslash before a punctuation character for itself).
"""

from __future__ import annotations

import re
from functools import lru_cache

from threadline.errors import ValidationFailed

__all__ = ["compile_pattern", "literal_prefix", "matches", "sql_regex", "validate_pattern"]

MAX_PATTERN_LENGTH = 1024
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=-]+")


def validate_pattern(pattern: str) -> str:
    """400 unless ``pattern`` is a usable glob: non-empty segments of URL-safe characters."""
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        raise ValidationFailed(f"pattern must be 1-{MAX_PATTERN_LENGTH} characters")
    for segment in pattern.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT_CHARS.fullmatch(segment):
            raise ValidationFailed("pattern segments must be non-empty and use URL-safe characters")
        if "**" in segment and segment != "**":
            raise ValidationFailed("** must be a whole pattern segment")
    return pattern


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    segments = pattern.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # Zero or more whole segments, with their separators.
            parts.append("(?:[^/]+(?:/[^/]+)*)?" if last else "(?:[^/]+/)*")
            continue
        parts.append("[^/]*".join(re.escape(piece) for piece in segment.split("*")))
        if not last:
            parts.append("/")
    regex = "".join(parts)
    # "a/**" must match "a" too: the separator before a trailing ** is optional.
    if len(segments) > 1 and segments[-1] == "**":
        regex = regex[: -len("/(?:[^/]+(?:/[^/]+)*)?")] + "(?:/[^/]+(?:/[^/]+)*)?"
    return re.compile(regex)


def matches(pattern: str, path: str) -> bool:
    return compile_pattern(pattern).fullmatch(path) is not None


def literal_prefix(pattern: str) -> str:
    """The pattern's text before its first wildcard: every match starts with it."""
    star = pattern.find("*")
    if star < 0:
        return pattern
    prefix = pattern[:star]
    if pattern.startswith("**", star) and prefix.endswith("/"):
        prefix = prefix[:-1]  # "a/**" matches "a" itself
    return prefix


def sql_regex(pattern: str) -> str:
    """``pattern`` as an anchored regular expression for Postgres's ``~`` (which searches, where
    :func:`matches` needs the whole name)."""
    return f"^(?:{compile_pattern(pattern).pattern})$"
