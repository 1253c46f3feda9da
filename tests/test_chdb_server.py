"""The chDB sidecar, driven through clickhouse-connect's real HTTP clients (sync and async)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clickhouse_connect
import lz4.frame
import pytest
import zstandard
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from threadline.config import sql_dir
from threadline.embedded.chdb_server import ClickHouseHTTPError, decode_body, split_insert
from threadline.storage.clickhouse import (
    ClickHouseUnavailable,
    apply_clickhouse_schema,
    connect_clickhouse,
    ping_clickhouse,
    split_statements,
)

USER = "threadline"
PASSWORD = "s3cret pass:word"
UTC = dt.UTC


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("username", USER)
        kwargs.setdefault("password", PASSWORD)
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.port, **kwargs)

    def url(self, database: str = "threadline") -> str:
        return f"http://{USER}:{PASSWORD.replace(' ', '%20').replace(':', '%3A')}@127.0.0.1:{self.port}/{database}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(data_dir: Path) -> Sidecar:
    port = _free_port()
    log = data_dir / "sidecar.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "threadline.embedded.chdb_server",
                "--path",
                str(data_dir / "chdb"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--user",
                USER,
            ],
            env={**os.environ, "THREADLINE_CHDB_PASSWORD": PASSWORD},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sidecar exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as response:
                if response.read() == b"Ok.\n":
                    return Sidecar(process, port, log)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"sidecar did not answer /ping: {log.read_text()}")


def _stop(sidecar: Sidecar) -> int:
    if sidecar.process.poll() is None:
        sidecar.process.send_signal(signal.SIGTERM)
    try:
        return sidecar.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        sidecar.process.kill()
        sidecar.process.wait()
        raise


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    running = _start(tmp_path_factory.mktemp("sidecar"))
    yield running
    assert _stop(running) == 0, running.log.read_text()


@pytest.fixture
def client(sidecar: Sidecar) -> Iterator[Client]:
    admin = sidecar.client()
    admin.command("CREATE DATABASE IF NOT EXISTS sync_tests")
    admin.close()
    bound = sidecar.client(database="sync_tests")
    yield bound
    bound.close()


def test_ping_and_version(sidecar: Sidecar, client: Client) -> None:
    assert client.ping() is True
    assert client.server_version.split(".")[0].isdigit()
    assert client.command("SELECT currentDatabase()") == "sync_tests"
    unbound = sidecar.client()  # no database parameter: the user's default, as in ClickHouse
    assert unbound.command("SELECT currentDatabase()") == "default"
    assert client.command("SELECT currentDatabase()") == "sync_tests"
    unbound.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.port}/", timeout=5) as response:
        assert response.read() == b"Ok.\n"


def test_command_creates_table_and_query_reads_it(client: Client) -> None:
    client.command("DROP TABLE IF EXISTS kinds")
    client.command(
        "CREATE TABLE kinds (id UInt32, kind LowCardinality(String), at DateTime64(3, 'UTC'), "
        "note Nullable(String), tags Array(String)) ENGINE = MergeTree ORDER BY id"
    )
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    client.insert(
        "kinds",
        [(1, "chat", at, None, ["a", "b"]), (2, "agent", at, "x\ty'z", [])],
        column_names=["id", "kind", "at", "note", "tags"],
    )
    result = client.query("SELECT id, kind, at, note, tags FROM kinds ORDER BY id")
    assert result.column_names == ("id", "kind", "at", "note", "tags")
    assert result.result_rows == [
        (1, "chat", at.replace(tzinfo=None), None, ["a", "b"]),
        (2, "agent", at.replace(tzinfo=None), "x\ty'z", []),
    ]
    # A result-producing command with no rows is "", a DDL command is a summary.
    assert client.command("SELECT id FROM kinds WHERE id > 100") == ""
    assert client.command("SELECT count() FROM kinds") == 2
    # Already-compressed raw data: the INSERT goes in the `query` URL parameter, the data in the body.
    tsv = b"3\tcsv\t2026-01-02 03:04:05.678\t\\N\t['q']\n"
    client.raw_insert("kinds", None, gzip.compress(tsv), fmt="TabSeparated", compression="gzip")
    assert client.query("SELECT kind, tags FROM kinds WHERE id = 3").result_rows == [("csv", ["q"])]


def test_server_side_and_client_side_parameters(client: Client) -> None:
    server_side = client.query(
        "SELECT {n:UInt32} + 1, {s:String}, {tags:Array(String)}, {at:DateTime64(3, 'UTC')}",
        parameters={
            "n": 41,
            "s": "tab\tquote' back\\slash",
            "tags": ["x", "y'"],
            "at": "2026-01-02 03:04:05.5",
        },
    )
    assert server_side.result_rows == [
        (42, "tab\tquote' back\\slash", ["x", "y'"], dt.datetime(2026, 1, 2, 3, 4, 5, 500000))
    ]
    client_side = client.query("SELECT %(n)s * 2, %(s)s", parameters={"n": 21, "s": "it's"})
    assert client_side.result_rows == [(42, "it's")]
    # Parameters longer than the URL budget go as multipart/form-data fields.
    long = "é" * 5000
    assert client.query("SELECT length({s:String})", parameters={"s": long}).result_rows == [(10000,)]


def test_settings_apply_to_one_query_only(client: Client) -> None:
    on = client.query(
        "SELECT getSetting('select_sequential_consistency')", settings={"select_sequential_consistency": 1}
    )
    assert on.result_rows == [(1,)]
    after = client.query("SELECT getSetting('select_sequential_consistency')")
    assert after.result_rows == [(0,)]
    assert client.command("SELECT getSetting('date_time_input_format')") == "best_effort"

    client.command("DROP TABLE IF EXISTS nulls")
    client.command("CREATE TABLE nulls (id UInt8, d Date) ENGINE = MergeTree ORDER BY id")
    epoch = dt.date(1970, 1, 1)
    client.raw_insert("nulls", ["id", "d"], b"1\t\\N\n", fmt="TabSeparated")  # null -> default
    with pytest.raises(DatabaseError) as refused:
        client.raw_insert(
            "nulls",
            ["id", "d"],
            b"2\t\\N\n",
            fmt="TabSeparated",
            settings={"input_format_null_as_default": 0},
        )
    assert refused.value.code == 38  # CANNOT_PARSE_DATE
    client.raw_insert("nulls", ["id", "d"], b"3\t\\N\n", fmt="TabSeparated")  # restored
    assert client.query("SELECT id, d FROM nulls ORDER BY id").result_rows == [(1, epoch), (3, epoch)]
    with pytest.raises(DatabaseError) as unknown:
        client.query("SELECT 1", settings={"no_such_setting_anywhere": 1})
    assert unknown.value.code == 115


@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip"])
def test_large_compressed_insert_keeps_every_row(sidecar: Sidecar, client: Client, compression: str) -> None:
    """Several blocks = several concatenated lz4/zstd frames: every row must arrive."""
    rows = 200_000  # two Native blocks of (UInt64, String) rows: two frames
    table = f"big_{compression}"
    client.command(f"DROP TABLE IF EXISTS {table}")
    client.command(f"CREATE TABLE {table} (id UInt64, label String) ENGINE = MergeTree ORDER BY id")
    writer = sidecar.client(database="sync_tests", compress=compression)
    writer.insert(
        table,
        [list(range(rows)), [f"label-{i % 97}" for i in range(rows)]],
        column_names=["id", "label"],
        column_oriented=True,
    )
    writer.close()
    count, total, distinct = client.query(f"SELECT count(), sum(id), uniqExact(id) FROM {table}").result_rows[
        0
    ]
    assert (count, total, distinct) == (rows, rows * (rows - 1) // 2, rows)


def test_async_client_insert_and_query(sidecar: Sidecar, client: Client) -> None:
    client.command("DROP TABLE IF EXISTS async_rows")
    client.command("CREATE TABLE async_rows (id UInt64, kind String) ENGINE = MergeTree ORDER BY id")

    async def run() -> tuple[Any, ...]:
        aclient = await clickhouse_connect.get_async_client(
            host="127.0.0.1", port=sidecar.port, username=USER, password=PASSWORD, database="sync_tests"
        )
        try:
            assert await aclient.ping()
            await aclient.insert(
                "async_rows",
                [list(range(150_000)), ["even" if i % 2 == 0 else "odd" for i in range(150_000)]],
                column_names=["id", "kind"],
                column_oriented=True,
            )
            result = await aclient.query(
                "SELECT count(), min(id), max(id) FROM async_rows WHERE kind = {k:String}",
                parameters={"k": "odd"},
            )
            return tuple(result.result_rows[0])
        finally:
            await aclient.close()

    assert asyncio.run(run()) == (75_000, 1, 149_999)


def test_concurrent_queries_keep_their_own_database_and_settings(sidecar: Sidecar, client: Client) -> None:
    client.command("CREATE DATABASE IF NOT EXISTS other_db")

    async def run() -> list[tuple[Any, ...]]:
        kwargs: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": sidecar.port,
            "username": USER,
            "password": PASSWORD,
        }
        clients = [
            await clickhouse_connect.get_async_client(database="sync_tests", **kwargs),
            await clickhouse_connect.get_async_client(database="other_db", **kwargs),
        ]
        try:
            results = await asyncio.gather(
                *(
                    clients[i % 2].query(
                        "SELECT currentDatabase(), getSetting('max_block_size')",
                        settings={"max_block_size": 1000 + i},
                    )
                    for i in range(24)
                )
            )
            return [tuple(result.result_rows[0]) for result in results]
        finally:
            for aclient in clients:
                await aclient.close()

    expected = [("sync_tests" if i % 2 == 0 else "other_db", 1000 + i) for i in range(24)]
    assert asyncio.run(run()) == expected


def test_query_error_carries_clickhouse_code(client: Client) -> None:
    with pytest.raises(DatabaseError) as syntax:
        client.query("SELEC 1")
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError) as missing:
        client.query("SELECT * FROM no_such_table")
    assert missing.value.code == 60
    assert "UNKNOWN_TABLE" in str(missing.value)
    # The server keeps serving after errors.
    assert client.command("SELECT 7") == 7


def test_wrong_password_is_refused(sidecar: Sidecar) -> None:
    with pytest.raises(DatabaseError) as refused:
        sidecar.client(password="wrong")
    assert refused.value.code == 516
    request = urllib.request.Request(f"http://127.0.0.1:{sidecar.port}/", data=b"SELECT 1", method="POST")
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(request, timeout=5)
    assert anonymous.value.code == 401
    assert anonymous.value.headers["X-ClickHouse-Exception-Code"] == "516"
    # The same credentials as headers or URL parameters are accepted, like ClickHouse.
    headers = {"X-ClickHouse-User": USER, "X-ClickHouse-Key": PASSWORD}
    request = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.port}/", data=b"SELECT 40 + 2", headers=headers
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.read() == b"42\n"
        assert response.headers["X-ClickHouse-Format"] == "TabSeparated"
        assert json.loads(response.headers["X-ClickHouse-Summary"])["read_rows"] == "1"


def test_apply_schema_is_idempotent_and_sessions_v1_dedups(sidecar: Sidecar, client: Client) -> None:
    async def run() -> None:
        aclient = await connect_clickhouse(sidecar.url("schema_tests"))
        try:
            await ping_clickhouse(aclient)
            first = await apply_clickhouse_schema(aclient, sql_dir("clickhouse_schema"))
            second = await apply_clickhouse_schema(aclient, sql_dir("clickhouse_schema"))
            assert first == second
            assert "001_sessions_v1.sql" in first
            engine = await aclient.command(
                "SELECT engine_full FROM system.tables WHERE database = 'schema_tests' AND name = 'sessions_v1'"
            )
            assert str(engine).startswith("ReplacingMergeTree(_version, _is_deleted)")

            columns = ["environment_id", "session_id", "type", "tags", "created_at", "updated_at"]
            columns += ["last_active_at", "closed_at", "_version", "_is_deleted"]
            created = dt.datetime(2026, 3, 1, tzinfo=UTC)
            later = created + dt.timedelta(minutes=5)

            def row(
                sid: str, tags: list[str], version: int, closed: dt.datetime | None, deleted: int
            ) -> list[Any]:
                return ["env_1", sid, "chat", tags, created, created, created, closed, version, deleted]

            # Separate inserts = separate parts, so FINAL has to do the work; stop background
            # merges so that they cannot collapse the parts before the raw count below.
            await aclient.command("SYSTEM STOP MERGES sessions_v1")
            await aclient.insert("sessions_v1", [row("s1", ["a"], 10, None, 0)], column_names=columns)
            await aclient.insert("sessions_v1", [row("s2", ["b"], 11, None, 0)], column_names=columns)
            await aclient.insert("sessions_v1", [row("s3", ["a", "c"], 12, None, 0)], column_names=columns)
            await aclient.insert("sessions_v1", [row("s1", ["a", "z"], 20, later, 0)], column_names=columns)
            await aclient.insert("sessions_v1", [row("s2", ["b"], 21, None, 1)], column_names=columns)
            await aclient.insert("sessions_v1", [row("s3", ["stale"], 5, None, 0)], column_names=columns)

            raw = await aclient.query("SELECT count() FROM sessions_v1")
            assert raw.result_rows == [(6,)]
            final = await aclient.query(
                "SELECT session_id, tags, closed_at IS NOT NULL FROM sessions_v1 FINAL "
                "WHERE environment_id = {env:String} ORDER BY session_id",
                parameters={"env": "env_1"},
            )
            assert final.result_rows == [("s1", ["a", "z"], True), ("s3", ["a", "c"], False)]
            tagged = await aclient.query(
                "SELECT session_id FROM sessions_v1 FINAL WHERE hasAny(tags, {tags:Array(String)})",
                parameters={"tags": ["c"]},
            )
            assert tagged.result_rows == [("s3",)]
        finally:
            await aclient.close()

    asyncio.run(run())
    assert client.command("EXISTS TABLE schema_tests.sessions_v1") == 1


def test_connect_clickhouse_to_closed_port_is_unavailable() -> None:
    url = f"http://default:@127.0.0.1:{_free_port()}/threadline"
    with pytest.raises(ClickHouseUnavailable):
        asyncio.run(connect_clickhouse(url, connect_timeout=2))


def test_sigterm_finishes_in_flight_query_and_exits_zero(tmp_path: Path) -> None:
    sidecar = _start(tmp_path)
    try:
        idle = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=15)
        idle.request("GET", "/ping")  # HTTP/1.1: the connection stays open, idle, after this
        assert idle.getresponse().read() == b"Ok.\n"
        slow = sidecar.client()
        result: list[Any] = []
        query = threading.Thread(
            target=lambda: result.append(slow.command("SELECT sum(sleepEachRow(0.5)) + 5 FROM numbers(3)"))
        )
        query.start()
        time.sleep(0.5)  # let the query reach the server
        sidecar.process.send_signal(signal.SIGTERM)
        query.join(timeout=15)
        assert result == [5]
        assert sidecar.process.wait(timeout=15) == 0
        idle.close()
        events = [json.loads(line)["event"] for line in sidecar.log.read_text().splitlines()]
        assert events[0] == "start"
        assert events[-1] == "stop"
    finally:
        _stop(sidecar)


def test_request_body_decoding() -> None:
    first, second = b"INSERT INTO t FORMAT Native\n" + bytes(range(256)) * 50, bytes(range(255, -1, -1)) * 70
    assert decode_body(lz4.frame.compress(first) + lz4.frame.compress(second), "lz4") == first + second
    zstd = zstandard.ZstdCompressor()
    assert decode_body(zstd.compress(first) + zstd.compress(second), "zstd") == first + second
    with pytest.raises(ClickHouseHTTPError) as unknown:
        decode_body(b"abc", "br")
    assert unknown.value.status == 400
    with pytest.raises(ClickHouseHTTPError) as corrupt:
        decode_body(b"not lz4 at all", "lz4")
    assert corrupt.value.code == 271


def test_split_insert_finds_the_data() -> None:
    assert split_insert(b"INSERT INTO t (a, `format`) FORMAT Native\n\x00\n\n") == (
        "INSERT INTO t (a, `format`)",
        "Native",
        b"\x00\n\n",
    )
    assert split_insert(b"INSERT INTO t SETTINGS x = 'FORMAT CSV' FORMAT TSV 1\t2\n") == (
        "INSERT INTO t SETTINGS x = 'FORMAT CSV'",
        "TSV",
        b"1\t2\n",
    )
    assert split_insert(b"INSERT INTO t VALUES (1, 'FORMAT Native')") is None
    assert split_insert(b"INSERT INTO t SELECT * FROM u") is None


def test_split_statements_skips_comments() -> None:
    sql = "-- header\n\nCREATE TABLE a (x UInt8) ENGINE = Log;\n-- only a comment;\n\nSELECT ';' ;  \n"
    assert split_statements(sql) == ["-- header\n\nCREATE TABLE a (x UInt8) ENGINE = Log", "SELECT ';'"]
