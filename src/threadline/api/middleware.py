"""ASGI middleware: request logging + metrics, and headers every response carries."""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestObservabilityMiddleware", "SecurityHeadersMiddleware"]

logger = logging.getLogger("threadline.access")

REQUESTS = Counter("threadline_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "threadline_http_request_duration_seconds",
    "HTTP request duration (until the response is complete)",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)


def _route_template(router: Router, scope: Scope) -> str:
    # Label by route template, never by raw path: ids in paths would explode metric cardinality.
    for route in router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


class RequestObservabilityMiddleware:
    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(self.router, scope)
            method = scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(elapsed)
            # The path only: query strings may carry ?token= and are never logged.
            logger.info(
                "request",
                extra={
                    "method": method,
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )


class SecurityHeadersMiddleware:
    """``nosniff`` and a CORP that lets browsers on other origins read what CORS allows."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"cross-origin-resource-policy", b"cross-origin"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)
