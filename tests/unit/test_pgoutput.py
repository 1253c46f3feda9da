"""Decoding pgoutput v1 and turning it into session rows: threadline.replication.pgoutput and
threadline.replication.consumer.decode_batch, on messages captured from a real Postgres.

tests/unit/data/pgoutput_capture.json says how the bytes were captured and what was done.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadline.replication.consumer import SessionRow, decode_batch
from threadline.replication.pgoutput import (
    Begin,
    Change,
    Commit,
    DecodeError,
    Relation,
    Truncate,
    decode_message,
    format_lsn,
    parse_lsn,
    parse_text_array,
    row_values,
)

CAPTURE = json.loads((Path(__file__).parent / "data" / "pgoutput_capture.json").read_text())
SESSIONS_PEEK: list[dict[str, str]] = CAPTURE["threadline_sessions"]
PROBE_PEEK: list[dict[str, str]] = CAPTURE["probe_pub"]
SESSIONS = [bytes.fromhex(row["data"]) for row in SESSIONS_PEEK]
PROBE = [bytes.fromhex(row["data"]) for row in PROBE_PEEK]
BIG_METADATA = {"blob": CAPTURE["big_metadata_blob"]}
POSTGRES_EPOCH_US = 946_684_800_000_000

# Where each transaction of the sessions publication lies in SESSIONS (see the capture's comment).
TX1_INSERT_A = slice(0, 4)  # Begin, Relation, Insert, Commit
TX2_INSERT_B = slice(4, 7)
TX3_UPDATES = slice(7, 12)  # Begin, Update a, Update a, Update b, Commit
TX7_DELETE_A = slice(12, 15)
TX8_TRUNCATE = slice(15, 19)

SESSION_COLUMNS = [
    ("id", 25),
    ("environment_id", 25),
    ("project_id", 25),
    ("organization_id", 25),
    ("external_id", 25),
    ("type", 25),
    ("task_identifier", 25),
    ("tags", 1009),
    ("metadata", 3802),
    ("closed_at", 1184),
    ("closed_reason", 25),
    ("expires_at", 1184),
    ("created_at", 1184),
    ("updated_at", 1184),
    ("last_active_at", 1184),
]
TAGS_A = ["plain", "with space", "a,b", 'q"x', "back\\slash", None, "NULL", ""]
T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
SESSION_A = {
    "id": "session_a",
    "environment_id": "env_1",
    "project_id": "proj_1",
    "organization_id": "org_1",
    "external_id": "ext-a",
    "type": "chat",
    "task_identifier": None,
    "tags": TAGS_A,
    "metadata": {"n": 1, "nested": {"k": [True, None, 2.5]}, "s": "é"},
    "closed_at": None,
    "closed_reason": None,
    "expires_at": datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC),
    "created_at": T0,
    "updated_at": T0,
    "last_active_at": T0,
}
SESSION_A_CLOSED = {
    **SESSION_A,
    "closed_at": datetime(2026, 1, 2, 4, 0, tzinfo=UTC),
    "closed_reason": "done",
    "updated_at": datetime(2026, 1, 2, 4, 0, tzinfo=UTC),
}
SESSION_A_TOUCHED = {
    **SESSION_A_CLOSED,
    "last_active_at": datetime(2026, 1, 2, 4, 0, 1, tzinfo=UTC),
    "updated_at": datetime(2026, 1, 2, 4, 0, 1, tzinfo=UTC),
}
T1 = datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
SESSION_B = {
    "id": "session_b",
    "environment_id": "env_1",
    "project_id": "proj_1",
    "organization_id": "org_1",
    "external_id": None,
    "type": "agent",
    "task_identifier": "task-1",
    "tags": [],
    "metadata": BIG_METADATA,
    "closed_at": None,
    "closed_reason": None,
    "expires_at": None,
    "created_at": T1,
    "updated_at": T1,
    "last_active_at": T1,
}
SESSION_B_TOUCHED = {
    **SESSION_B,
    "last_active_at": datetime(2026, 1, 2, 5, 0, tzinfo=UTC),
    "updated_at": datetime(2026, 1, 2, 5, 0, tzinfo=UTC),
}


def decoded(messages: list[bytes]) -> list[Any]:
    return [decode_message(data) for data in messages]


SESSIONS_RELATION = decode_message(SESSIONS[1])
assert isinstance(SESSIONS_RELATION, Relation)


def change(index: int) -> Change:
    message = decode_message(SESSIONS[index])
    assert isinstance(message, Change)
    return message


def begin_of(tx: slice) -> Begin:
    message = decode_message(SESSIONS[tx][0])
    assert isinstance(message, Begin)
    return message


def commit_of(tx: slice) -> Commit:
    message = decode_message(SESSIONS[tx][-1])
    assert isinstance(message, Commit)
    return message


# --- messages --------------------------------------------------------------------------------


def test_the_captured_sessions_stream_decodes_to_the_expected_message_kinds() -> None:
    kinds = [
        message.kind if isinstance(message, Change) else type(message).__name__
        for message in decoded(SESSIONS)
    ]
    assert kinds == [
        *("Begin", "Relation", "insert", "Commit"),
        *("Begin", "insert", "Commit"),
        *("Begin", "update", "update", "update", "Commit"),
        *("Begin", "delete", "Commit"),
        *("Begin", "Relation", "Truncate", "Commit"),
    ]


def test_begin_and_commit_of_each_transaction_agree_and_match_the_slot() -> None:
    messages = decoded(SESSIONS)
    begins = [(i, m) for i, m in enumerate(messages) if isinstance(m, Begin)]
    commits = [(i, m) for i, m in enumerate(messages) if isinstance(m, Commit)]
    assert len(begins) == len(commits) == 5
    for (b_index, begin), (c_index, commit) in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert begin.commit_time_us == commit.commit_time_us
        assert begin.xid == int(SESSIONS_PEEK[b_index]["xid"]) == int(SESSIONS_PEEK[c_index]["xid"])
        # The slot reports a commit message at the end of its commit record.
        assert parse_lsn(SESSIONS_PEEK[c_index]["lsn"]) == commit.end_lsn
    assert [b.final_lsn for _, b in begins] == sorted(b.final_lsn for _, b in begins)


def test_commit_times_are_microseconds_since_2000() -> None:
    begin = begin_of(TX1_INSERT_A)
    captured_at = datetime.fromtimestamp((begin.commit_time_us + POSTGRES_EPOCH_US) / 1e6, UTC)
    assert datetime(2025, 1, 1, tzinfo=UTC) < captured_at < datetime(2100, 1, 1, tzinfo=UTC)


def test_the_relation_message_names_the_table_and_its_column_types() -> None:
    assert SESSIONS_RELATION.namespace == "public"
    assert SESSIONS_RELATION.name == "sessions"
    assert SESSIONS_RELATION.columns == SESSION_COLUMNS
    truncate_relation = decode_message(SESSIONS[TX8_TRUNCATE][1])
    assert truncate_relation == SESSIONS_RELATION


def test_an_insert_carries_the_new_row_as_text_values() -> None:
    insert = change(2)
    assert (insert.kind, insert.relation_id, insert.old) == ("insert", SESSIONS_RELATION.relation_id, None)
    assert insert.new is not None
    assert insert.new[:7] == [
        ("t", "session_a"),
        ("t", "env_1"),
        ("t", "proj_1"),
        ("t", "org_1"),
        ("t", "ext-a"),
        ("t", "chat"),
        ("n", None),
    ]
    assert insert.new[7] == ("t", '{plain,"with space","a,b","q\\"x","back\\\\slash",NULL,"NULL",""}')
    assert insert.new[12] == ("t", "2026-01-02 03:04:05.123456+00")


def test_row_values_of_an_insert_converts_every_session_column() -> None:
    insert = change(2)
    assert insert.new is not None
    assert row_values(SESSIONS_RELATION, insert.new) == SESSION_A


def test_an_update_carries_the_whole_old_row_and_the_new_row() -> None:
    first, second = change(8), change(9)
    assert first.old is not None
    assert first.new is not None
    assert second.old is not None
    assert second.new is not None
    assert row_values(SESSIONS_RELATION, first.old) == SESSION_A
    assert row_values(SESSIONS_RELATION, first.new) == SESSION_A_CLOSED
    assert row_values(SESSIONS_RELATION, second.old) == SESSION_A_CLOSED
    assert row_values(SESSIONS_RELATION, second.new) == SESSION_A_TOUCHED


def test_an_unchanged_toasted_value_is_u_and_comes_from_the_old_row() -> None:
    update = change(10)
    assert update.old is not None
    assert update.new is not None
    assert update.new[8] == ("u", None)  # metadata was not touched and lives out of line
    old = row_values(SESSIONS_RELATION, update.old)
    assert old == SESSION_B
    assert row_values(SESSIONS_RELATION, update.new, fallback=old) == SESSION_B_TOUCHED


def test_an_unchanged_toasted_value_without_an_old_row_is_a_decode_error() -> None:
    update = change(10)
    assert update.new is not None
    with pytest.raises(DecodeError, match=r"sessions\.metadata"):
        row_values(SESSIONS_RELATION, update.new)
    with pytest.raises(DecodeError):
        row_values(SESSIONS_RELATION, update.new, fallback={"id": "session_b"})


def test_a_delete_carries_the_whole_old_row() -> None:
    delete = change(13)
    assert (delete.kind, delete.new) == ("delete", None)
    assert delete.old is not None
    assert row_values(SESSIONS_RELATION, delete.old) == SESSION_A_TOUCHED


def test_a_truncate_names_the_truncated_relations() -> None:
    assert decode_message(SESSIONS[TX8_TRUNCATE][2]) == Truncate([SESSIONS_RELATION.relation_id])


def test_every_parsed_column_type_converts_from_its_text_form() -> None:
    messages = decoded(PROBE)
    relation = next(m for m in messages if isinstance(m, Relation) and m.name == "probe")
    assert relation.columns == [
        ("id", 23),
        ("flag", 16),
        ("small", 21),
        ("big", 20),
        ("name", 1043),
        ("doc", 114),
        ("tags", 1009),
        ("at", 1184),
        ("note", 25),
    ]
    changes = [m for m in messages if isinstance(m, Change) and m.relation_id == relation.relation_id]
    assert [c.kind for c in changes] == ["insert", "update", "delete"]
    inserted = {
        "id": 1,
        "flag": True,
        "small": -7,
        "big": 9007199254740993,
        "name": "vc",
        "doc": {"a": [1, "x"]},
        "tags": ["x", "y z"],
        "at": datetime(1999, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        "note": None,
    }
    updated = {**inserted, "flag": False, "note": "changed"}
    insert, update, delete = changes
    assert insert.new is not None
    assert update.new is not None
    assert update.old is not None
    assert delete.old is not None
    assert row_values(relation, insert.new) == inserted
    assert row_values(relation, update.old) == inserted
    assert row_values(relation, update.new) == updated
    assert row_values(relation, delete.old) == updated


def test_a_row_with_the_wrong_number_of_values_is_a_decode_error() -> None:
    insert = change(2)
    assert insert.new is not None
    with pytest.raises(DecodeError, match="14 values for 15 columns"):
        row_values(SESSIONS_RELATION, insert.new[:-1])


def test_a_column_type_without_a_text_parser_is_a_decode_error() -> None:
    relation = Relation(1, "public", "t", [("ratio", 700)])  # float4
    with pytest.raises(DecodeError, match="type oid 700"):
        row_values(relation, [("t", "1.5")])


def test_message_kinds_the_mirror_does_not_need_decode_to_none() -> None:
    origin = b"O" + struct.pack("!Q", 0x1234) + b"origin\0"
    type_message = b"Y" + struct.pack("!I", 16384) + b"public\0mood\0"
    assert decode_message(origin) is None
    assert decode_message(type_message) is None


def with_byte(data: bytes, index: int, value: bytes) -> bytes:
    return data[:index] + value + data[index + 1 :]


def test_an_insert_without_a_new_tuple_marker_is_a_decode_error() -> None:
    insert = SESSIONS[2]
    assert insert[5:6] == b"N"
    with pytest.raises(DecodeError, match="insert without a new tuple"):
        decode_message(with_byte(insert, 5, b"X"))


def test_an_update_without_a_new_tuple_is_a_decode_error() -> None:
    update = SESSIONS[8]
    assert update[5:6] == b"O"
    with pytest.raises(DecodeError, match="update without a new tuple"):
        decode_message(with_byte(update, 5, b"X"))


def test_a_delete_without_an_old_tuple_is_a_decode_error() -> None:
    delete = SESSIONS[13]
    assert delete[5:6] == b"O"
    with pytest.raises(DecodeError, match="delete without an old tuple"):
        decode_message(with_byte(delete, 5, b"N"))


def test_a_binary_column_value_is_a_decode_error() -> None:
    insert = SESSIONS[2]
    assert insert[8:9] == b"t"  # after 'I', relation id, 'N' and the column count
    with pytest.raises(DecodeError, match="unsupported tuple value kind 'b'"):
        decode_message(with_byte(insert, 8, b"b"))


# --- text arrays -----------------------------------------------------------------------------


def test_a_captured_text_array_with_quotes_escapes_and_nulls_parses() -> None:
    assert parse_text_array('{plain,"with space","a,b","q\\"x","back\\\\slash",NULL,"NULL",""}') == TAGS_A


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("{}", []),
        ('{""}', [""]),
        ("{NULL}", [None]),
        ('{"NULL"}', ["NULL"]),
        ("{a,b}", ["a", "b"]),
        ('{"\\\\"}', ["\\"]),
        ('{"{}"}', ["{}"]),
    ],
)
def test_text_arrays_parse_to_lists(text: str, items: list[str | None]) -> None:
    assert parse_text_array(text) == items


@pytest.mark.parametrize("text", ["", "a,b", "{a", "a}", '{"a"b}', '{"a""b"}'])
def test_a_malformed_array_literal_is_a_decode_error(text: str) -> None:
    with pytest.raises(DecodeError):
        parse_text_array(text)


def array_out(items: list[str | None]) -> str:
    """Postgres' array_out for a one-dimensional text[]: quote what needs it, escape " and \\."""

    def element(item: str | None) -> str:
        if item is None:
            return "NULL"
        if item == "" or item.upper() == "NULL" or any(c in item for c in '{}",\\ \t\n\r\v\f'):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return item

    return "{" + ",".join(element(item) for item in items) + "}"


