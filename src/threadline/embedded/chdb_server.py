"""A ClickHouse HTTP interface in front of one in-process chDB session.

chDB is the real ClickHouse engine as a library, but it has no server, and it allows one process
per data path. Several Threadline server instances plus the replication consumer must share one
ClickHouse, so the embedded stack runs this sidecar: it owns the data path and serves the subset of
the ClickHouse HTTP interface that clickhouse-connect's HTTP clients (sync and async) use. Every
Threadline process then talks to ClickHouse over the same HTTP code path as in production.

Run it as::

    THREADLINE_CHDB_PASSWORD=... python -m threadline.embedded.chdb_server \\
        --path DIR --host 127.0.0.1 --port 8123 --user default

What it serves:

- ``GET /ping`` and ``GET /``: ``Ok.`` (no auth, like ClickHouse).
- ``POST /`` (or ``GET /?query=``): the SQL is the body, or the ``query`` URL parameter followed
  by a newline and the body (insert data follows the query). ``Content-Encoding`` lz4, zstd, gzip
  and deflate request bodies are decoded, including lz4/zstd bodies made of several frames.
  ``multipart/form-data`` bodies (clickhouse-connect's form encoding for long parameters) carry
  ``query`` and ``param_<name>`` fields.
- URL parameters ``database``, ``param_<name>``, ``query_id``, ``default_format`` and ClickHouse
  settings, which apply to that one query. Responses are never compressed.

Known differences from a ClickHouse server: one shared engine session, so a ``SET`` statement sent
by a client changes the session for every client (Threadline never sends one; use per-query
settings); ``session_id`` is accepted and ignored; no ``readonly`` enforcement for GET; external
data and ClickHouse-native (``compress``/``decompress``) compression are refused.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gzip
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol, cast
from urllib.parse import parse_qsl

import lz4.frame
import zstandard

__all__ = ["PASSWORD_ENV", "ChdbEngine", "ChdbHTTPServer", "ClickHouseHTTPError", "decode_body", "main"]

PASSWORD_ENV: Final = "THREADLINE_CHDB_PASSWORD"
"""The password comes from the environment, never argv: argv shows in ``ps``."""

logger = logging.getLogger("threadline.chdb_server")

# ClickHouse error codes used by the HTTP layer itself.
_STD_EXCEPTION: Final = 1001
_BAD_ARGUMENTS: Final = 36
_NOT_IMPLEMENTED: Final = 48
_SYNTAX_ERROR: Final = 62
_UNKNOWN_FORMAT: Final = 73
_UNKNOWN_SETTING: Final = 115
_CANNOT_DECOMPRESS: Final = 271
_AUTHENTICATION_FAILED: Final = 516

# URL parameters that steer the HTTP transport, not the query. ClickHouse knows some of them as
# settings, but they have no effect on an in-process engine, so they are not SET (which saves two
# engine calls per request: clickhouse-connect sends several of them on every request).
_TRANSPORT_PARAMS: Final = frozenset(
    [
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "user",
        "password",
        "quota_key",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        "http_native_compression_disable_checksumming_on_decompress",
        "add_http_cors_header",
    ]
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Whitespace, comments and opening parentheses before a statement's first keyword.
_LEADING_NOISE = re.compile(rb"(?:\s+|--[^\n]*|#[^\n]*|/\*.*?\*/|\()*", re.DOTALL)
_KEYWORD = re.compile(rb"[A-Za-z]+")
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
# Statements that produce a result set; only their responses carry X-ClickHouse-Format, which is
# how clickhouse-connect's command() tells "empty result" from "no result".
_RESULT_KEYWORDS: Final = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK"}
)
# Format names that chDB's Python wrapper turns into Python objects instead of bytes.
_WRAPPER_FORMATS: Final = frozenset({"arrowtable", "dataframe", "datastore", "debug"})
_CONTENT_TYPES: Final = {
    "native": "application/octet-stream",
    "rowbinary": "application/octet-stream",
    "arrow": "application/octet-stream",
    "arrowstream": "application/octet-stream",
    "parquet": "application/octet-stream",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
}


class ClickHouseHTTPError(Exception):
    """An error answered the way ClickHouse does: a status, an exception code and a text body."""

    def __init__(self, code: int, message: str, *, status: int = 500, name: str | None = None) -> None:
        text = message if message.startswith("Code: ") else f"Code: {code}. DB::Exception: {message}"
        if name and not text.rstrip().endswith(")"):
            text = f"{text}. ({name})"
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseHTTPError:
        """chDB's messages already read ``Code: N. DB::Exception: ...``; keep them, parse the code."""
        message = str(exc).strip()
        start = message.find("Code: ")
        if start > 0:
            message = message[start:]
        match = _ERROR_CODE.match(message)
        if match is None:
            return cls(_STD_EXCEPTION, message or type(exc).__name__, name="STD_EXCEPTION")
        return cls(int(match.group(1)), message)


