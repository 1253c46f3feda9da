"""An agent: tails a session's ``in`` channel and answers each user message on ``out``, one
fake token at a time, through the SDK's batching writer.

Run it against ``make run`` (which prints the URL and an API key)::

    export THREADLINE_URL=http://127.0.0.1:8080 THREADLINE_API_KEY=tl_sk_...
    .venv/bin/threadline sessions create chat --external-id demo
    .venv/bin/python examples/agent_loop.py demo --state .agent-demo.json
    .venv/bin/python examples/chat.py demo          # in another terminal: type, see the answers

- Where it starts: ``--from now`` (the default: only messages sent from now on), ``-1`` (every
  message ever sent) or an offset. With ``--state FILE`` it remembers the offset after the last
  message it answered (once the answer is acknowledged) and resumes there on the next start, so
  a restarted agent answers every message exactly once, including those sent while it was down.
- The session closing ends the subscription: the agent flushes and exits 0.
- Ctrl-C (SIGINT) or SIGTERM cancels it mid-answer: the tokens already produced are flushed,
  the writer is closed and it exits 0. The message being answered is not marked as answered,
  so with ``--state`` it is answered again (in full) on the next start.

Every line it prints is for people, except ``listening from <offset>`` which says the
subscription's start is fixed (a test waits for it before sending).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from threadline.client import (
    AsyncChannel,
    AsyncThreadline,
    AsyncWriter,
    SessionClosed,
    SessionExpired,
    StreamClosed,
    WriterFailed,
)


def fake_tokens(message: Any) -> list[str]:
    """What a model would stream back: here, an echo of the user's text, word by word."""
    text = message.get("text", "") if isinstance(message, dict) else json.dumps(message)
    words = f"You said: {text}".split(" ")
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]


def load_offset(state: Path | None) -> str | None:
    if state is None or not state.exists():
        return None
    offset: str = json.loads(state.read_text())["offset"]
    return offset


def save_offset(state: Path | None, offset: str) -> None:
    if state is not None:
        tmp = state.with_suffix(state.suffix + ".tmp")
        tmp.write_text(json.dumps({"offset": offset}))
        tmp.replace(state)  # atomic: a crash leaves the old offset or the new one


ENDED = (SessionClosed, SessionExpired, StreamClosed)  # the session ended under the writer


class Agent:
    def __init__(self, tl: AsyncThreadline, session: str, *, token_delay: float, linger_ms: float) -> None:
        self.inbox: AsyncChannel = tl.channel(session, "in")
        self.outbox: AsyncChannel = tl.channel(session, "out")
        self.writer: AsyncWriter = self.outbox.writer(linger_ms=linger_ms)
        self.token_delay = token_delay
        self.written = 0  # records handed to the writer

    async def answer(self, message: Any) -> None:
        """Stream one answer: a ``token`` record per token, then ``done``."""
        for token in fake_tokens(message):
            await self.writer.append({"type": "token", "text": token})
            self.written += 1
            await asyncio.sleep(self.token_delay)  # the model "thinking"; a cancel lands here
        await self.writer.append({"type": "done"})
        self.written += 1

    async def run(self, start: str, state: Path | None) -> None:
        offset = load_offset(state) or start
        if offset == "now":
            # Fix "now" to a real offset, so where this run starts is known (and can be saved).
            offset = (await self.inbox.info()).next_offset
        print(f"listening from {offset}", flush=True)
        try:
            # The subscription reconnects by itself after timeouts, dropped connections and
            # server restarts, resuming after the last record it handed out; it ends when the
            # session closes.
            async for message in self.inbox.subscribe(offset):
                print(f"answering {json.dumps(message.value)}", flush=True)
                await self.answer(message.value)
                await self.writer.flush()  # the whole answer is stored ...
                save_offset(state, message.offset)  # ... before the message counts as answered
            print("session closed", flush=True)
        except asyncio.CancelledError:
            print("cancelled", flush=True)
        except WriterFailed as exc:
            if not isinstance(exc.__cause__, ENDED):
                raise
            print("session closed while answering", flush=True)
        finally:
            await self.close_writer()

    async def close_writer(self) -> None:
        try:
            await self.writer.close()  # sends whatever is still buffered
        except WriterFailed as exc:
            if not isinstance(exc.__cause__, ENDED):
                raise
        else:
            print(f"flushed: {self.written} records written", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    async with AsyncThreadline() as tl:  # THREADLINE_URL / THREADLINE_API_KEY
        agent = Agent(tl, args.session, token_delay=args.token_delay, linger_ms=args.linger_ms)
        task = asyncio.create_task(agent.run(args.from_, args.state))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Cancel the agent, not the program: it flushes and closes its writer, then returns.
            loop.add_signal_handler(signum, task.cancel)
        await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("session", help="session id or externalId")
    parser.add_argument("--from", dest="from_", default="now", help="now (default), -1 or an offset")
    parser.add_argument("--state", type=Path, help="remember the last answered offset in this file")
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds between tokens")
    parser.add_argument("--linger-ms", type=float, default=20, help="how long the writer batches")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
