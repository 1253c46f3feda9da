"""The scripts in ``examples/`` run as a user runs them (a subprocess, configured by
``THREADLINE_URL`` / ``THREADLINE_API_KEY``) against the live stack; the assertions are on what
lands in the channels and in the sessions, so an example that rots fails here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import REPO_ROOT, Tenant, eventually
from tests.netproxy import proxy_to
from threadline.client import Channel, Threadline

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture
def tl(base_url: str, tenant: Tenant) -> Iterator[Threadline]:
    with Threadline(base_url, tenant.key) as client:
        yield client


def example_env(base_url: str, tenant: Tenant) -> dict[str, str]:
    return {**os.environ, "THREADLINE_URL": base_url, "THREADLINE_API_KEY": tenant.key}


class Example:
    """One example running as a child process; its output lines are collected as they come."""

    def __init__(self, script: str, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for_line(self, prefix: str) -> str:
        def found() -> str | None:
            assert self.proc.poll() is None or any(line.startswith(prefix) for line in self.stdout), (
                self.stdout,
                self.stderr,
            )
            return next((line for line in self.stdout if line.startswith(prefix)), None)

        line: str = eventually(found, timeout=60)
        return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Wait for it to exit (it must, by itself) and for its output to be read."""
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the example did not exit: {self.stdout} {self.stderr}") from None
        for reader in self._readers:
            reader.join(30)
        assert code == 0, (self.stdout, self.stderr)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def examples() -> Iterator[Callable[..., Example]]:
    started: list[Example] = []

    def start(script: str, *args: str, env: dict[str, str]) -> Example:
        example = Example(script, *args, env=env)
        started.append(example)
        return example

    yield start
    for example in started:
        example.stop()


def values(channel: Channel) -> list[Any]:
    return [record.value for record in channel.subscribe("-1", follow=False)]


def answer(text: str) -> list[Any]:
    """What agent_loop.py writes for a user message: its fake tokens, then ``done``."""
    words = f"You said: {text}".split(" ")
    tokens = [word if i == 0 else f" {word}" for i, word in enumerate(words)]
    return [{"type": "token", "text": token} for token in tokens] + [{"type": "done"}]


def dones(channel: Channel) -> int:
    return sum(1 for value in values(channel) if value == {"type": "done"})


# --- agent_loop.py ----------------------------------------------------------------------------


def test_agent_answers_each_message_and_ends_when_the_session_closes(
    tl: Threadline, base_url: str, tenant: Tenant, examples: Callable[..., Example]
) -> None:
    session = tl.sessions.create("example-agent")
    earlier = "sent before the agent started"
    session.in_.append({"role": "user", "text": earlier})
    agent = examples("agent_loop.py", session.id, "--token-delay", "0", env=example_env(base_url, tenant))
    agent.wait_for_line("listening from")  # from "now": the earlier message is not answered
    session.in_.append({"role": "user", "text": "hello there"})
    session.in_.append({"role": "user", "text": "and again"})
    eventually(lambda: dones(session.out) >= 2, timeout=60)

    tl.sessions.close(session.id)
    agent.finish()
    assert "session closed" in agent.stdout
    assert agent.stderr == []
    assert values(session.out) == answer("hello there") + answer("and again")


def test_agent_resumes_from_its_remembered_offset_answering_each_message_once(
    tl: Threadline, base_url: str, tenant: Tenant, examples: Callable[..., Example], tmp_path: Path
) -> None:
    session = tl.sessions.create("example-agent")
    state = tmp_path / "agent.json"
    env = example_env(base_url, tenant)
    args = (session.id, "--state", str(state), "--token-delay", "0")

    first = examples("agent_loop.py", *args, env=env)
    first.wait_for_line("listening from")
    session.in_.append({"role": "user", "text": "one"})
    eventually(lambda: dones(session.out) >= 1, timeout=60)
    eventually(state.exists)
    first.proc.send_signal(signal.SIGINT)
    first.finish()
    assert "cancelled" in first.stdout
    assert first.stderr == []  # no traceback, no warning

    remembered = json.loads(state.read_text())["offset"]
    assert remembered == session.in_.info().next_offset  # after "one"
    session.in_.append({"role": "user", "text": "two"})  # while no agent runs
    second = examples("agent_loop.py", *args, env=env)
    assert second.wait_for_line("listening from") == f"listening from {remembered}"
    eventually(lambda: dones(session.out) >= 2, timeout=60)
    tl.sessions.close(session.id)
    second.finish()
    assert values(session.out) == answer("one") + answer("two")


def test_agent_interrupted_mid_answer_flushes_what_it_wrote(
    tl: Threadline, base_url: str, tenant: Tenant, examples: Callable[..., Example]
) -> None:
    session = tl.sessions.create("example-agent")
    # The writer would hold its records for ten minutes: only closing it sends them.
    agent = examples(
        "agent_loop.py",
        session.id,
        "--token-delay",
        "0.05",
        "--linger-ms",
        "600000",
        env=example_env(base_url, tenant),
    )
    agent.wait_for_line("listening from")
    long_text = " ".join(f"w{i}" for i in range(500))
    session.in_.append({"role": "user", "text": long_text})
    agent.wait_for_line("answering")
    assert values(session.out) == []
    agent.proc.send_signal(signal.SIGINT)
    agent.finish()

    flushed = agent.wait_for_line("flushed: ")
    written = int(flushed.split()[1])
    assert written >= 1
    assert values(session.out) == answer(long_text)[:written]  # a prefix of the answer, no "done"
    assert tl.sessions.get(session.id).status == "ACTIVE"