# ---------------------------------------------------------------------------------------------
# Request bodies


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


def _decompress_frames(data: bytes, new: Callable[[], _Decompressor]) -> bytes:
    """Decode every frame of ``data``, not just the first.

    clickhouse-connect compresses each insert block as its own lz4 (or zstd) frame and sends them
    back to back; a one-shot decompress stops after the first frame and silently drops the rest.
    """
    parts: list[bytes] = []
    while data:
        decompressor = new()
        parts.append(decompressor.decompress(data))
        if not decompressor.eof:
            raise ValueError("truncated compressed frame")
        data = decompressor.unused_data
    return b"".join(parts)


def decode_body(data: bytes, encoding: str | None) -> bytes:
    """Undo the request's ``Content-Encoding`` (lz4, zstd, gzip, deflate or identity)."""
    name = (encoding or "").strip().lower()
    if name in ("", "identity", "none") or not data:
        return data
    try:
        if name == "lz4":
            return _decompress_frames(data, lambda: cast(_Decompressor, lz4.frame.LZ4FrameDecompressor()))
        if name == "zstd":
            zstd = zstandard.ZstdDecompressor()
            return _decompress_frames(data, lambda: cast(_Decompressor, zstd.decompressobj()))
        if name in ("gzip", "x-gzip"):
            return gzip.decompress(data)
        if name == "deflate":
            return _decompress_frames(data, lambda: cast(_Decompressor, zlib.decompressobj()))
    except (ValueError, RuntimeError, EOFError, OSError, zlib.error, zstandard.ZstdError) as exc:
        raise ClickHouseHTTPError(
            _CANNOT_DECOMPRESS,
            f"Cannot decode {name} request body: {exc}",
            status=400,
            name="CANNOT_DECOMPRESS",
        ) from exc
    raise ClickHouseHTTPError(
        _BAD_ARGUMENTS,
        f"Unknown Content-Encoding '{name}'. Supported: lz4, zstd, gzip, deflate",
        status=400,
        name="BAD_ARGUMENTS",
    )


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a ``multipart/form-data`` body (external-data files are refused)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message: EmailMessage = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ClickHouseHTTPError(_BAD_ARGUMENTS, "Malformed multipart/form-data body", status=400)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            raise ClickHouseHTTPError(
                _NOT_IMPLEMENTED, "External data is not supported", status=501, name="NOT_IMPLEMENTED"
            )
        payload = part.get_payload(decode=True)
        fields[name] = payload.decode() if isinstance(payload, bytes) else str(payload or "")
    return fields


# ---------------------------------------------------------------------------------------------
# SQL helpers


def statement_keyword(sql: bytes) -> str:
    """The statement's first keyword, upper-cased (``""`` if there is none)."""
    head = sql[:4096]
    start = _LEADING_NOISE.match(head)
    match = _KEYWORD.match(head, start.end() if start else 0)
    return match.group(0).decode("ascii").upper() if match else ""


