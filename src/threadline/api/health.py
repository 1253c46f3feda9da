"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.state import AppState, app_state
from threadline.replication import SLOT
from threadline.replication.progress import slot_status
from threadline.workers import METRICS_DIR_ENV

__all__ = ["routes"]

_CHECK_TIMEOUT_SECONDS = 2.0
# What an instance cannot serve without. ClickHouse is checked and reported but does not gate:
# lists fall back to Postgres and appends never touch it, so a ClickHouse outage must not take
# every instance out of its load balancer ("degraded", still 200).
_REQUIRED = ("postgres", "s3")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _check_postgres(state: AppState) -> None:
    async with state.pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


async def _check_clickhouse(state: AppState) -> None:
    await state.lists.ping()


async def _timed(check: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await check()
    return round((time.perf_counter() - started) * 1000, 2)


async def _run_checks(checks: dict[str, Callable[[], Awaitable[None]]]) -> dict[str, dict[str, Any]]:
    """Run the checks at once; each answers within the check timeout, and so does the whole.

    A check still running at the bound is reported and cancelled, but not waited for: a stalled
    dependency may take a while to let go of it (a connection to close, a request to drop), and
    /readyz must answer now."""
    tasks = {name: asyncio.ensure_future(_timed(check)) for name, check in checks.items()}
    await asyncio.wait(tasks.values(), timeout=_CHECK_TIMEOUT_SECONDS)
    results: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)
            results[name] = {"ok": False, "error": f"no answer within {_CHECK_TIMEOUT_SECONDS}s"}
        elif (exc := task.exception()) is not None:
            results[name] = {"ok": False, "error": (str(exc) or type(exc).__name__)[:300]}
        else:
            results[name] = {"ok": True, "latencyMs": task.result()}
    return results


def _retrieve(task: asyncio.Future[float]) -> None:
    """Consume a cancelled check's outcome (no "exception was never retrieved" warning)."""
    if not task.cancelled():
        task.exception()


async def _replication(state: AppState) -> dict[str, Any]:
    """Mirror progress, reported but not gating readiness: a lagging list is not an outage."""
    async with state.pool.acquire() as conn:
        status = await slot_status(conn)
    consumer = state.replication
    report: dict[str, Any] = {
        "slot": SLOT,
        "slotExists": status is not None,
        "confirmedLsn": status.confirmed_lsn if status else None,
        "lagBytes": status.lag_bytes if status else None,
        "retainedWalBytes": status.retained_wal_bytes if status else None,
        "walStatus": status.wal_status if status else None,
        "safeWalBytes": status.safe_wal_bytes if status else None,
        "thisInstanceLeads": bool(consumer and consumer.is_leader),
    }
    if consumer is not None and consumer.is_leader:
        report["lagSeconds"] = round(consumer.lag_seconds, 3)
    return report


async def readyz(request: Request) -> Response:
    state = app_state(request)
    checks = await _run_checks(
        {
            "postgres": lambda: _check_postgres(state),
            "s3": state.objects.ping,
            "clickhouse": lambda: _check_clickhouse(state),
        }
    )
    ready = all(checks[name]["ok"] for name in _REQUIRED)
    status = "unavailable" if not ready else "ready" if checks["clickhouse"]["ok"] else "degraded"
    body: dict[str, Any] = {"status": status, "checks": checks}
    if checks["postgres"]["ok"]:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
                body["replication"] = await _replication(state)
        except Exception as exc:  # reported, never gating: Postgres stalled since its check
            body["replication"] = {"error": (str(exc) or type(exc).__name__)[:300]}
    return JSONResponse(body, 200 if ready else 503)


def _exposition() -> bytes:
    """This process's metrics, or with several workers every worker's, summed (counters,
    histograms) or the largest (gauges): workers write their samples to files in a shared
    directory (prometheus_client's multiprocess mode, switched on by :mod:`threadline.workers`)."""
    if not os.environ.get(METRICS_DIR_ENV):
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def metrics(request: Request) -> Response:
    # Collectors read files (/proc, the workers' sample files): off the event loop.
    return Response(await asyncio.to_thread(_exposition), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/readyz", readyz, methods=["GET"], name="readyz"),
    Route("/metrics", metrics, methods=["GET"], name="metrics"),
]
