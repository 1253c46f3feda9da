"""The session list filters, derived status and mirrored columns of ``threadline.sessions.fields``.

Everything the filter definitions feed (the parser, both SQL dialects, OpenAPI, the replication
column list) must agree with them and with each other; these tests check it without any service.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.api.openapi import build_openapi
from threadline.config import sql_dir
from threadline.errors import ValidationFailed
from threadline.replication.consumer import COLUMNS, SessionRow
from threadline.sessions.fields import (
    ANY_OF_FILTERS,
    FILTER_KEYS,
    SESSIONS_V1_COLUMNS,
    STATUS_RULES,
    STATUSES,
    ClickHouseParams,
    PostgresParams,
    SessionFilters,
    Status,
    filter_conditions,
    session_status,
    status_condition,
    status_counts,
    to_micros,
)
from threadline.sessions.listing import parse_count_query, parse_list_query

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIST_ONLY_KEYS = {"sort", "page[size]", "page[after]", "page[before]"}

# --- strategies ---------------------------------------------------------------------------------

# Any text a value can hold: no comma (the separator) and no NUL (refused: Postgres cannot store it).
value_text = (
    st.text(st.characters(codec="utf-8", exclude_characters=",\x00"), min_size=1, max_size=6)
    .map(str.strip)
    .filter(bool)
)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@st.composite
def session_filters(draw: st.DrawFn) -> SessionFilters:
    any_of = {
        f.key: tuple(draw(st.lists(value_text, min_size=1, max_size=min(f.max_items, 4), unique=True)))
        for f in draw(st.lists(st.sampled_from(ANY_OF_FILTERS), unique=True))
    }
    statuses: tuple[Status, ...] = tuple(draw(st.lists(st.sampled_from(STATUSES), unique=True)))
    return SessionFilters(
        any_of=any_of,
        statuses=statuses,
        created_from=draw(st.none() | moments),
        created_to=draw(st.none() | moments),
    )


# --- query keys and parsing ---------------------------------------------------------------------


@given(
    keys=st.sets(
        st.sampled_from(sorted(FILTER_KEYS | LIST_ONLY_KEYS | {"minLsn"}))
        | st.from_regex(r"\Afilter\[[a-zA-Z\]\[]{1,12}\]\Z")
        | st.text(max_size=10)
    )
)
def test_parsers_accept_exactly_the_defined_keys(keys: set[str]) -> None:
    params: dict[str, list[str]] = {key: [] for key in keys}  # no value: only the key is checked
    for parse, allowed in (
        (parse_count_query, FILTER_KEYS | {"minLsn"}),
        (parse_list_query, FILTER_KEYS | LIST_ONLY_KEYS | {"minLsn"}),
    ):
        unknown = sorted(keys - allowed)
        if unknown:
            with pytest.raises(ValidationFailed) as raised:
                parse(params, now=NOW)
            assert raised.value.code == "unknown_parameter"
            assert raised.value.details == {"unknown": unknown, "allowed": sorted(allowed)}
        else:
            parse(params, now=NOW)


@given(filters=session_filters())
def test_any_of_values_round_trip_through_the_query_string(filters: SessionFilters) -> None:
    params = {f.param: [" , ".join(filters.any_of[f.key])] for f in ANY_OF_FILTERS if f.key in filters.any_of}
    if filters.statuses:
        params["filter[status]"] = [",".join(s.lower() for s in filters.statuses)]
    parsed = parse_count_query(params, now=NOW).filters
    assert parsed.any_of == filters.any_of
    assert parsed.statuses == filters.statuses


@pytest.mark.parametrize("definition", ANY_OF_FILTERS, ids=lambda f: f.key)
def test_any_of_limits_come_from_the_definition(definition: Any) -> None:
    at_limit = ",".join(f"v{i}" for i in range(definition.max_items))
    parsed = parse_count_query({definition.param: [at_limit + ",v0"]}, now=NOW).filters
    assert parsed.any_of == {definition.key: tuple(at_limit.split(","))}
    with pytest.raises(ValidationFailed, match=re.escape(f"at most {definition.max_items}")):
        parse_count_query({definition.param: [at_limit + ",extra"]}, now=NOW)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"filter[status]": "RUNNING"},
            "filter[status] values must be among ACTIVE, CLOSED, EXPIRED; got RUNNING",
        ),
        ({"filter[type]": " , "}, "filter[type] is empty"),
        ({"filter[tags]": ",".join("abcdefghijk")}, "filter[tags] has 11 values; at most 10"),
        (
            {"filter[createdAt][period]": "7 days"},
            "filter[createdAt][period] must look like 30m, 12h, 7d or 2w",
        ),
        (
            {"filter[createdAt][period]": "7d", "filter[createdAt][to]": "2026-01-01T00:00:00Z"},
            "filter[createdAt][period] cannot be combined with [from]/[to]",
        ),
        (
            {"filter[createdAt][from]": "2026-01-01T00:00:00"},
            "filter[createdAt][from] must include a timezone (e.g. 2026-01-01T00:00:00Z)",
        ),
        (
            {"filter[createdAt][to]": "soon"},
            "filter[createdAt][to] must be an ISO 8601 timestamp or epoch milliseconds",
        ),
        (
            {
                "filter[createdAt][from]": "2026-02-01T00:00:00Z",
                "filter[createdAt][to]": "2026-01-01T00:00:00Z",
            },
            "filter[createdAt][from] is after filter[createdAt][to]",
        ),
        # When several filters are wrong, status is reported first, then createdAt, then the
        # any-of filters in definition order: the order the parser always checked them in.
        ({"filter[type]": ",", "filter[status]": "x"}, "filter[status] values must be among"),
        ({"filter[type]": ",", "filter[createdAt][period]": "x"}, "filter[createdAt][period] must look like"),
        ({"filter[externalId]": ",", "filter[tags]": ","}, "filter[tags] is empty"),
    ],
)
def test_filter_errors_keep_their_messages(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_list_query({key: [value] for key, value in params.items()}, now=NOW)
    assert str(raised.value).startswith(message)
    assert raised.value.code == "validation_error"


def test_parsed_filters_hold_normalised_values() -> None:
    filters = parse_count_query(
        {
            "filter[type]": [" a , b,a ,"],
            "filter[status]": ["closed,Active"],
            "filter[createdAt][period]": ["2h"],
        },
        now=NOW,
    ).filters
    assert filters == SessionFilters(
        any_of={"type": ("a", "b")}, statuses=("CLOSED", "ACTIVE"), created_from=NOW - timedelta(hours=2)
    )


def test_openapi_lists_the_defined_filters_then_min_lsn() -> None:
    operations = build_openapi()["paths"]
    count_names = [p["name"] for p in operations["/api/v1/sessions/count"]["get"]["parameters"]]
    list_names = [p["name"] for p in operations["/api/v1/sessions"]["get"]["parameters"]]
    assert set(count_names) == FILTER_KEYS | {"minLsn"}
    assert count_names[: len(ANY_OF_FILTERS)] == [f.param for f in ANY_OF_FILTERS]
    assert count_names[-1] == "minLsn"
    assert set(list_names) == FILTER_KEYS | LIST_ONLY_KEYS | {"minLsn"}


# --- SQL ----------------------------------------------------------------------------------------


def _pg_placeholders(conditions: list[str]) -> set[int]:
    return {int(n) for n in re.findall(r"\$(\d+)", " ".join(conditions))}


def _ch_placeholders(conditions: list[str]) -> set[str]:
    return set(re.findall(r"\{(\w+):[^}]+\}", " ".join(conditions)))


@given(filters=session_filters())
def test_both_dialects_get_a_condition_for_exactly_the_same_filters(filters: SessionFilters) -> None:
    pg, ch = PostgresParams(NOW), ClickHouseParams(NOW)
    pg_where, ch_where = filter_conditions(filters, pg), filter_conditions(filters, ch)
    expected = (
        [f for f in ANY_OF_FILTERS if f.key in filters.any_of]
        + (["status"] if filters.statuses else [])
        + (["created_from"] if filters.created_from is not None else [])
        + (["created_to"] if filters.created_to is not None else [])
    )
    assert len(pg_where) == len(ch_where) == len(expected)
    for pg_condition, ch_condition, which in zip(pg_where, ch_where, expected, strict=True):
        if isinstance(which, str):
            continue
        assert f"s.{which.column}" in pg_condition
        assert which.column in ch_condition
        assert list(filters.any_of[which.key]) in pg.args
        assert ch.params[which.key] == list(filters.any_of[which.key])


@given(filters=session_filters())
def test_every_bound_value_is_used_and_now_only_when_needed(filters: SessionFilters) -> None:
    pg, ch = PostgresParams(NOW), ClickHouseParams(NOW)
    pg_where, ch_where = filter_conditions(filters, pg), filter_conditions(filters, ch)
    # Postgres refuses a statement with a parameter it cannot type, i.e. one no condition uses.
    assert _pg_placeholders(pg_where) == set(range(1, len(pg.args) + 1))
    assert _ch_placeholders(ch_where) == set(ch.params)
    needs_now = any(STATUS_RULES[s].expiry is not None for s in filters.statuses)
    created = (filters.created_from is not None) + (filters.created_to is not None)
    assert len(pg.args) == len(filters.any_of) + needs_now + created
    assert ("now_us" in ch.params) == needs_now


def test_any_of_conditions_per_dialect() -> None:
    filters = SessionFilters(any_of={"type": ("a",), "tags": ("t",), "taskIdentifier": ("k",)})
    pg, ch = PostgresParams(NOW, ["env"]), ClickHouseParams(NOW)
    assert filter_conditions(filters, pg) == [
        "s.type = ANY($2::text[])",
        "s.tags && $3::text[]",
        "s.task_identifier = ANY($4::text[])",
    ]
    assert filter_conditions(filters, ch) == [
        "has({type:Array(String)}, type)",
        "hasAny(tags, {tags:Array(String)})",
        "has({taskIdentifier:Array(String)}, task_identifier)",
    ]


def test_root_id_matches_roots_by_their_own_id_in_both_dialects() -> None:
    filters = SessionFilters(any_of={"rootId": ("session_r",), "forkedFrom": ("session_p",)})
    pg, ch = PostgresParams(NOW, ["env"]), ClickHouseParams(NOW)
    assert filter_conditions(filters, pg) == [
        "s.forked_from = ANY($2::text[])",
        "(s.root_id = ANY($3::text[]) OR (s.root_id IS NULL AND s.id = ANY($3::text[])))",
    ]
    assert filter_conditions(filters, ch) == [
        "has({forkedFrom:Array(String)}, forked_from)",
        "(has({rootId:Array(String)}, root_id) OR (root_id = '' AND has({rootId:Array(String)}, session_id)))",
    ]


def _root_id_matches(row_id: str, root_id: str | None, values: tuple[str, ...]) -> bool:
    """Evaluate the Postgres rootId condition with SQLite (``ANY`` spelled as ``IN``)."""
    sql = PostgresParams(NOW)
    condition = filter_conditions(SessionFilters(any_of={"rootId": values}), sql)[0]
    marks = ", ".join("?" for _ in values)
    condition = re.sub(r"= ANY\(\$1::text\[\]\)", f"IN ({marks})", condition).replace("s.", "")
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE s (id TEXT, root_id TEXT)")
        db.execute("INSERT INTO s VALUES (?, ?)", (row_id, root_id))
        found = db.execute(f"SELECT count(*) FROM s WHERE {condition}", [*values, *values]).fetchone()
        return found == (1,)
    finally:
        db.close()


@pytest.mark.parametrize(
    ("row_id", "root_id", "values", "matches"),
    [
        ("r", None, ("r",), True),  # a root is in its own tree
        ("f", "r", ("r",), True),  # a fork is in its root's tree
        ("f", "r", ("f",), False),  # ... and not in a tree rooted at its own id
        ("r", None, ("x",), False),
        ("f", "r", ("x", "r"), True),
    ],
)
def test_root_id_condition_is_the_rendered_root_id(
    row_id: str, root_id: str | None, values: tuple[str, ...], matches: bool
) -> None:
    assert _root_id_matches(row_id, root_id, values) is matches


def test_clickhouse_timestamps_travel_as_microseconds() -> None:
    at = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    ch = ClickHouseParams(NOW)
    assert filter_conditions(SessionFilters(created_from=at), ch) == [
        "created_at >= fromUnixTimestamp64Micro({created_from_us:Int64}, 'UTC')"
    ]
    assert ch.params == {"created_from_us": 1_767_225_600_123_456}


# --- derived status -----------------------------------------------------------------------------


def _old_session_status(closed_at: datetime | None, expires_at: datetime | None, now: datetime) -> str:
    """The rule as it was written before it had one home."""
    if closed_at is not None:
        return "CLOSED"
    if expires_at is not None and expires_at <= now:
        return "EXPIRED"
    return "ACTIVE"


def _sql_statuses(closed_at: datetime | None, expires_at: datetime | None, now: datetime) -> set[Status]:
    """The statuses whose Postgres condition a row satisfies, evaluated by SQLite.

    SQLite has SQL's three-valued NULL logic, which is what the conditions depend on. Timestamps
    become microseconds; ``$n`` placeholders become ``?n``.
    """

    def micros(value: datetime | None) -> int | None:
        return None if value is None else to_micros(value)

    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE s (closed_at INTEGER, expires_at INTEGER)")
        db.execute("INSERT INTO s VALUES (?, ?)", (micros(closed_at), micros(expires_at)))
        matched = set()
        for status in STATUSES:
            sql = PostgresParams(now)
            condition = re.sub(r"\$(\d+)", r"?\1", status_condition(status, sql))
            args = [micros(arg) for arg in sql.args]
            if db.execute(f"SELECT count(*) FROM s WHERE {condition}", args).fetchone() == (1,):
                matched.add(status)
        return matched
    finally:
        db.close()


@given(
    closed_at=st.none() | moments,
    expires_at=st.none() | moments,
    now=moments,
)
def test_status_rules_partition_sessions_in_python_and_sql(
    closed_at: datetime | None, expires_at: datetime | None, now: datetime
) -> None:
    status = session_status(closed_at, expires_at, now)
    assert status == _old_session_status(closed_at, expires_at, now)
    assert [s for s, rule in STATUS_RULES.items() if rule.matches(closed_at, expires_at, now)] == [status]
    assert _sql_statuses(closed_at, expires_at, now) == {status}


def test_status_at_the_expiry_instant_is_expired() -> None:
    assert session_status(None, NOW, NOW) == "EXPIRED"
    assert _sql_statuses(None, NOW, NOW) == {"EXPIRED"}


def test_status_counts_cover_every_status_in_both_dialects() -> None:
    pg, ch = PostgresParams(NOW), ClickHouseParams(NOW)
    pg_counts, ch_counts = status_counts(pg), status_counts(ch)
    assert [c.rsplit(" AS ", 1)[1] for c in pg_counts] == [s.lower() for s in STATUSES]
    assert [c.rsplit(" AS ", 1)[1] for c in ch_counts] == [s.lower() for s in STATUSES]
    assert pg.args == [NOW]  # bound once, shared by every status that needs it
    assert ch.params == {"now_us": 1_767_225_600_000_000}


# --- the ClickHouse mirror ----------------------------------------------------------------------


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def _sessions_v1_columns(directory: Path) -> list[str]:
    """``sessions_v1``'s columns as the schema files create them, in order (a later
    ``ALTER TABLE ... ADD COLUMN`` appends)."""
    columns: list[str] = []
    for path in sorted(directory.glob("*.sql")):
        text = _strip_comments(path.read_text(encoding="utf-8"))
        create = re.search(r"CREATE TABLE IF NOT EXISTS sessions_v1\s*\((.*?)\)\s*ENGINE", text, re.S)
        if create:
            for line in create[1].splitlines():
                words = line.strip().split()
                if words and words[0].upper() not in {"INDEX", "PROJECTION", "CONSTRAINT"}:
                    columns.append(words[0])
        for added in re.finditer(
            r"ALTER TABLE (?:IF EXISTS )?sessions_v1\s+ADD COLUMN (?:IF NOT EXISTS )?(\w+)([^,;]*)", text
        ):
            assert not re.search(r"\b(AFTER|FIRST)\b", added[2]), "columns are appended in order"
            columns.append(added[1])
    return columns


def _postgres_sessions_columns(directory: Path) -> set[str]:
    text = _strip_comments((directory / "0001_foundation.sql").read_text(encoding="utf-8"))
    create = re.search(r"CREATE TABLE sessions \((.*?)\n\);", text, re.S)
    assert create is not None
    words = (line.strip().split() for line in create[1].splitlines())
    columns = {w[0] for w in words if w and w[0].upper() != "CONSTRAINT"}
    for path in sorted(directory.glob("*.sql")):
        columns |= set(
            re.findall(r"ALTER TABLE sessions\s+ADD COLUMN (?:IF NOT EXISTS )?(\w+)", path.read_text())
        )
    return columns


def test_mirror_columns_are_the_clickhouse_schema_columns_in_order() -> None:
    schema = _sessions_v1_columns(sql_dir("clickhouse_schema"))
    assert schema, "no CREATE TABLE sessions_v1 found"
    assert [c.name for c in SESSIONS_V1_COLUMNS] == schema
    assert schema == COLUMNS


def test_filter_columns_exist_in_both_stores() -> None:
    clickhouse = set(_sessions_v1_columns(sql_dir("clickhouse_schema")))
    postgres = _postgres_sessions_columns(sql_dir("pg_migrations"))
    for f in ANY_OF_FILTERS:
        assert f.column in clickhouse
        assert f.column in postgres


class _Recording(dict[str, Any]):
    """A row that remembers which keys the mirror read."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def _pg_row(**changes: Any) -> dict[str, Any]:
    return {
        "id": "session_1",
        "environment_id": "env_1",
        "project_id": "proj_1",
        "organization_id": "org_1",
        "external_id": None,
        "type": "chat",
        "task_identifier": "task",
        "tags": ["a", "b"],
        "metadata": {"k": [1, "é"]},
        "closed_at": None,
        "closed_reason": None,
        "expires_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
        "last_active_at": NOW,
        **changes,
    }


