"""A terminal chat client: each line typed goes to the session's ``in`` channel as a user
message, and what the agent writes to ``out`` is printed as it arrives.

Run it against ``make run``, next to ``examples/agent_loop.py``::

    export THREADLINE_URL=http://127.0.0.1:8080 THREADLINE_API_KEY=tl_sk_...
    .venv/bin/python examples/agent_loop.py demo &      # the session from agent_loop's docstring
    .venv/bin/python examples/chat.py demo

Resuming is the SDK's job, and this client shows it:

- A network loss, a server restart or Ctrl-Z (the server drops a reader that stops reading,
  after 30 s) end the live connection; ``subscribe`` reconnects by itself and resumes after the
  last record it printed, so nothing is missed and nothing is printed twice. ``fg`` and go on.
- Ctrl-D (end of input) or Ctrl-C quits and prints the offset after the last record shown;
  ``chat.py demo --from <offset>`` later prints only what came after it. Without ``--from``
  it shows the conversation from the start (``-1``).
- When the session is closed it says so and exits.

``--key`` may be a session token (``threadline sessions token demo``) instead of a secret key:
what a browser or a user's device would hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from typing import Any

from threadline.client import AsyncChannel, AsyncThreadline


def show(value: Any) -> None:
    """Tokens print inline, ``done`` ends the answer's line, anything else is one JSON line."""
    if isinstance(value, dict) and value.get("type") == "token":
        print(value.get("text", ""), end="", flush=True)
    elif isinstance(value, dict) and value.get("type") == "done":
        print(flush=True)
    else:
        print(json.dumps(value), flush=True)


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines typed, as a queue (``None`` at end of input). A daemon thread reads them: a blocked
    read of a terminal cannot be cancelled, and it must not keep the program alive."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines


class Chat:
    def __init__(self, tl: AsyncThreadline, session: str, start: str) -> None:
        self.inbox: AsyncChannel = tl.channel(session, "in")
        self.outbox: AsyncChannel = tl.channel(session, "out")
        self.offset = start  # after the last record shown

    async def print_out(self) -> None:
        async for record in self.outbox.subscribe(self.offset):
            show(record.value)
            self.offset = record.offset
        print("[the session is closed]", file=sys.stderr, flush=True)

    async def send_in(self, lines: asyncio.Queue[str | None]) -> None:
        while (line := await lines.get()) is not None:
            if line.strip():
                await self.inbox.append({"role": "user", "text": line})


async def main_async(args: argparse.Namespace) -> None:
    async with AsyncThreadline(api_key=args.key) as tl:  # the key defaults to THREADLINE_API_KEY
        chat = Chat(tl, args.session, args.from_)
        loop = asyncio.get_running_loop()
        printer = asyncio.create_task(chat.print_out())
        sender = asyncio.create_task(chat.send_in(stdin_lines(loop)))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, sender.cancel)
        # Whichever ends first ends the chat: the session closing, or the end of input.
        done, pending = await asyncio.wait({printer, sender}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled():
                task.result()  # an error (a 401, an unknown session) ends the chat with it
        print(f"[to resume: --from {chat.offset}]", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("session", help="session id or externalId")
    parser.add_argument("--from", dest="from_", default="-1", help="-1 (default), now or an offset")
    parser.add_argument("--key", help="API key or session token (default: THREADLINE_API_KEY)")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