def test_the_array_out_model_matches_what_postgres_sent() -> None:
    insert = change(2)
    assert insert.new is not None
    assert array_out(TAGS_A) == insert.new[7][1]


@given(st.lists(st.none() | st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)))))
def test_any_text_array_postgres_prints_parses_back(items: list[str | None]) -> None:
    assert parse_text_array(array_out(items)) == items


# --- LSNs ------------------------------------------------------------------------------------


def test_an_lsn_is_two_hex_halves_of_a_64_bit_position() -> None:
    assert parse_lsn("0/0") == 0
    assert parse_lsn("16/B374D848") == 0x16_B374_D848
    assert parse_lsn("16/b374d848") == 0x16_B374_D848
    assert format_lsn(0x16_B374_D848) == "16/B374D848"
    assert format_lsn(0) == "0/0"
    assert format_lsn(2**64 - 1) == "FFFFFFFF/FFFFFFFF"


def test_lsns_as_postgres_prints_them_format_back_the_same() -> None:
    texts = {row["lsn"] for row in SESSIONS_PEEK + PROBE_PEEK} | {CAPTURE["slot_start_lsn"]}
    for text in texts:
        assert format_lsn(parse_lsn(text)) == text


@given(st.integers(0, 2**64 - 1))
def test_format_then_parse_gives_the_lsn_back(value: int) -> None:
    assert parse_lsn(format_lsn(value)) == value