_WORD_BYTES: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _skip_quoted(sql: bytes, start: int) -> int:
    """The index after the quoted literal or identifier that starts at ``start``."""
    quote, i = sql[start], start + 1
    while i < len(sql):
        if sql[i] == 0x5C:  # backslash escape
            i += 2
        elif sql[i] == quote:
            if sql[i + 1 : i + 2] != bytes([quote]):  # a doubled quote is an escaped quote
                return i + 1
            i += 2
        else:
            i += 1
    return i


def _word_end(sql: bytes, start: int) -> int:
    end = start
    while end < len(sql) and sql[end] in _WORD_BYTES:
        end += 1
    return end


def split_insert(sql: bytes) -> tuple[str, str, bytes] | None:
    """Split ``INSERT ... FORMAT <name> <data>`` into the statement, the format and the data.

    chDB's query() cannot take binary data inline (a Native body is cut short), so inserts with a
    FORMAT clause go through its streaming inserter instead. Like ClickHouse, the data starts after
    the format name, its trailing blanks and at most one newline. ``None`` when there is no FORMAT
    clause (``VALUES`` or ``SELECT`` inserts run as ordinary queries).
    """
    i, size = 0, len(sql)
    while i < size:
        char = sql[i]
        if char in b"'\"`":
            i = _skip_quoted(sql, i)
        elif sql.startswith(b"--", i) or char == 0x23:  # "--" or "#" comment
            newline = sql.find(b"\n", i)
            i = size if newline < 0 else newline + 1
        elif sql.startswith(b"/*", i):
            close = sql.find(b"*/", i + 2)
            i = size if close < 0 else close + 2
        elif char in _WORD_BYTES:
            end = _word_end(sql, i)
            word = sql[i:end].upper()
            if word == b"VALUES":
                return None
            if word == b"FORMAT":
                name_start = end
                while name_start < size and sql[name_start] in b" \t\r\n\f":
                    name_start += 1
                name_end = _word_end(sql, name_start)
                name = sql[name_start:name_end]
                # `INSERT INTO format FORMAT ...`: an unquoted table called "format"
                if name_start > end and name and name.upper() != b"FORMAT":
                    data = name_end
                    while data < size and sql[data] in b" \t\f":
                        data += 1
                    if sql.startswith(b"\r\n", data):
                        data += 2
                    elif data < size and sql[data] in b"\r\n":
                        data += 1
                    return sql[:i].decode().rstrip(), name.decode(), sql[data:]
            i = end
        else:
            i += 1
    return None


def _output_format(sql: bytes, default: str) -> str:
    """The format the response is in: the SQL's trailing ``FORMAT`` clause, else the default."""
    tail = sql[-256:].decode("utf-8", errors="replace")
    match = _TRAILING_FORMAT.search(tail)
    return match.group(1) if match else default


