"""A pool of agent workers sharing one Durable Streams subscription: every user message written
to the ``in`` channel of any session of a type is answered once on that session's ``out``, by
whichever worker holds the subscription's lease, even when a worker is killed mid-turn.

Run several against ``make run`` (which prints the URL and an API key)::

    export THREADLINE_URL=http://127.0.0.1:8080 THREADLINE_API_KEY=tl_sk_...
    .venv/bin/python examples/agent_worker.py --worker w1 &
    .venv/bin/python examples/agent_worker.py --worker w2 &
    .venv/bin/threadline sessions create chat --external-id demo
    .venv/bin/python examples/chat.py demo          # type; one of the workers answers

How it stays exactly once:

- Every worker creates the same pull-wake subscription (same configuration: a re-confirmation)
  over ``sessions/*/in`` of sessions of ``--session-type``, and follows its wake stream.
- On a wake it claims the subscription. One worker wins the lease; the others get
  ``AlreadyClaimed`` and wait for the next wake.
- The holder reads each pending ``in`` channel from its acked offset, appends one reply per
  message to ``out`` as an idempotent producer whose seq is the message's position in ``in``,
  then acks the channel up to what it answered (which also extends the lease).
- Killed mid-turn, it acks nothing more; its lease runs out, the server wakes the pool again and
  another worker claims the next generation, re-reading from the last acked offset. Replies the
  dead worker already wrote are re-sent with the same seq and acknowledged as duplicates, so each
  message has exactly one reply. A worker that was only slow is fenced: its acks fail.

Lines on stdout: ``ready <worker>`` once following; ``claim <generation> <streams>``;
``handled <session> <position>`` per reply sent (a duplicate is sent again after a takeover);
``done <generation>``. A test reads them.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from threadline.client import (
    AlreadyClaimed,
    Claim,
    Fenced,
    Producer,
    StreamCursor,
    Threadline,
    ThreadlineError,
)

PRODUCER_ID = "agent-worker"


def offset_position(offset: str) -> int:
    return int(offset.rsplit("_", 1)[1])


_OUTPUT = threading.Lock()


def say(line: str) -> None:
    """One whole line at a time: channels are answered from several threads, and two prints
    racing would interleave their text and newlines."""
    with _OUTPUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def setup(client: Threadline, args: argparse.Namespace) -> None:
    """Create the wake stream and the subscription; every worker does it, idempotently."""
    client.streams.create(args.wake_stream)
    client.subscriptions.create(
        args.subscription,
        type="pull-wake",
        pattern="sessions/*/in",
        session_type=args.session_type,
        wake_stream=args.wake_stream,
        lease_ttl_ms=args.lease_ms,
        description="agent workers",
    )


def reply_to(message: Any) -> dict[str, Any]:
    """What a model would answer: here, an echo."""
    text = message.get("text", "") if isinstance(message, dict) else str(message)
    return {"role": "assistant", "text": f"You said: {text}"}


def answer_stream(client: Threadline, claim: Claim, stream: StreamCursor, args: argparse.Namespace) -> None:
    """Answer every message of one ``in`` channel from its acked offset to the claim's tail,
    then ack it there."""
    assert stream.tail_offset is not None
    session = stream.path.split("/")[1]
    inbox = client.streams.get(stream.path)
    out = client.streams.get(f"sessions/{session}/out")
    offset = stream.acked_offset
    while offset_position(offset) < offset_position(stream.tail_offset):
        result = inbox.read(offset)
        for record in result.records:
            position = offset_position(record.offset) - 1
            if position >= offset_position(stream.tail_offset):
                break
            if args.turn_delay:
                time.sleep(args.turn_delay)  # the model thinking: a window to be killed in
            reply = {**reply_to(record.value), "replyTo": position, "worker": args.worker}
            out.append(reply, producer=Producer(PRODUCER_ID, 0, position))
            say(f"handled {session} {position}")
            offset = record.offset
        if not result.records:
            break
    claim.ack({stream.path: offset})  # progress, and a heartbeat for the lease


def work(client: Threadline, pool: ThreadPoolExecutor, args: argparse.Namespace) -> None:
    """Claim and answer until no work is left or another worker holds the lease."""
    while True:
        try:
            claim = client.subscriptions.claim(args.subscription, worker=args.worker)
        except AlreadyClaimed:
            return
        try:
            with claim:
                say(f"claim {claim.generation} {len(claim.pending)}")
                if not claim.pending:
                    claim.release()
                    return
                # Channels are independent: answer them side by side within the one lease.
                for future in [pool.submit(answer_stream, client, claim, s, args) for s in claim.pending]:
                    future.result()
                more = claim.ack(done=True)
                say(f"done {claim.generation}")
        except Fenced:
            say(f"fenced {claim.generation}")  # the lease moved on; the new holder redoes the rest
            return
        if not more:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, help="this worker's name (shown to other claimers)")
    parser.add_argument("--subscription", default="agent-workers")
    parser.add_argument("--session-type", default="chat")
    parser.add_argument("--wake-stream", default="agents/wake")
    parser.add_argument(
        "--lease-ms", type=int, default=10_000, help="lease: how soon a dead worker's turn moves on"
    )
    parser.add_argument("--turn-delay", type=float, default=0.0, help="seconds each answer takes")
    parser.add_argument("--parallel", type=int, default=8, help="channels answered at once within a claim")
    args = parser.parse_args(argv)

    with Threadline() as client, ThreadPoolExecutor(args.parallel) as pool:
        setup(client, args)
        wakes = client.streams.get(args.wake_stream)
        start = wakes.info().next_offset
        say(f"ready {args.worker}")
        safely(work, client, pool, args)  # work that was pending before this worker started
        for _wake in wakes.subscribe(start):
            safely(work, client, pool, args)
    return 0


def safely(turn: Any, *args: Any) -> None:
    """One failed turn (a server error the SDK did not retry) does not end the worker: what it
    did not ack is handed on when its lease runs out, and the next wake tries again."""
    try:
        turn(*args)
    except ThreadlineError as exc:
        say(f"error {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
