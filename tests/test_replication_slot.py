"""A replication slot that cannot fill the disk: Postgres invalidates it past
max_slot_wal_keep_size, and the consumer recreates it and copies the sessions again (deletes
included), with lists served from Postgres meanwhile. `threadline replication reset` does the same
on demand.

A stack of its own, whose Postgres keeps at most 1 MB of WAL for a slot, so a few WAL segment
switches while no consumer runs are enough to lose it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ServerThread,
    Tenant,
    bearer,
    clickhouse_rows,
    eventually,
    make_tenant,
    pg_query,
    settings_for,
)
from threadline.config import Settings
from threadline.embedded.stack import EmbeddedStack
from threadline.replication import SLOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_slot_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(
        tmp_path_factory.mktemp("slot-stack"), postgres_settings={"max_slot_wal_keep_size": "1MB"}
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def slot_settings(small_slot_stack: EmbeddedStack) -> Settings:
    return settings_for(small_slot_stack.endpoints, replication_poll_interval_seconds=0.05)


def _pg(settings: Settings, method: str, sql: str, *args: Any) -> Any:
    return pg_query(settings.database_url, method, sql, *args)


def _mirrored(stack: EmbeddedStack) -> set[str]:
    """The session ids ClickHouse's lists see (FINAL hides a session whose newest row is a delete)."""
    return {
        str(row[0]) for row in clickhouse_rows(stack.endpoints, "SELECT session_id FROM sessions_v1 FINAL")
    }


def _create(client: httpx.Client, n: int) -> list[str]:
    return [client.post("/api/v1/sessions", json={"type": "slot"}).json()["id"] for _ in range(n)]


def _lose_the_slot(settings: Settings) -> None:
    """Write past max_slot_wal_keep_size while nobody confirms the slot, then checkpoint: Postgres
    removes the WAL the slot needed and marks it lost."""
    _pg(settings, "execute", "CREATE TABLE IF NOT EXISTS slot_filler (n int)")
    for _ in range(6):
        _pg(settings, "execute", "INSERT INTO slot_filler VALUES (1)")
        _pg(settings, "fetchval", "SELECT pg_switch_wal()")
    _pg(settings, "execute", "CHECKPOINT")


def _wal_status(settings: Settings) -> str | None:
    status: str | None = _pg(
        settings, "fetchval", "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", SLOT
    )
    return status


def test_an_invalidated_slot_is_recreated_and_clickhouse_copied_again(
    small_slot_stack: EmbeddedStack, slot_settings: Settings
) -> None:
    tenant: Tenant = make_tenant(slot_settings, "slot")
    with (
        ServerThread(slot_settings) as url,
        httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as client,
    ):
        before = _create(client, 5)
        eventually(lambda: set(before) <= set(_mirrored(small_slot_stack)), timeout=60)
    # No consumer now: sessions change while the slot is lost.
    no_consumer = slot_settings.model_copy(update={"replication_enabled": False})
    with (
        ServerThread(no_consumer) as url,
        httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as client,
    ):
        during = _create(client, 3)
        _pg(slot_settings, "execute", "DELETE FROM sessions WHERE id = $1", before[0])
        _lose_the_slot(slot_settings)
        assert _wal_status(slot_settings) == "lost"
        assert client.get("/readyz").json()["replication"]["walStatus"] == "lost"
        assert before[0] in _mirrored(small_slot_stack)  # the mirror missed the delete

    def copied_again() -> set[str] | None:
        mirrored = _mirrored(small_slot_stack)
        return mirrored if set(during) <= mirrored and before[0] not in mirrored else None

    def listed_from_clickhouse() -> httpx.Response | None:
        response = client.get("/api/v1/sessions", params={"filter[type]": "slot", "page[size]": "100"})
        return response if response.headers.get("Threadline-List-Source") == "clickhouse" else None

    with (
        ServerThread(slot_settings) as url,
        httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as client,
    ):
        eventually(lambda: _wal_status(slot_settings) in ("reserved", "extended"), timeout=60)
        mirrored = eventually(copied_again, timeout=60)
        assert set(before[1:] + during) <= mirrored
        # Replication runs again from the new slot.
        after = _create(client, 2)
        eventually(lambda: set(after) <= set(_mirrored(small_slot_stack)), timeout=60)
        metrics = client.get("/metrics").text
        assert "threadline_replication_slot_recreated_total 1.0" in metrics
        assert "threadline_replication_retained_wal_bytes" in metrics
        listed = eventually(listed_from_clickhouse, timeout=60)
        assert {s["id"] for s in listed.json()["data"]} == set(before[1:] + during + after)


def test_replication_reset_drops_the_slot_and_the_consumer_copies_again(
    small_slot_stack: EmbeddedStack, slot_settings: Settings
) -> None:
    env = {**os.environ, **small_slot_stack.endpoints.as_env()}
    tenant = make_tenant(slot_settings, "slot-reset")
    with (
        ServerThread(slot_settings) as url,
        httpx.Client(base_url=url, headers=bearer(tenant.key), timeout=30) as client,
    ):
        sessions = _create(client, 3)
        eventually(lambda: set(sessions) <= set(_mirrored(small_slot_stack)), timeout=60)
        backfilled = "SELECT backfilled_at FROM replication_state WHERE slot_name = $1"
        copied_at = _pg(slot_settings, "fetchval", backfilled, SLOT)
        assert copied_at is not None
        reset = subprocess.run(
            [sys.executable, "-m", "threadline", "replication", "reset"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert reset.returncode == 0, reset.stderr
        assert "dropped" in reset.stdout
        # A new slot and a new copy (deletes in a copy are covered by the test above).
        eventually(
            lambda: (at := _pg(slot_settings, "fetchval", backfilled, SLOT)) is not None and at > copied_at,
            timeout=60,
        )
        status = subprocess.run(
            [sys.executable, "-m", "threadline", "replication", "status"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        report = json.loads(status.stdout)
        assert report["wal_status"] in ("reserved", "extended"), report
        assert set(sessions) <= _mirrored(small_slot_stack)