def test_mirror_reads_only_postgres_columns() -> None:
    row = _Recording(_pg_row())
    SessionRow(row, 7, deleted=False).as_clickhouse()
    assert row.read <= _postgres_sessions_columns(sql_dir("pg_migrations"))


def test_mirror_row_values() -> None:
    assert SessionRow(_pg_row(), 7, deleted=False).as_clickhouse() == [
        "env_1",
        "org_1",
        "proj_1",
        "session_1",
        "",
        "chat",
        "task",
        ["a", "b"],
        '{"k":[1,"\\u00e9"]}',
        None,
        "",
        NOW,
        NOW,
        NOW,
        NOW,
        7,
        0,
        "",
        None,
        None,
        "",
    ]
    fork = SessionRow(
        _pg_row(forked_from="session_0", fork_out_offset=3, fork_in_offset=0, root_id="session_r"),
        8,
        deleted=False,
    ).as_clickhouse()
    assert fork[COLUMNS.index("forked_from") :] == ["session_0", 3, 0, "session_r"]
    # Backfill reads jsonb as text and a delete may carry no tags: the same canonical values.
    deleted = SessionRow(_pg_row(metadata='{"k": [1, "é"]}', tags=None), 9, deleted=True).as_clickhouse()
    assert deleted[COLUMNS.index("metadata")] == '{"k":[1,"\\u00e9"]}'
    assert deleted[COLUMNS.index("tags")] == []
    assert [deleted[COLUMNS.index("_version")], deleted[COLUMNS.index("_is_deleted")]] == [9, 1]


@pytest.mark.parametrize("param", [*(f.param for f in ANY_OF_FILTERS), "filter[status]", "sort"])
def test_a_nul_in_any_query_value_is_a_400(param: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_list_query({param: ["a\x00b"]}, now=NOW)
    assert raised.value.message == f"{param} may not contain NUL (%00)"
