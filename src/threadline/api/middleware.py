"""The one ASGI layer every request passes: errors rendered, security headers, CORS, metrics and
the access log.

It replaces a stack of five (Starlette's server-error and exception middleware, request logging,
security headers, CORS), each of which wrapped ``send`` again: an SSE delivery paid for every
wrapper on every write, and an append for every layer's frames. Here one ``send`` wrapper looks
at the response start only; the route template for metric labels is the route Starlette already
matched (``scope["route"]``), never matched a second time; CORS runs only for requests that carry
an ``Origin``; the access log is written per ``THREADLINE_ACCESS_LOG``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline.api.connection import SERVER_SEND
from threadline.logs import AccessLog

__all__ = ["ErrorHandler", "RequestEdge", "direct_routes"]

logger = logging.getLogger("threadline.access")

REQUESTS = Counter("threadline_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "threadline_http_request_duration_seconds",
    "HTTP request duration (until the response is complete)",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)

# ``nosniff``, and a CORP that lets browsers on other origins read what CORS allows.
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
)

ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


_EXCHANGE = "threadline.exchange"


class _Exchange:
    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status: int | None = None


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])


def _route_template(scope: Scope) -> str:
    # Label by route template, never by raw path: ids in paths would explode metric cardinality.
    route = scope.get("route")
    return getattr(route, "path", "unmatched") if route is not None else "unmatched"


class RequestEdge:
    """What every HTTP request gets on its way in and out; see the module docstring.

    ``handlers`` map exception classes (looked up along the exception's MRO) to the response
    that renders them; an exception raised after the response started cannot be rendered and
    goes to the server, which closes the connection."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        handlers: Mapping[type[BaseException], ErrorHandler],
        access_log: AccessLog,
        cors: Mapping[str, Any],
    ) -> None:
        self.app = app
        self._handlers = dict(handlers)
        self._access_log = access_log
        self._cors = CORSMiddleware(self._handle, **cors)
        # prometheus_client's labels() costs a lock and a tuple per call: keep the children.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # The response's status once it started (None before): what error rendering and the
        # metrics need, learned by the one send wrapper every message passes.
        exchange = scope[_EXCHANGE] = _Exchange()
        scope[SERVER_SEND] = send

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message["headers"] = [*message.get("headers", ()), *_SECURITY_HEADERS]
            await send(message)

        try:
            if _has_origin(scope):
                await self._cors(scope, receive, send_with_headers)
            else:
                await self._handle(scope, receive, send_with_headers)
        finally:
            self._observe(scope, exchange.status or 500, time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if scope[_EXCHANGE].status is not None:
                raise
            handler = self._handler_for(exc)
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ErrorHandler:
        for cls in type(exc).__mro__:
            handler = self._handlers.get(cls)
            if handler is not None:
                return handler
        raise AssertionError("the handlers must include Exception")

    def _observe(self, scope: Scope, status: int, elapsed: float) -> None:
        method = scope["method"]
        route = _route_template(scope)
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = self._counters[(method, route, status)] = REQUESTS.labels(method, route, str(status))
        counter.inc()
        histogram = self._histograms.get((method, route))
        if histogram is None:
            histogram = self._histograms[(method, route)] = LATENCY.labels(method, route)
        histogram.observe(elapsed)
        if self._access_log.wants(status) and logger.isEnabledFor(logging.INFO):
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


class _DirectEndpoint:
    """A route's ``request -> response`` function as a plain ASGI app. Starlette wraps each
    in its own exception-handling layer per request (a closure, a send wrapper), which is
    :class:`RequestEdge`'s job here."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def direct_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """``routes``, each async function endpoint called directly (see :class:`_DirectEndpoint`);
    the path, methods and name stay, so matching and ``scope["route"]`` are unchanged."""
    direct: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, Route) and inspect.iscoroutinefunction(route.endpoint):
            route = Route(
                route.path,
                _DirectEndpoint(route.endpoint),
                methods=list(route.methods or ()),
                name=route.name,
                include_in_schema=route.include_in_schema,
            )
        direct.append(route)
    return direct