# --- decode_batch: the consumer's coalescing -------------------------------------------------


def test_nothing_peeked_is_an_empty_batch() -> None:
    batch = decode_batch([])
    assert (batch.rows, batch.end_lsn, batch.first_commit_time) == ({}, None, None)


def test_the_newest_version_of_each_session_wins() -> None:
    batch = decode_batch(SESSIONS[: TX8_TRUNCATE.start])
    assert batch.rows == {
        "session_a": SessionRow(SESSION_A_TOUCHED, begin_of(TX7_DELETE_A).final_lsn, deleted=True),
        "session_b": SessionRow(SESSION_B_TOUCHED, begin_of(TX3_UPDATES).final_lsn, deleted=False),
    }
    assert batch.end_lsn == commit_of(TX7_DELETE_A).end_lsn
    assert batch.first_commit_time == (begin_of(TX1_INSERT_A).commit_time_us + POSTGRES_EPOCH_US) / 1e6


def test_two_updates_in_one_transaction_leave_the_last() -> None:
    batch = decode_batch(SESSIONS[: TX3_UPDATES.stop])
    version = begin_of(TX3_UPDATES).final_lsn
    assert batch.rows == {
        "session_a": SessionRow(SESSION_A_TOUCHED, version, deleted=False),
        "session_b": SessionRow(SESSION_B_TOUCHED, version, deleted=False),
    }
    assert batch.end_lsn == commit_of(TX3_UPDATES).end_lsn


