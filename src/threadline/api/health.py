"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadline.api.state import AppState, app_state
from threadline.replication import SLOT
from threadline.replication.progress import slot_status

__all__ = ["routes"]

_CHECK_TIMEOUT_SECONDS = 2.0


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _check_postgres(state: AppState) -> None:
    async with state.pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


async def _check_clickhouse(state: AppState) -> None:
    await state.lists.ping()


async def _run_check(check: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), _CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {_CHECK_TIMEOUT_SECONDS}s"}
    except Exception as exc:
        return {"ok": False, "error": str(exc)[:300]}
    return {"ok": True, "latencyMs": round((time.perf_counter() - started) * 1000, 2)}


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
    names = ("postgres", "s3", "clickhouse")
    results = await asyncio.gather(
        _run_check(lambda: _check_postgres(state)),
        _run_check(state.objects.ping),
        _run_check(lambda: _check_clickhouse(state)),
    )
    checks = dict(zip(names, results, strict=True))
    ready = all(result["ok"] for result in results)
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if checks["postgres"]["ok"]:
        body["replication"] = await _replication(state)
    return JSONResponse(body, 200 if ready else 503)


async def metrics(request: Request) -> Response:
    # The process collector reads /proc files: off the event loop (the registry is thread-safe).
    return Response(await asyncio.to_thread(generate_latest), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/readyz", readyz, methods=["GET"], name="readyz"),
    Route("/metrics", metrics, methods=["GET"], name="metrics"),
]