# --- chat.py ----------------------------------------------------------------------------------


def test_chat_sends_lines_prints_answers_and_resumes_after_a_network_loss_and_a_restart(
    tl: Threadline, base_url: str, tenant: Tenant, examples: Callable[..., Example]
) -> None:
    session = tl.sessions.create("example-chat")
    with proxy_to(base_url) as proxy:
        chat = examples("chat.py", session.id, env=example_env(proxy.url, tenant))
        chat.send("hello")
        chat.send("")  # blank lines are not sent
        chat.send("how are you?")
        eventually(lambda: len(values(session.in_)) >= 2, timeout=60)
        assert values(session.in_) == [
            {"role": "user", "text": "hello"},
            {"role": "user", "text": "how are you?"},
        ]

        session.out.append([{"type": "token", "text": "Hel"}, {"type": "token", "text": "lo"}])
        session.out.append({"type": "done"})
        chat.wait_for_line("Hello")

        proxy.cut()  # the live connection drops (so would a server restart, or a long Ctrl-Z)
        session.out.append([{"type": "token", "text": "Fine"}, {"type": "done"}])
        proxy.cut()
        session.out.append({"note": "not a token"})
        chat.wait_for_line('{"note"')
        assert chat.stdout == ["Hello", "Fine", '{"note": "not a token"}']  # no gap, no repeat

        assert chat.proc.stdin is not None
        chat.proc.stdin.close()  # Ctrl-D
        chat.finish()
    tail = session.out.info().next_offset
    assert chat.stderr[-1] == f"[to resume: --from {tail}]"

    session.out.append([{"type": "token", "text": "Later"}, {"type": "done"}])
    again = examples("chat.py", session.id, "--from", tail, env=example_env(base_url, tenant))
    again.wait_for_line("Later")
    tl.sessions.close(session.id)
    again.finish()
    assert again.stdout == ["Later"]
    assert "[the session is closed]" in again.stderr


def test_chat_with_a_session_token(
    tl: Threadline, base_url: str, tenant: Tenant, examples: Callable[..., Example]
) -> None:
    session = tl.sessions.create("example-chat")
    token = tl.sessions.mint_token(session.id, expires_in_seconds=600).token
    env = {**example_env(base_url, tenant), "THREADLINE_API_KEY": "tl_sk_not_this_one"}
    chat = examples("chat.py", session.id, "--key", token, env=env)
    chat.send("hi")
    eventually(lambda: values(session.in_) == [{"role": "user", "text": "hi"}], timeout=60)
    tl.sessions.close(session.id)
    chat.finish()


# --- close_stale_sessions.py ------------------------------------------------------------------


def run_script(base_url: str, tenant: Tenant, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "close_stale_sessions.py"), *args],
        env=example_env(base_url, tenant),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_close_stale_sessions_dry_run_then_apply(
    tl: Threadline, base_url: str, tenant: Tenant, db: Callable[..., Any]
) -> None:
    kind = f"example-stale-{uuid.uuid4().hex[:8]}"
    stale = [tl.sessions.create(kind), tl.sessions.create(kind)]
    # Idle for three and two hours (the only way to age a session without waiting).
    for session, hours in zip(stale, (3, 2), strict=True):
        db(
            "execute",
            "UPDATE sessions SET last_active_at = now() - make_interval(hours => $2) WHERE id = $1",
            session.id,
            hours,
        )
    closed_before = tl.sessions.create(kind)
    db(
        "execute",
        "UPDATE sessions SET last_active_at = now() - interval '5 hours' WHERE id = $1",
        closed_before.id,
    )
    tl.sessions.close(closed_before.id)  # stale, but already closed: not listed
    fresh = tl.sessions.create(kind)
    # The list reads ClickHouse: wait until it holds every write above (the last one's LSN).
    assert tl.sessions.count(type=kind, min_lsn=fresh.lsn).count == 4

    lines = run_script(base_url, tenant, "--idle", "1h", "--type", kind)
    assert [line.split()[0] for line in lines[:-1]] == [s.id for s in stale]  # oldest first
    assert lines[-1].startswith("would close (dry run")
    assert lines[-1].endswith(": 2")
    assert {tl.sessions.get(s.id).status for s in [*stale, fresh]} == {"ACTIVE"}

    lines = run_script(base_url, tenant, "--idle", "1h", "--type", kind, "--reason", "stale", "--apply")
    assert lines[-1] == "closed: 2"
    for session in stale:
        closed = tl.sessions.get(session.id)
        assert (closed.status, closed.closed_reason) == ("CLOSED", "stale")
    assert tl.sessions.get(fresh.id).status == "ACTIVE"
    assert tl.sessions.get(closed_before.id).closed_reason is None