def _quote(value: str) -> str:
    """A ClickHouse string literal; quoted values are coerced to the setting's type."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _check_identifier(kind: str, name: str, code: int) -> str:
    if not _IDENTIFIER.match(name):
        raise ClickHouseHTTPError(code, f"Invalid {kind} name {name!r}", status=400)
    return name


# ---------------------------------------------------------------------------------------------
# Engine


@dataclass(frozen=True, slots=True)
class QueryOutput:
    data: bytes
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    elapsed_ns: int = 0


def _stat(result: Any, name: str) -> int:
    try:
        return int(getattr(result, name)())
    except Exception:
        return 0


class ChdbEngine:
    """One chDB session for the process, and the per-query state applied to it.

    ClickHouse runs each HTTP query in a fresh context; here every query shares one session, so the
    request's database (``USE``) and settings (``SET``, then restored) are applied around the query
    under one lock. The lock costs no parallelism: chDB serializes calls on a connection anyway.
    """

    def __init__(self, path: Path) -> None:
        # `import chdb` chdirs into its package while loading; callers pass an absolute path.
        from chdb.session import Session  # deferred: importing chDB takes ~2 s and loads the engine

        self.path = path
        self._lock = threading.Lock()
        self._session: Any = Session(str(path))  # type: ignore[no-untyped-call]
        self._database: str | None = None  # None: unknown, run USE before the next query
        # The session's settings as (value, changed), read once and again after a client's SET.
        self._baseline: dict[str, tuple[str, bool]] | None = None
        self.version = self._scalar("SELECT version()")

    def _scalar(self, sql: str) -> str:
        with self._lock:
            return bytes(self._session.query(sql, "TabSeparated").bytes()).decode().strip()

    def close(self) -> None:
        """Close the chDB session; frees the data path's lock for the next process."""
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def execute(
        self,
        sql: bytes,
        *,
        fmt: str,
        database: str,
        params: Mapping[str, str],
        settings: Mapping[str, str],
    ) -> QueryOutput:
        """Run one statement with its database and settings, returning the raw output bytes."""
        keyword = statement_keyword(sql)
        insert = split_insert(sql) if keyword == "INSERT" else None
        with self._lock:
            if self._session is None:
                raise ClickHouseHTTPError(_STD_EXCEPTION, "The server is shutting down", status=503)
            self._use(database)
            undo: list[tuple[str, str]] = []
            try:
                self._apply_settings(settings, undo)
                if insert is not None:
                    return self._insert(*insert)
                result = self._call(sql, fmt, dict(params))
                return QueryOutput(
                    data=bytes(result.bytes() or b""),
                    read_rows=_stat(result, "rows_read"),
                    read_bytes=_stat(result, "bytes_read"),
                    written_rows=_stat(result, "rows_written"),
                    written_bytes=_stat(result, "bytes_written"),
                    elapsed_ns=int(float(result.elapsed()) * 1e9),
                )
            finally:
                self._restore_settings(undo)
                if keyword == "SET":
                    self._baseline = None
                elif keyword == "USE":
                    self._database = None

    def _insert(self, statement: str, fmt: str, data: bytes) -> QueryOutput:
        try:
            with self._session.send_insert(statement, fmt) as inserter:
                if data:
                    inserter.append(data)
                result = inserter.finish()
        except RuntimeError as exc:
            raise ClickHouseHTTPError.from_engine(exc) from exc
        return QueryOutput(
            data=b"",
            written_rows=int(result.rows_written),
            written_bytes=int(result.bytes_written),
            elapsed_ns=int(float(result.elapsed) * 1e9),
        )

    def _call(self, sql: bytes | str, fmt: str, params: dict[str, str] | None = None) -> Any:
        try:
            return self._session.query(sql, fmt, params=params or {})
        except RuntimeError as exc:  # chdb.ChdbError is a RuntimeError
            raise ClickHouseHTTPError.from_engine(exc) from exc

    def _use(self, database: str) -> None:
        if database != self._database:
            self._call(f"USE `{database}`", "TabSeparated")
            self._database = database

    def _load_baseline(self) -> dict[str, tuple[str, bool]]:
        if self._baseline is None:
            rows = self._call("SELECT name, value, changed FROM system.settings", "JSONEachRow")
            baseline: dict[str, tuple[str, bool]] = {}
            for line in bytes(rows.bytes()).splitlines():
                row = json.loads(line)
                baseline[row["name"]] = (row["value"], bool(row["changed"]))
            self._baseline = baseline
        return self._baseline

    def _apply_settings(self, settings: Mapping[str, str], undo: list[tuple[str, str]]) -> None:
        """SET each setting that differs from the session, recording how to put it back."""
        if not settings:
            return
        baseline = self._load_baseline()
        for name, value in settings.items():
            _check_identifier("setting", name, _UNKNOWN_SETTING)
            current = baseline.get(name)
            if current is not None and current[0] == value:
                continue
            self._call(f"SET {name} = {_quote(value)}", "TabSeparated")
            if current is None or not current[1]:
                undo.append((name, "DEFAULT"))
            else:
                # system.settings shows expression values (e.g. 'auto(4)') already quoted.
                literal = (
                    current[0] if len(current[0]) > 1 and current[0][0] == current[0][-1] == "'" else None
                )
                undo.append((name, literal or _quote(current[0])))

    def _restore_settings(self, undo: list[tuple[str, str]]) -> None:
        for name, literal in undo:
            try:
                self._call(f"SET {name} = {literal}", "TabSeparated")
            except ClickHouseHTTPError as exc:
                self._baseline = None
                logger.error("setting_restore_failed", extra={"fields": {"setting": name, "error": exc.text}})


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass(slots=True)
class _QueryRequest:
    sql: bytes
    database: str
    default_format: str
    params: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


