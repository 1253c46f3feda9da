"""Stream names and content types: threadline.streams.names."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.errors import ValidationFailed
from threadline.streams.names import (
    DEFAULT_CONTENT_TYPE,
    MAX_NAME_LENGTH,
    is_json,
    is_media_type,
    media_type,
    parse_session_channel,
    session_channel_name,
    validate_name,
)

# Every character a segment may hold (RFC 3986 unreserved and sub-delims, plus ":" and "@").
SEGMENT_CHARS = string.ascii_letters + string.digits + "._~:@!$&'()*+,;=-"


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "chat",
        "sessions/session_01/out",
        "a/b/c",
        "x.y~z:1@2!$&'()*+,;=-_",
        "...",
        ".hidden",
        "a" * MAX_NAME_LENGTH,
    ],
)
def test_a_valid_name_is_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * (MAX_NAME_LENGTH + 1),
        "/a",
        "a/",
        "a//b",
        ".",
        "..",
        "a/./b",
        "a/../b",
        "a b",
        "a?b",
        "a#b",
        "a%20b",
        "a\\b",
        "café",
        "a\nb",
        "a\tb",
        'a"b',
        "a<b>",
    ],
)
def test_an_invalid_name_is_400_invalid_stream_name(name: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        validate_name(name)
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_stream_name"


def test_a_name_ending_in_a_newline_is_invalid() -> None:
    with pytest.raises(ValidationFailed):
        validate_name("chat\n")


segments = st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@given(st.lists(segments, min_size=1, max_size=8))
def test_any_name_of_url_safe_segments_is_valid(parts: list[str]) -> None:
    name = "/".join(parts)
    assert validate_name(name) == name


@given(
    segments,
    st.characters(exclude_characters=SEGMENT_CHARS + "/", exclude_categories=("Cs",)),
    segments,
)
def test_any_other_character_inside_a_segment_makes_the_name_invalid(
    before: str, bad: str, after: str
) -> None:
    with pytest.raises(ValidationFailed):
        validate_name(before + bad + after)


def test_a_session_channel_name_is_the_prefix_the_session_and_the_direction() -> None:
    assert session_channel_name("session_01", "out") == "sessions/session_01/out"
    assert session_channel_name("ext-9", "in") == "sessions/ext-9/in"


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("sessions/session_01/out", ("session_01", "out")),
        ("sessions/ext-9/in", ("ext-9", "in")),
        ("sessions/session_01/other", None),
        ("sessions/session_01/OUT", None),
        ("sessions/out", None),
        ("sessions//out", None),
        ("sessions/a/b/out", None),
        ("sessions/session_01/out/", None),
        ("Sessions/session_01/out", None),
        ("session/session_01/out", None),
        ("chat/session_01/out", None),
        ("sessions", None),
    ],
)
def test_only_sessions_slash_ref_slash_in_or_out_is_a_session_channel(
    name: str, parsed: tuple[str, str] | None
) -> None:
    assert parse_session_channel(name) == parsed


@given(st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=30), st.sampled_from(["out", "in"]))
def test_a_session_channel_name_parses_back_to_its_session_and_direction(ref: str, io: str) -> None:
    assert parse_session_channel(session_channel_name(ref, io)) == (ref, io)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, DEFAULT_CONTENT_TYPE),
        ("", DEFAULT_CONTENT_TYPE),
        ("; charset=utf-8", DEFAULT_CONTENT_TYPE),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("  text/plain  ", "text/plain"),
        ("text/plain;a=b;c=d", "text/plain"),
        ("application/octet-stream", "application/octet-stream"),
    ],
)
def test_the_media_type_is_lower_case_without_parameters(content_type: str | None, expected: str) -> None:
    assert DEFAULT_CONTENT_TYPE == "application/octet-stream"
    assert media_type(content_type) == expected


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("APPLICATION/JSON", True),
        ("application/json-seq", False),
        ("application/ld+json", False),
        ("text/json", False),
        ("text/plain", False),
        ("", False),
    ],
)
def test_json_mode_is_exactly_the_application_json_media_type(content_type: str, expected: bool) -> None:
    assert is_json(content_type) is expected


@pytest.mark.parametrize(
    ("content_type", "valid"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("TEXT/PLAIN", True),
        ("application/vnd.api+json", True),
        ("*/*", False),
        ("text/*", False),
        ("0", False),
        ("", False),
        ("text/plain/x", False),
        ("a b/c", False),
        ("/json", False),
    ],
)
def test_a_stream_content_type_must_be_a_concrete_media_type(content_type: str, valid: bool) -> None:
    assert is_media_type(content_type) is valid
