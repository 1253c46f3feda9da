"""Pure logic without services: scopes, JWTs, cursors, ids and body rules (moved from tests/test_units.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import jwt
import pytest
from pydantic import ValidationError

from threadline.auth.principal import Action, Environment, Principal, SessionRef
from threadline.auth.tokens import InvalidToken, mint_token, read_unverified_env, verify_token
from threadline.errors import ValidationFailed
from threadline.ids import new_id
from threadline.sessions.listing import Cursor, parse_list_query
from threadline.sessions.models import MAX_METADATA_BYTES, CreateSessionBody, session_status

ENV = Environment("env_1", "proj_1", "org_1")
A = SessionRef("session_a", "ext-a")
B = SessionRef("session_b", None)


def principal(*scopes: str) -> Principal:
    return Principal(ENV, "jwt", "t", frozenset(scopes))


@pytest.mark.parametrize(
    ("scopes", "read_a", "write_a", "admin_a", "read_b", "list_all", "create"),
    [
        (["admin"], True, True, True, True, True, True),
        (["read:all"], True, False, False, True, True, False),
        (["admin:sessions"], True, True, True, True, True, True),
        (["read:sessions"], True, False, False, True, True, False),
        (["write:sessions"], False, True, False, False, False, True),
        (["read:sessions:session_a"], True, False, False, False, False, False),
        (["read:sessions:ext-a"], True, False, False, False, False, False),
        (["write:sessions:session_a"], False, True, False, False, False, False),
        (["admin:sessions:session_a"], True, True, True, False, False, False),
        (["read:sessions:"], False, False, False, False, False, False),
        (["read:runs:session_a"], False, False, False, False, False, False),
        ([], False, False, False, False, False, False),
    ],
)
def test_scope_matrix(
    scopes: list[str], read_a: bool, write_a: bool, admin_a: bool, read_b: bool, list_all: bool, create: bool
) -> None:
    p = principal(*scopes)
    assert p.may_on_session(Action.READ, A) is read_a
    assert p.may_on_session(Action.WRITE, A) is write_a
    assert p.may_on_session(Action.ADMIN, A) is admin_a
    assert p.may_on_session(Action.READ, B) is read_b
    assert p.may_on_all_sessions(Action.READ) is list_all
    assert p.may_on_all_sessions(Action.WRITE) is create


def test_jwt_round_trip_and_refusals() -> None:
    token, exp = mint_token(
        secret="s" * 32, environment_id="env_1", scopes=["read:sessions"], ttl_seconds=60, subject="x"
    )
    assert read_unverified_env(token) == "env_1"
    claims = verify_token(token, secret="s" * 32, leeway_seconds=0)
    assert claims.scopes == frozenset({"read:sessions"})
    assert claims.expires_at == exp
    with pytest.raises(InvalidToken):
        verify_token(token, secret="t" * 32, leeway_seconds=0)
    none_token = jwt.encode({"env": "env_1", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(InvalidToken):
        read_unverified_env(none_token)
    space_scopes = jwt.encode(
        {"env": "e", "exp": int(time.time()) + 60, "scope": "read:sessions write:sessions"},
        "k" * 32,
        algorithm="HS256",
    )
    assert verify_token(space_scopes, secret="k" * 32, leeway_seconds=0).scopes == {
        "read:sessions",
        "write:sessions",
    }


def test_ids_sort_by_creation_time() -> None:
    first = new_id("session")
    time.sleep(0.002)
    second = new_id("session")
    assert first < second
    assert len(first) == len("session_") + 26
    assert len({new_id("session") for _ in range(1000)}) == 1000


def test_cursor_round_trip_and_sort_binding() -> None:
    cursor = Cursor(sort="createdAt", key_us=1_700_000_000_123_456, id="session_x")
    assert Cursor.decode(cursor.encode(), sort="createdAt", param="p") == cursor
    with pytest.raises(ValidationFailed):
        Cursor.decode(cursor.encode(), sort="lastActiveAt", param="p")
    with pytest.raises(ValidationFailed):
        Cursor.decode("!!!", sort="createdAt", param="p")


def test_period_filter_is_relative_to_now() -> None:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    query = parse_list_query({"filter[createdAt][period]": ["2h"]}, now=now)
    assert query.filters.created_from == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert query.sort == "createdAt"
    assert query.descending
    assert query.page_size == 20


def test_metadata_limit_counts_serialized_utf8_bytes() -> None:
    just_fits = "é" * ((MAX_METADATA_BYTES - len('{"k":""}')) // 2)
    CreateSessionBody.model_validate({"type": "t", "metadata": {"k": just_fits}})
    with pytest.raises(ValidationError):
        CreateSessionBody.model_validate({"type": "t", "metadata": {"k": just_fits + "é"}})


def test_status_derivation() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert session_status(None, None, now) == "ACTIVE"
    assert session_status(None, now, now) == "EXPIRED"
    assert session_status(now, now, now) == "CLOSED"
    assert session_status(None, datetime(2027, 1, 1, tzinfo=UTC), now) == "ACTIVE"