def _parse_query_request(url_params: Mapping[str, str], body: bytes, content_type: str) -> _QueryRequest:
    """Split URL parameters (and form fields) into the SQL, query parameters and settings."""
    values = dict(url_params)
    if content_type.lower().startswith("multipart/form-data"):
        values.update(_form_fields(content_type, body))
        body = b""
    query = values.get("query", "").encode()
    # ClickHouse semantics: the body (insert data, or more SQL) follows the query parameter.
    sql = b"\n".join(part for part in (query, body) if part)
    if not sql.strip():
        raise ClickHouseHTTPError(_SYNTAX_ERROR, "Empty query", status=400, name="SYNTAX_ERROR")
    for flag in ("compress", "decompress"):
        if values.get(flag, "0") not in ("", "0", "false"):
            raise ClickHouseHTTPError(
                _NOT_IMPLEMENTED,
                f"'{flag}' (ClickHouse native compression) is not supported; use Content-Encoding",
                status=501,
                name="NOT_IMPLEMENTED",
            )
    default_format = values.get("default_format") or "TabSeparated"
    if not _IDENTIFIER.match(default_format) or default_format.lower() in _WRAPPER_FORMATS:
        raise ClickHouseHTTPError(_UNKNOWN_FORMAT, f"Unknown format {default_format}", status=400)
    database = _check_identifier("database", values.get("database") or "default", _BAD_ARGUMENTS)
    request = _QueryRequest(sql=sql, database=database, default_format=default_format)
    for name, value in values.items():
        if name.startswith("param_"):
            request.params[name[len("param_") :]] = value
        elif name not in _TRANSPORT_PARAMS:
            request.settings[name] = value
    return request


