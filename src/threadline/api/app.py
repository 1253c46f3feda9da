"""The ASGI application: routes, middleware, error handlers, and resources owned by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from threadline import __version__
from threadline.api import health, openapi, realtime, sessions, streams, subscriptions, ui
from threadline.api.connection import HttpProtocol
from threadline.api.middleware import RequestEdge, direct_routes
from threadline.api.state import AppState
from threadline.auth.authenticator import Authenticator
from threadline.config import Settings, sql_dir
from threadline.db import POSTGRES_UNAVAILABLE, BoundedPool, apply_migrations, create_pool
from threadline.errors import (
    ApiError,
    DatabaseUnavailable,
    DependencyUnavailable,
    HttpError,
    InternalError,
    MethodNotAllowed,
    RouteNotFound,
    ServiceUnavailable,
    StorageUnavailable,
)
from threadline.logs import AccessLog
from threadline.replication.consumer import ReplicationConsumer
from threadline.sessions.activity import SessionActivity
from threadline.sessions.lists import SessionLists
from threadline.storage.clickhouse import ClickHouseUnavailable, apply_clickhouse_schema, connect_clickhouse
from threadline.storage.objects import ObjectStore, ObjectStoreUnavailable
from threadline.streams.engine import StreamEngine
from threadline.subscriptions.service import SubscriptionService

__all__ = ["create_app", "uvicorn_config"]

logger = logging.getLogger(__name__)

CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "Last-Event-ID",
    "If-None-Match",
    "Timeout-Seconds",
    "Producer-Id",
    "Producer-Epoch",
    "Producer-Seq",
    "Stream-Seq",
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-Closed",
    "Stream-Forked-From",
    "Stream-Fork-Offset",
    "Stream-Fork-Sub-Offset",
]
CORS_EXPOSE_HEADERS = [
    "Threadline-Lsn",
    "Threadline-List-Source",
    "Location",
    "ETag",
    "Retry-After",
    "Stream-Next-Offset",
    "Stream-Up-To-Date",
    "Stream-Cursor",
    "Stream-Closed",
    "Stream-TTL",
    "Stream-Expires-At",
    "Producer-Epoch",
    "Producer-Seq",
    "Producer-Expected-Seq",
    "Producer-Received-Seq",
    "Stream-SSE-Data-Encoding",
]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no route, wrong method), in the same body as every other error."""
    assert isinstance(exc, HTTPException)
    kind: type[ApiError] = {404: RouteNotFound, 405: MethodNotAllowed}.get(exc.status_code, HttpError)
    error = kind(exc.detail)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _dependency_error(request: Request, exc: Exception) -> Response:
    """A dependency that is down or stalled is an outage, not a bug: 503 with Retry-After (the
    client retries), and one log line without a traceback."""
    error: ServiceUnavailable
    if isinstance(exc, ObjectStoreUnavailable):
        error = StorageUnavailable("object storage unavailable; retry shortly")
    elif isinstance(exc, DependencyUnavailable):
        error = ServiceUnavailable("a dependency is unavailable; retry shortly")
    else:
        error = DatabaseUnavailable("database unavailable; retry shortly")
    logger.warning(
        "dependency unavailable",
        extra={"path": request.url.path, "code": error.code, "error": repr(exc)[:300]},
    )
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


async def _rolled_back(request: Request, exc: Exception) -> Response:
    """Postgres rolled the transaction back (deadlock, serialization failure): nothing was
    written and the same request can simply be sent again, so 503 with Retry-After, not a 500."""
    error = ServiceUnavailable("a concurrent transaction conflicted with this one; retry")
    logger.warning("transaction rolled back", extra={"path": request.url.path, "error": repr(exc)[:300]})
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


async def _unhandled_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", extra={"path": request.url.path})
    error = InternalError("internal server error")
    return JSONResponse(error.body(), status_code=error.status_code)


