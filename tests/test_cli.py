"""The client side of the ``threadline`` command against the live stack, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import Tenant, eventually
from threadline.cli import main
from threadline.client import Threadline


@pytest.fixture
def env(base_url: str, tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("THREADLINE_URL", base_url)
    monkeypatch.setenv("THREADLINE_API_KEY", tenant.key)
    return {**os.environ, "THREADLINE_URL": base_url, "THREADLINE_API_KEY": tenant.key}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    captured = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_sessions_create_get_list_count_token_close(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    kind = f"cli-{uuid.uuid4().hex[:8]}"
    code, out, _ = cli(capsys, "sessions", "create", kind, "--tag", "x", "--metadata", '{"a": 1}', "--json")
    assert code == 0
    (created,) = json_lines(out)
    assert (created["type"], created["tags"], created["metadata"]) == (kind, ["x"], {"a": 1})

    code, out, _ = cli(capsys, "sessions", "get", created["id"])
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "TYPE", "STATUS"]
    assert row.split()[:3] == [created["id"], kind, "ACTIVE"]

    def listed() -> list[Any]:
        return json_lines(cli(capsys, "sessions", "list", "--type", kind, "--format", "json")[1])

    assert [s["id"] for s in eventually(listed)] == [created["id"]]
    code, out, _ = cli(capsys, "sessions", "count", "--type", kind, "--json")
    assert json_lines(out) == [{"count": 1, "byStatus": {"ACTIVE": 1, "CLOSED": 0, "EXPIRED": 0}}]

    code, out, _ = cli(capsys, "sessions", "token", created["id"], "--ttl", "120", "--scope", "read")
    assert code == 0
    with Threadline(api_key=out.strip()) as scoped:
        assert scoped.sessions.get(created["id"]).id == created["id"]

    code, out, _ = cli(capsys, "sessions", "close", created["id"], "--reason", "bye", "--json")
    assert json_lines(out)[0]["status"] == "CLOSED"


def test_errors_are_explained_in_words(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "sessions", "get", "session_nope")
    assert code == 1
    assert "not found" in err
    code, _, err = cli(capsys, "sessions", "count", "--api-key", "tl_sk_wrong")
    assert code == 1
    assert "not authenticated" in err
    session = Threadline().sessions.create("cli-closed")
    cli(capsys, "sessions", "close", session.id)
    code, _, err = cli(capsys, "append", session.id, "in", '{"late": true}')
    assert code == 1
    assert "session_closed" in err


def test_append_and_tail(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    session = Threadline().sessions.create("cli-tail")
    code, out, _ = cli(capsys, "append", session.id, "out", '{"n": 0}')
    assert json_lines(out) == [{"offset": "0000000000000000_0000000000000000", "nextOffset": "0000000000000000_0000000000000001", "records": 1}]  # fmt: skip
    # JSON lines on stdin go through a batching writer.
    piped = subprocess.run(
        [sys.executable, "-m", "threadline", "append", session.id, "--io", "out"],
        input='{"n": 1}\n{"n": 2}\n\n"three"\n',
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert json_lines(piped.stdout) == [{"records": 3, "nextOffset": "0000000000000000_0000000000000004"}]

    code, out, _ = cli(capsys, "tail", session.id, "--json")
    assert code == 0
    assert [line["value"] for line in json_lines(out)] == [{"n": 0}, {"n": 1}, {"n": 2}, "three"]
    _, out, _ = cli(capsys, "tail", session.id, "out", "--from", "0000000000000000_0000000000000003")
    assert out.split() == ["0000000000000000_0000000000000004", "three"]

    # -f from the tail: prints what is appended next, and ends when the session closes.
    follower = subprocess.Popen(
        [sys.executable, "-m", "threadline", "tail", session.id, "-f", "--json",
         "--from", "0000000000000000_0000000000000004"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        client = Threadline()
        client.channel(session.id, "out").append("live")
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["value"] == "live"
        client.sessions.close(session.id)
        remaining, _ = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0
    assert remaining == ""


def test_stand_alone_stream_commands(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    name = f"cli-stream-{uuid.uuid4().hex[:8]}"
    assert cli(capsys, "streams", "create", name, "--ttl", "600")[1].strip() == name
    Threadline().streams.get(name).append([1, 2, 3])
    code, out, _ = cli(capsys, "streams", "cat", name, "--json")
    assert code == 0
    assert [line["value"] for line in json_lines(out)] == [1, 2, 3]
    _, out, _ = cli(capsys, "streams", "info", name)
    assert json_lines(out)[0]["nextOffset"] == "0000000000000000_0000000000000003"
    assert cli(capsys, "streams", "rm", name)[0] == 0
    assert "not found" in cli(capsys, "streams", "cat", name)[2]


def test_server_commands_say_what_to_install_without_the_server_packages(tmp_path: Any) -> None:
    script = (
        "import sys\nsys.modules['asyncpg'] = None\nfrom threadline.cli import main\nmain(['keys', 'list'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "pip install 'threadline[server]'" in result.stderr