class ChdbHTTPServer(ThreadingHTTPServer):
    """A thread per connection; tracks idle keep-alive connections so shutdown can close them."""

    # Non-daemon threads, so server_close() waits for them (daemon threads are not joined): the
    # in-flight requests finish, and idle keep-alive connections are closed first so they cannot
    # hold shutdown up.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        engine: ChdbEngine,
        *,
        user: str,
        password: str,
        display_name: str | None = None,
    ) -> None:
        super().__init__(address, _Handler)
        self.engine = engine
        self.user = user
        self.password = password
        self.display_name = display_name or socket.gethostname()
        self.stopping = False
        self._connections_lock = threading.Lock()
        self._idle: set[socket.socket] = set()

    def mark_idle(self, connection: socket.socket) -> bool:
        """Called before waiting for the next request; False once shutdown has begun."""
        with self._connections_lock:
            if self.stopping:
                return False
            self._idle.add(connection)
            return True

    def mark_busy(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._idle.discard(connection)

    def close_idle_connections(self) -> None:
        """Stop keep-alive: idle connections are closed, busy ones close after their response."""
        with self._connections_lock:
            self.stopping = True
            idle, self._idle = self._idle, set()
        for connection in idle:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One JSON line instead of socketserver's traceback on stderr (e.g. a client hung up)."""
        exc = sys.exc_info()[1]
        logger.warning(
            "connection_error", extra={"fields": {"client": str(client_address), "error": repr(exc)}}
        )

    def check_credentials(self, user: str, password: str) -> bool:
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return user_ok & password_ok


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "threadline-chdb"
    # Headers and body are separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    # Socket timeout: drops connections idle this long, and bounds a client that stalls mid-body
    # (which would otherwise hold shutdown up). Longer than clients' keep-alive (aiohttp: 30 s).
    timeout = 300

    @property
    def _server(self) -> ChdbHTTPServer:
        return cast(ChdbHTTPServer, self.server)

    # -- connection lifecycle -----------------------------------------------------------------

    def handle_one_request(self) -> None:
        if not self._server.mark_idle(self.connection):
            self.close_connection = True
            return
        try:
            super().handle_one_request()
        finally:
            self._server.mark_busy(self.connection)

    def parse_request(self) -> bool:
        self._server.mark_busy(self.connection)
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        """Per-request access logs are off; errors are logged where they are answered."""

    def log_error(self, format: str, *args: Any) -> None:
        logger.warning("http_error", extra={"fields": {"detail": format % args}})

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path, _, query_string = self.path.partition("?")
        params = dict(parse_qsl(query_string, keep_blank_values=True))
        if path == "/ping" or (path == "/" and "query" not in params):
            self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
        elif path == "/":
            self._query(params)
        else:
            self._send_error(ClickHouseHTTPError(_BAD_ARGUMENTS, f"Unknown path {path}", status=404))

    def do_POST(self) -> None:
        path, _, query_string = self.path.partition("?")
        params = dict(parse_qsl(query_string, keep_blank_values=True))
        if path == "/":
            self._query(params)
        else:
            self._read_body()  # keep the connection in step before answering
            self._send_error(ClickHouseHTTPError(_BAD_ARGUMENTS, f"Unknown path {path}", status=404))

    # -- queries --------------------------------------------------------------------------------

    def _query(self, params: dict[str, str]) -> None:
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            # Read the whole body before answering anything, even a refusal: a client still
            # streaming its insert would otherwise see a reset connection instead of the error.
            raw = self._read_body()
            self._authenticate(params)
            body = decode_body(raw, self.headers.get("Content-Encoding"))
            request = _parse_query_request(params, body, self.headers.get("Content-Type", ""))
            output = self._server.engine.execute(
                request.sql,
                fmt=request.default_format,
                database=request.database,
                params=request.params,
                settings=request.settings,
            )
        except ClickHouseHTTPError as exc:
            logger.warning(
                "query_failed",
                extra={"fields": {"query_id": query_id, "code": exc.code, "error": exc.text[:500]}},
            )
            self._send_error(exc, query_id)
            return
        except Exception as exc:
            logger.exception("query_crashed", extra={"fields": {"query_id": query_id}})
            self._send_error(ClickHouseHTTPError.from_engine(exc), query_id)
            return
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps(
                {
                    "read_rows": str(output.read_rows),
                    "read_bytes": str(output.read_bytes),
                    "written_rows": str(output.written_rows),
                    "written_bytes": str(output.written_bytes),
                    "total_rows_to_read": "0",
                    "result_rows": "0",
                    "result_bytes": str(len(output.data)),
                    "elapsed_ns": str(output.elapsed_ns),
                },
                separators=(",", ":"),
            ),
        }
        if statement_keyword(request.sql) in _RESULT_KEYWORDS:
            fmt = _output_format(request.sql, request.default_format)
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = _CONTENT_TYPES.get(fmt.lower(), "text/plain; charset=UTF-8")
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        self._send(200, output.data, headers)

    def _authenticate(self, params: Mapping[str, str]) -> None:
        """Basic auth, X-ClickHouse-User/Key headers or user/password URL params, like ClickHouse."""
        user, password = "default", ""
        authorization = self.headers.get("Authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                self._refuse(user, "unsupported authorization scheme")
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                self._refuse(user, "malformed Basic credentials")
        elif self.headers.get("X-ClickHouse-User") is not None:
            user = self.headers.get("X-ClickHouse-User", "")
            password = self.headers.get("X-ClickHouse-Key", "")
        elif "user" in params:
            user, password = params["user"], params.get("password", "")
        if not self._server.check_credentials(user, password):
            self._refuse(user, "password is incorrect, or there is no user with such name")

    def _refuse(self, user: str, reason: str) -> None:
        raise ClickHouseHTTPError(
            _AUTHENTICATION_FAILED,
            f"{user}: Authentication failed: {reason}",
            status=401,
            name="AUTHENTICATION_FAILED",
        )

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise ClickHouseHTTPError(_BAD_ARGUMENTS, f"Invalid Content-Length {length!r}", status=400)
        data = self.rfile.read(size)
        if len(data) != size:
            self.close_connection = True
            raise ClickHouseHTTPError(_BAD_ARGUMENTS, "Request body ended early", status=400)
        return data

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ClickHouseHTTPError(_BAD_ARGUMENTS, "Malformed chunked body", status=400) from None
            if size == 0:
                break
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                self.close_connection = True
                raise ClickHouseHTTPError(_BAD_ARGUMENTS, "Request body ended early", status=400)
            chunks.append(chunk)
            self.rfile.readline(1024)  # the CRLF after each chunk
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    # -- responses ------------------------------------------------------------------------------

    def _send_error(self, exc: ClickHouseHTTPError, query_id: str | None = None) -> None:
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(exc.code),
        }
        if query_id:
            headers["X-ClickHouse-Query-Id"] = query_id
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="ClickHouse server"'
        self._send(exc.status, exc.text.rstrip("\n").encode() + b"\n", headers)

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        if self._server.stopping:
            self.close_connection = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("X-ClickHouse-Server-Display-Name", self._server.display_name)
        self.send_header("X-ClickHouse-Timezone", "UTC")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


