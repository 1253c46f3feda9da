"""The client side of the ``threadline`` command: sessions, tail, append and streams over HTTP.

Needs only the SDK (``pip install threadline``). ``--url`` / ``--api-key`` default to
``THREADLINE_URL`` / ``THREADLINE_API_KEY``. Tables for people (coloured on a terminal), ``--json``
(or ``--format json``) for scripts: one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TextIO

from threadline.client._channels import Channel
from threadline.client._client import Threadline
from threadline.client._errors import ClientError
from threadline.client._models import Record, Session
from threadline.errors import ApiError, Conflict, Forbidden, NotFound, ThreadlineError, Unauthorized

__all__ = ["CLIENT_COMMANDS", "add_client_commands", "run_client_command"]

CLIENT_COMMANDS = frozenset({"sessions", "tail", "append", "streams"})

_STATUS_COLOURS = {"ACTIVE": "32", "CLOSED": "90", "EXPIRED": "33"}


def add_client_commands(commands: Any) -> None:
    """Register the client commands on the ``threadline`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help="server URL (default $THREADLINE_URL or http://127.0.0.1:8080)"
    )
    common.add_argument("--api-key", default=None, help="secret key or token (default $THREADLINE_API_KEY)")
    common.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    common.add_argument(
        "--json", dest="format", action="store_const", const="json", help="same as --format json"
    )

    sessions = commands.add_parser("sessions", help="create, inspect, list and close sessions (over HTTP)")
    verbs = sessions.add_subparsers(dest="sessions_command", required=True)
    create = verbs.add_parser("create", parents=[common], help="create a session")
    create.add_argument("type")
    create.add_argument("--external-id")
    create.add_argument("--task", dest="task_identifier")
    create.add_argument("--tag", dest="tags", action="append")
    create.add_argument("--metadata", type=json.loads, help="a JSON object")
    create.add_argument("--expires-at", help="ISO 8601 with a time zone")
    for verb in ("get", "close", "token"):
        parser = verbs.add_parser(verb, parents=[common], help=f"{verb} a session by id or externalId")
        parser.add_argument("session")
        if verb == "close":
            parser.add_argument("--reason")
        if verb == "token":
            parser.add_argument("--ttl", type=int, default=None, help="lifetime in seconds (60 to 86400)")
            parser.add_argument("--scope", dest="scopes", action="append", choices=["read", "write"])
    for verb in ("list", "count"):
        parser = verbs.add_parser(
            verb, parents=[common], help=f"{verb} sessions (filters: any of the values)"
        )
        parser.add_argument("--type", action="append")
        parser.add_argument("--tag", dest="tags", action="append")
        parser.add_argument("--task", dest="task_identifier", action="append")
        parser.add_argument("--external-id", action="append")
        parser.add_argument("--status", action="append", choices=["ACTIVE", "CLOSED", "EXPIRED"])
        parser.add_argument("--period", help="created within: 30m, 12h, 7d, 2w")
        if verb == "list":
            parser.add_argument(
                "--sort",
                default="-createdAt",
                choices=["-createdAt", "createdAt", "-lastActiveAt", "lastActiveAt"],
            )
            parser.add_argument("--limit", type=int, default=50, help="at most this many (0: all)")

    tail = commands.add_parser("tail", parents=[common], help="print a session channel's records")
    tail.add_argument("session")
    tail.add_argument("io", nargs="?", choices=["out", "in"], default=None)
    _add_read_args(tail)

    append = commands.add_parser(
        "append",
        parents=[common],
        help="append JSON records to a session channel (argument, or JSON lines on stdin)",
    )
    append.add_argument("session")
    append.add_argument("rest", nargs="*", metavar="[out|in] [JSON]", help="the channel (default in), one JSON value "
                        "(without it, JSON lines are read from stdin)")  # fmt: skip
    append.add_argument("--io", dest="io_option", choices=["out", "in"], default=None)

    streams = commands.add_parser("streams", help="stand-alone Durable Streams")
    stream_verbs = streams.add_subparsers(dest="streams_command", required=True)
    create_stream = stream_verbs.add_parser(
        "create", parents=[common], help="create a JSON stream (or a fork)"
    )
    create_stream.add_argument("name")
    create_stream.add_argument("--ttl", type=int, default=None)
    create_stream.add_argument("--fork-from")
    create_stream.add_argument("--fork-offset")
    for verb, help_text in (("cat", "print the records"), ("tail", "print the records, and follow with -f")):
        parser = stream_verbs.add_parser(verb, parents=[common], help=help_text)
        parser.add_argument("name")
        _add_read_args(parser)
    info = stream_verbs.add_parser("info", parents=[common], help="a stream's metadata")
    info.add_argument("name")
    delete = stream_verbs.add_parser("rm", parents=[common], help="delete a stream")
    delete.add_argument("name")


def _add_read_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--io", dest="io_option", choices=["out", "in"], default=None)
    parser.add_argument("--from", dest="from_", default="-1", help="-1 (start, default), now, or an offset")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new records until closed")


def run_client_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        with Threadline(args.url, args.api_key) as client:
            _dispatch(client, args, out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ThreadlineError as exc:
        print(f"error: {explain(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


def explain(exc: ThreadlineError) -> str:
    """An error in words, with what to do about it."""
    if isinstance(exc, Unauthorized):
        return f"not authenticated ({exc}): check --api-key / THREADLINE_API_KEY"
    if isinstance(exc, Forbidden):
        return f"not allowed ({exc}): the key or token lacks the scope for this"
    if isinstance(exc, NotFound):
        return f"not found ({exc}): no such session or stream in this environment"
    if isinstance(exc, Conflict):
        return f"conflict: {exc} ({exc.code})"
    if isinstance(exc, ApiError):
        return f"{exc} ({exc.code}, HTTP {exc.status_code})"
    if isinstance(exc, ClientError):
        return f"{exc}: is the server running at --url / THREADLINE_URL?"
    return str(exc)


def _dispatch(client: Threadline, args: argparse.Namespace, out: TextIO) -> None:
    if args.command == "sessions":
        _sessions(client, args, out)
    elif args.command == "tail":
        channel = client.channel(args.session, args.io_option or args.io or "out")
        _print_records(channel.subscribe(args.from_, follow=args.follow), args.format, out)
    elif args.command == "append":
        rest = list(args.rest)
        io = rest.pop(0) if rest and rest[0] in ("out", "in") else None
        if len(rest) > 1:
            raise ValueError("append takes one JSON value (or JSON lines on stdin)")
        channel = client.channel(args.session, args.io_option or io or "in")
        _append(channel, rest[0] if rest else None, args.format, out)
    elif args.command == "streams":
        _streams(client, args, out)


def _sessions(client: Threadline, args: argparse.Namespace, out: TextIO) -> None:
    verb = args.sessions_command
    if verb == "create":
        session = client.sessions.create(
            args.type,
            external_id=args.external_id,
            task_identifier=args.task_identifier,
            tags=args.tags,
            metadata=args.metadata,
            expires_at=args.expires_at,
        )
        _print_sessions([session], args.format, out)
    elif verb == "get":
        _print_sessions([client.sessions.get(args.session)], args.format, out)
    elif verb == "close":
        _print_sessions([client.sessions.close(args.session, reason=args.reason)], args.format, out)
    elif verb == "token":
        token = client.sessions.mint_token(args.session, expires_in_seconds=args.ttl, scopes=args.scopes)
        if args.format == "json":
            _json_line(
                {"token": token.token, "sessionId": token.session_id, "scopes": list(token.scopes),
                 "expiresAt": token.expires_at.isoformat()},
                out,
            )  # fmt: skip
        else:
            print(token.token, file=out)
    else:
        filters = {
            "type": args.type,
            "tags": args.tags,
            "task_identifier": args.task_identifier,
            "external_id": args.external_id,
            "status": args.status,
            "period": args.period,
        }
        if verb == "count":
            counts = client.sessions.count(**filters)
            if args.format == "json":
                _json_line({"count": counts.count, "byStatus": dict(counts.by_status)}, out)
            else:
                by_status = "  ".join(f"{k} {v}" for k, v in counts.by_status.items())
                print(f"{counts.count}  ({by_status})", file=out)
            return
        sessions: Iterable[Session[Channel]] = client.sessions.list(
            **filters, sort=args.sort, page_size=min(100, args.limit) if args.limit else 100
        )
        if args.limit:
            sessions = islice(sessions, args.limit)
        _print_sessions(sessions, args.format, out)


def _streams(client: Threadline, args: argparse.Namespace, out: TextIO) -> None:
    verb = args.streams_command
    if verb == "create":
        stream = client.streams.create(
            args.name, ttl_seconds=args.ttl, fork_from=args.fork_from, fork_offset=args.fork_offset
        )
        print(stream.name, file=out)
    elif verb in ("cat", "tail"):
        stream = client.streams.get(args.name)
        _print_records(stream.subscribe(args.from_, follow=args.follow), args.format, out)
    elif verb == "info":
        info = client.streams.get(args.name).info()
        _json_line(
            {"name": info.name, "contentType": info.content_type, "nextOffset": info.next_offset,
             "closed": info.closed, "ttlSeconds": info.ttl_seconds,
             "expiresAt": info.expires_at.isoformat() if info.expires_at else None},
            out,
        )  # fmt: skip
    elif verb == "rm":
        client.streams.get(args.name).delete()


def _append(channel: Channel, value: str | None, fmt: str, out: TextIO) -> None:
    if value is not None:
        result = channel.append(json.loads(value))
        _json_line(
            {"offset": result.offset, "nextOffset": result.next_offset, "records": result.records}, out
        )
        return
    count = 0
    with channel.writer() as writer:
        for line in _json_lines(sys.stdin):
            writer.append(line)
            count += 1
    last = writer.last_result
    _json_line({"records": count, "nextOffset": last.next_offset if last else None}, out)


def _json_lines(lines: Iterable[str]) -> Iterator[Any]:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ValueError(f"stdin line {number} is not JSON: {exc}") from None


def _json_line(data: Any, out: TextIO) -> None:
    print(json.dumps(data, ensure_ascii=False), file=out, flush=True)


def _print_records(records: Iterable[Record], fmt: str, out: TextIO) -> None:
    for record in records:
        value = record.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if fmt == "json":
            _json_line({"offset": record.offset, "value": value}, out)
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            print(f"{_dim(record.offset, out)}  {text}", file=out, flush=True)


def _session_json(session: Session[Any]) -> dict[str, Any]:
    return {
        "id": session.id,
        "externalId": session.external_id,
        "type": session.type,
        "taskIdentifier": session.task_identifier,
        "tags": list(session.tags),
        "metadata": dict(session.metadata),
        "status": session.status,
        "closedReason": session.closed_reason,
        "createdAt": session.created_at.isoformat(),
        "lastActiveAt": session.last_active_at.isoformat(),
        "expiresAt": session.expires_at.isoformat() if session.expires_at else None,
        "channels": {
            name: {"records": c.records, "tailOffset": c.tail_offset} for name, c in session.channels.items()
        },
    }


_COLUMNS = ("ID", "TYPE", "STATUS", "EXTERNAL ID", "TAGS", "OUT", "IN", "CREATED", "LAST ACTIVE")


def _print_sessions(sessions: Iterable[Session[Any]], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        for session in sessions:
            _json_line(_session_json(session), out)
        return
    rows = [
        (
            s.id,
            s.type,
            s.status,
            s.external_id or "-",
            ",".join(s.tags) or "-",
            str(s.channels["out"].records) if "out" in s.channels else "-",
            str(s.channels["in"].records) if "in" in s.channels else "-",
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            s.last_active_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for s in sessions
    ]
    _print_table(_COLUMNS, rows, out)


def _print_table(columns: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(str(row[i])) for row in [columns, *rows]) for i in range(len(columns))]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        cells[2] = _colour(row[2], cells[2], out)
        print("  ".join(cells).rstrip(), file=out)


def _colour(status: str, text: str, out: TextIO) -> str:
    code = _STATUS_COLOURS.get(status)
    return f"\033[{code}m{text}\033[0m" if code and out.isatty() else text


def _dim(text: str, out: TextIO) -> str:
    return f"\033[2m{text}\033[0m" if out.isatty() else text