class _App(Starlette):
    """Starlette, with :class:`RequestEdge` as its whole middleware stack (see api/middleware.py):
    one layer instead of Starlette's server-error and exception middleware plus ours."""

    access_log: AccessLog
    cors: dict[str, Any]

    def build_middleware_stack(self) -> ASGIApp:
        return RequestEdge(
            self.router,
            handlers=self.exception_handlers,
            access_log=self.access_log,
            cors=self.cors,
        )


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await create_pool(
            settings.database_url, min_size=settings.db_pool_min_size, max_size=settings.db_pool_max_size
        )
        lists: SessionLists | None = None
        try:
            if settings.migrate_on_start:
                # A dedicated connection: the migration lock is session-level and must not
                # travel back into the pool if start-up is interrupted.
                conn = await asyncpg.connect(settings.database_url)
                try:
                    await apply_migrations(conn)
                finally:
                    await conn.close()
            clickhouse = None
            try:
                clickhouse = await connect_clickhouse(settings.clickhouse_url)
                if settings.migrate_on_start:
                    await apply_clickhouse_schema(clickhouse, sql_dir("clickhouse_schema"))
            except ClickHouseUnavailable as exc:
                # Lists fall back to Postgres; /readyz reports ClickHouse until it answers.
                logger.warning("clickhouse unavailable at start", extra={"error": str(exc)})
            # What requests borrow: each borrowing answers within the dependency bound.
            requests = BoundedPool(pool, timeout=settings.dependency_timeout_seconds)
            lists = SessionLists(settings, requests, clickhouse)
            objects = ObjectStore(settings, timeout=settings.dependency_timeout_seconds)
            activity = SessionActivity(pool)
            engine = StreamEngine(settings, pool, requests, objects, activity)
            subscription_service = SubscriptionService(settings, requests, pool, engine.service, engine.live)
            app.state.threadline = AppState(
                settings=settings,
                pool=requests,
                authenticator=Authenticator(
                    requests,
                    cache_seconds=settings.auth_cache_seconds,
                    jwt_leeway_seconds=settings.jwt_leeway_seconds,
                ),
                objects=objects,
                streams=engine.service,
                lists=lists,
                subscriptions=subscription_service,
            )
            replication: asyncio.Task[None] | None = None
            if settings.replication_enabled:
                consumer = ReplicationConsumer(
                    settings.database_url,
                    settings.clickhouse_url,
                    batch_rows=settings.replication_batch_rows,
                    poll_interval=settings.replication_poll_interval_seconds,
                )
                app.state.threadline.replication = consumer
                replication = asyncio.create_task(consumer.run(), name="threadline-replication")
            activity_task = asyncio.create_task(activity.run(), name="threadline-activity")
            await engine.start()
            await subscription_service.start()
            logger.info("threadline started", extra={"version": __version__})
            try:
                yield
            finally:
                await subscription_service.stop()
                await engine.stop()
                # After the appends drained: their last activity is written.
                activity_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await activity_task
                await activity.close()
                if replication is not None:
                    replication.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await replication
        finally:
            if lists is not None:
                await lists.close()
            await pool.close()

    routes = direct_routes(
        [
            *sessions.routes,
            # Before the stream routes: /v1/stream/__ds/… is the protocol's control namespace.
            *subscriptions.routes,
            *streams.routes,
            *realtime.routes,
            *health.routes,
            *openapi.routes,
            *ui.routes,
        ]
    )
    app = _App(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            DependencyUnavailable: _dependency_error,
            **dict.fromkeys(POSTGRES_UNAVAILABLE, _dependency_error),
            asyncpg.TransactionRollbackError: _rolled_back,  # class 40
            Exception: _unhandled_error,
        },
        lifespan=lifespan,
    )
    app.access_log = AccessLog.parse(settings.access_log)
    app.cors = {
        "allow_origins": settings.cors_origins(),
        "allow_methods": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        "allow_headers": CORS_ALLOW_HEADERS,
        "expose_headers": CORS_EXPOSE_HEADERS,
        "max_age": 600,
    }
    return app


def uvicorn_config(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    app: Callable[[], Starlette] | None = None,
) -> uvicorn.Config:
    """How every entry point (serve, dev, tests) runs the app: our logging, no access log.

    uvicorn's access log would print query strings, which may carry ``?token=``; requests are
    logged by :class:`RequestEdge` instead (``THREADLINE_ACCESS_LOG``). ``app``, a picklable
    factory, is for worker processes, which each build their own app (see :mod:`threadline.workers`).
    """
    return uvicorn.Config(
        create_app(settings) if app is None else app,
        factory=app is not None,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        # httptools, with each request's connection in its scope: SSE pacing and dropping.
        http=HttpProtocol,
    )