def test_a_transaction_cut_off_before_its_commit_is_left_out() -> None:
    batch = decode_batch(SESSIONS[: TX3_UPDATES.start + 3])  # Begin and both updates of a, no Commit
    assert batch.rows == {
        "session_a": SessionRow(SESSION_A, begin_of(TX1_INSERT_A).final_lsn, deleted=False),
        "session_b": SessionRow(SESSION_B, begin_of(TX2_INSERT_B).final_lsn, deleted=False),
    }
    assert batch.end_lsn == commit_of(TX2_INSERT_B).end_lsn


def test_an_older_version_seen_after_a_newer_one_does_not_win() -> None:
    relation = SESSIONS[1]
    batch = decode_batch([relation, *SESSIONS[TX3_UPDATES], *SESSIONS[TX1_INSERT_A]])
    assert batch.rows["session_a"] == SessionRow(SESSION_A_TOUCHED, begin_of(TX3_UPDATES).final_lsn, False)
    assert batch.end_lsn == commit_of(TX1_INSERT_A).end_lsn  # confirm up to the last commit read
    assert batch.first_commit_time == (begin_of(TX3_UPDATES).commit_time_us + POSTGRES_EPOCH_US) / 1e6


def test_changes_to_other_tables_in_the_publication_are_ignored() -> None:
    truncate_begin = max(i for i, m in enumerate(decoded(PROBE)) if isinstance(m, Begin))
    with_probe = decode_batch(PROBE[:truncate_begin])
    sessions_only = decode_batch(SESSIONS[: TX8_TRUNCATE.start])
    assert with_probe.rows == sessions_only.rows
    assert with_probe.end_lsn == sessions_only.end_lsn