# ---------------------------------------------------------------------------------------------
# Process


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m threadline.embedded.chdb_server",
        description=f"ClickHouse HTTP interface over chDB. The password is read from ${PASSWORD_ENV}.",
    )
    parser.add_argument("--path", required=True, help="chDB data directory (one process per path)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123, help="0 picks a free port (logged at start)")
    parser.add_argument("--user", default="default")
    return parser.parse_args(argv)


_STOP_POLL_SECONDS = 0.2
# A graceful stop finishes in-flight queries and closes chDB; past this bound the process exits
# hard. The mirror is rebuilt from Postgres, so a lost in-flight insert costs a re-read, while
# a sidecar that never exits outlives its launcher and holds the data directory's lock.
_STOP_GRACE_SECONDS = 15.0


def _exit_if_stop_hangs() -> None:
    """Arm a daemon timer that ends the process if the graceful stop outlasts its bound."""

    def force() -> None:
        logger.error("stop_forced", extra={"fields": {"pid": os.getpid(), "grace_s": _STOP_GRACE_SECONDS}})
        os._exit(1)

    timer = threading.Timer(_STOP_GRACE_SECONDS, force)
    timer.daemon = True
    timer.start()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests, close chDB and exit 0."""
    args = _parse_args(argv)
    _configure_logging()
    path = Path(args.path).expanduser().resolve()  # absolute before chDB is imported
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def install_signal_handlers() -> None:
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    install_signal_handlers()
    try:
        path.mkdir(parents=True, exist_ok=True)
        engine = ChdbEngine(path)
    except Exception as exc:
        logger.error("start_failed", extra={"fields": {"path": str(path), "error": str(exc).strip()}})
        return 1
    install_signal_handlers()  # again: keep ours even if the engine installed its own
    try:
        server = ChdbHTTPServer(
            (args.host, args.port),
            engine,
            user=args.user,
            password=os.environ.get(PASSWORD_ENV, ""),
        )
    except OSError as exc:
        logger.error(
            "start_failed", extra={"fields": {"host": args.host, "port": args.port, "error": str(exc)}}
        )
        engine.close()
        return 1
    serving = threading.Thread(target=server.serve_forever, name="chdb-http", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    logger.info(
        "start",
        extra={
            "fields": {
                "host": host,
                "port": port,
                "path": str(path),
                "pid": os.getpid(),
                "version": engine.version,
            }
        },
    )
    # Poll rather than block: a process-directed signal (the parent-death SIGTERM) may be
    # delivered to any of chDB's or the HTTP server's threads, and then a main thread blocked
    # without a timeout would never run the Python-level handler.
    while not stop.wait(timeout=_STOP_POLL_SECONDS):
        pass
    _exit_if_stop_hangs()
    server.shutdown()  # stop accepting
    server.close_idle_connections()
    server.server_close()  # waits for in-flight requests
    engine.close()
    logger.info("stop", extra={"fields": {"pid": os.getpid()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
