"""A backend job: close the active sessions nobody has written to for a while.

Run it against ``make run`` (a cron job would run it the same way)::

    export THREADLINE_URL=http://127.0.0.1:8080 THREADLINE_API_KEY=tl_sk_...
    .venv/bin/python examples/close_stale_sessions.py --idle 2h             # dry run: lists them
    .venv/bin/python examples/close_stale_sessions.py --idle 2h --apply     # closes them
    .venv/bin/python examples/close_stale_sessions.py --idle 30m --type chat --apply

A session's ``lastActiveAt`` is its creation and then its last append. The list is sorted by it,
oldest first, so the job reads only the stale sessions and one more, whatever the total; the
SDK fetches the pages as the loop goes. Each line printed is ``<id> <type> idle <duration>``,
then a count. Closing is idempotent, so two overlapping runs are harmless, and a session that
became active again since the list was read is not closed (it is checked again first).
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta

from threadline.client import Threadline

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w``."""
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 2h or 7d")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def close_stale(tl: Threadline, idle: timedelta, *, type: str | None, apply: bool, reason: str) -> int:
    cutoff = datetime.now(UTC) - idle
    stale = 0
    for session in tl.sessions.list(status="ACTIVE", type=type, sort="lastActiveAt", page_size=100):
        if session.last_active_at > cutoff:
            break  # sorted oldest first: every session from here on is recent enough
        if apply:
            current = tl.sessions.get(session.id)
            if current.status != "ACTIVE" or current.last_active_at > cutoff:
                continue  # closed, or written to, since the list was read
            tl.sessions.close(session.id, reason=reason)
        stale += 1
        idle_for = datetime.now(UTC) - session.last_active_at
        print(f"{session.id} {session.type} idle {str(idle_for).split('.')[0]}", flush=True)
    print(f"{'closed' if apply else 'would close (dry run; --apply closes)'}: {stale}", flush=True)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--idle", type=duration, required=True, help="e.g. 30m, 2h, 7d")
    parser.add_argument("--type", help="only sessions of this type")
    parser.add_argument("--reason", default="idle", help="the close reason recorded (default: idle)")
    parser.add_argument("--apply", action="store_true", help="close them (default: only list them)")
    args = parser.parse_args(argv)
    with Threadline() as tl:  # THREADLINE_URL / THREADLINE_API_KEY
        close_stale(tl, args.idle, type=args.type, apply=args.apply, reason=args.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