def test_the_mirrored_table_is_chosen_by_name() -> None:
    messages = decoded(PROBE)
    truncate_begin = max(i for i, m in enumerate(messages) if isinstance(m, Begin))
    probe_delete = next(
        i
        for i, m in enumerate(messages)
        if isinstance(m, Change) and m.kind == "delete" and m.relation_id != SESSIONS_RELATION.relation_id
    )
    probe_delete_begin = messages[probe_delete - 1]
    assert isinstance(probe_delete_begin, Begin)
    batch = decode_batch(PROBE[:truncate_begin], relation_name="probe")
    assert list(batch.rows) == ["1"]
    assert batch.rows["1"].deleted is True
    assert batch.rows["1"].version == probe_delete_begin.final_lsn


def test_a_truncate_of_the_sessions_table_stops_the_consumer() -> None:
    with pytest.raises(RuntimeError, match="truncated"):
        decode_batch(SESSIONS)
    with pytest.raises(RuntimeError, match="truncated"):
        decode_batch(SESSIONS[TX8_TRUNCATE])


def test_a_decoded_row_goes_to_clickhouse_in_column_order_with_canonical_metadata() -> None:
    update = change(8)
    assert update.new is not None
    row = SessionRow(row_values(SESSIONS_RELATION, update.new), 42, deleted=False)
    assert row.session_id == "session_a"
    # jsonb prints keys shortest first; the stream and the backfill both keep that order.
    metadata = '{"n":1,"s":"\\u00e9","nested":{"k":[true,null,2.5]}}'
    assert row.as_clickhouse() == [
        "env_1",
        "org_1",
        "proj_1",
        "session_a",
        "ext-a",
        "chat",
        "",
        TAGS_A,
        metadata,
        datetime(2026, 1, 2, 4, 0, tzinfo=UTC),
        "done",
        datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC),
        T0,
        datetime(2026, 1, 2, 4, 0, tzinfo=UTC),
        T0,
        42,
        0,
        # Fork lineage: this WAL predates the columns, and such a row is a root ('' / NULL).
        "",
        None,
        None,
        "",
    ]
    # The backfill reads jsonb as text: the same canonical form goes to ClickHouse.
    as_text = {**row.values, "metadata": '{"n": 1, "s": "é", "nested": {"k": [true, null, 2.5]}}'}
    assert SessionRow(as_text, 42, deleted=False).as_clickhouse()[8] == metadata


def test_a_deleted_row_is_flagged_and_missing_optional_text_is_empty() -> None:
    deleted = SessionRow(SESSION_B, 43, deleted=True).as_clickhouse()
    assert (deleted[4], deleted[6], deleted[7], deleted[10]) == ("", "task-1", [], "")
    assert deleted[15:17] == [43, 1]  # _version, _is_deleted
