"""Sending requests: credentials, retries with backoff, and mapping failures to the SDK's errors.

:class:`Attempts` decides (no I/O) what happens after each try; :class:`SyncTransport` and
:class:`AsyncTransport` only send, sleep and call the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from threadline.client._config import (
    SUBSCRIBE_READ_TIMEOUT,
    AsyncCredential,
    ClientConfig,
    Credential,
    RetryPolicy,
)
from threadline.client._errors import (
    ClientClosed,
    ConnectionFailed,
    GatewayFailed,
    RequestTimedOut,
    error_from_response,
)
from threadline.client._requests import Request
from threadline.errors import OutcomeUnknown, ServiceUnavailable, ThreadlineError

__all__ = ["AsyncTransport", "Attempts", "SyncTransport", "transport_error"]

# Failures where the request never left: always safe to try again.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def transport_error(exc: httpx.TransportError) -> ThreadlineError:
    """httpx's failure as the SDK's (``raise transport_error(exc) from exc``)."""
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimedOut(f"no answer in time ({type(exc).__name__})")
    return ConnectionFailed(f"connection failed: {exc or type(exc).__name__}")


def raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.headers, response.content)


def is_retryable(exc: BaseException) -> bool:
    """A failure a subscription or writer rides out by reconnecting or resending."""
    return isinstance(exc, ConnectionFailed | ServiceUnavailable | httpx.TransportError)


class Attempts:
    """One request's tries. Each ``after_*`` returns the seconds to wait before the next try, or
    raises what the caller should see; :attr:`refresh` says the credential must be fetched again."""

    def __init__(self, policy: RetryPolicy, request: Request, *, refreshable: bool) -> None:
        self.policy = policy
        self.request = request
        self.refreshable = refreshable
        self.attempt = 0
        self.refresh = False
        self._refreshed = False

    def after_response(self, response: httpx.Response) -> float | None:
        """``None``: the answer is the result."""
        self.refresh = False
        status = response.status_code
        if status < 400:
            return None
        if status == 401 and self.refreshable and not self._refreshed:
            self.refresh = self._refreshed = True
            return 0.0
        error = error_from_response(status, response.headers, response.content)
        if self.attempt >= self.policy.max_retries:
            raise error
        if isinstance(error, GatewayFailed) and self._may_repeat():
            # A proxy lost the answer: like a dropped connection, repeated only if harmless.
            self.attempt += 1
            return self.policy.backoff(self.attempt - 1)
        if status == 503:
            if isinstance(error, OutcomeUnknown) and not self.request.idempotent:
                # The server could not tell whether this append was stored: sending it again
                # could store it twice. Only the caller (or a producer's retry) may decide.
                raise error
            self.attempt += 1
            return self.policy.backoff(self.attempt - 1, response.headers)
        raise error

    def _may_repeat(self) -> bool:
        """A request that may have reached the server is repeated only if it cannot apply twice."""
        return self.request.idempotent or self.request.method in ("GET", "HEAD")

    def after_error(self, exc: httpx.TransportError) -> float:
        safe = isinstance(exc, _NOT_SENT) or self._may_repeat()
        if not safe or self.attempt >= self.policy.max_retries:
            raise transport_error(exc) from exc
        self.attempt += 1
        return self.policy.backoff(self.attempt - 1)


class SyncTransport:
    def __init__(
        self, config: ClientConfig, credential: Credential, http: httpx.Client | None = None
    ) -> None:
        self.config = config
        self._credential = credential
        self._token: str | None = None
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=config.base_url, timeout=config.timeout)
        self.closed = False

    def token(self, *, refresh: bool = False) -> str:
        if isinstance(self._credential, str):
            return self._credential
        if refresh or self._token is None:
            value: Any = self._credential()
            if inspect.isawaitable(value):
                raise TypeError("the sync client needs a sync api_key callable; use AsyncThreadline")
            self._token = str(value)
        return self._token

    def send(self, request: Request) -> httpx.Response:
        self._check_open()
        attempts = Attempts(self.config.retry, request, refreshable=not isinstance(self._credential, str))
        while True:
            try:
                response = self.http.send(request.build(self.http, self.token(refresh=attempts.refresh)))
            except httpx.TransportError as exc:
                delay = attempts.after_error(exc)
            else:
                retry = attempts.after_response(response)
                if retry is None:
                    return response
                delay = retry
            time.sleep(delay)

    @contextlib.contextmanager
    def stream(self, request: Request, *, refresh: bool) -> Iterator[httpx.Response]:
        """One streaming try (the caller reconnects); error answers are raised."""
        self._check_open()
        timeout = _stream_timeout(self.config)
        built = request.build(self.http, self.token(refresh=refresh), timeout=timeout)
        try:
            response = self.http.send(built, stream=True)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        try:
            if response.status_code >= 400:
                response.read()
                raise_for_status(response)
            yield response
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            response.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosed("this Threadline client is closed")

    def close(self) -> None:
        self.closed = True
        if self._owns_http:
            self.http.close()


class AsyncTransport:
    def __init__(
        self, config: ClientConfig, credential: AsyncCredential, http: httpx.AsyncClient | None = None
    ) -> None:
        self.config = config
        self._credential = credential
        self._token: str | None = None
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(base_url=config.base_url, timeout=config.timeout)
        self.closed = False

    async def token(self, *, refresh: bool = False) -> str:
        if isinstance(self._credential, str):
            return self._credential
        if refresh or self._token is None:
            value: Any = self._credential()
            if inspect.isawaitable(value):
                value = await value
            self._token = str(value)
        return self._token

    async def send(self, request: Request) -> httpx.Response:
        self._check_open()
        attempts = Attempts(self.config.retry, request, refreshable=not isinstance(self._credential, str))
        while True:
            try:
                token = await self.token(refresh=attempts.refresh)
                response = await self.http.send(request.build(self.http, token))
            except httpx.TransportError as exc:
                delay = attempts.after_error(exc)
            else:
                retry = attempts.after_response(response)
                if retry is None:
                    return response
                delay = retry
            await asyncio.sleep(delay)

    @contextlib.asynccontextmanager
    async def stream(self, request: Request, *, refresh: bool) -> AsyncIterator[httpx.Response]:
        """One streaming try (the caller reconnects); error answers are raised."""
        self._check_open()
        timeout = _stream_timeout(self.config)
        built = request.build(self.http, await self.token(refresh=refresh), timeout=timeout)
        try:
            response = await self.http.send(built, stream=True)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        try:
            if response.status_code >= 400:
                await response.aread()
                raise_for_status(response)
            yield response
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await response.aclose()

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosed("this AsyncThreadline client is closed")

    async def close(self) -> None:
        self.closed = True
        if self._owns_http:
            await self.http.aclose()


def _stream_timeout(config: ClientConfig) -> httpx.Timeout:
    """A subscription's timeouts: the client's, but reads wait out the server's heartbeats."""
    limits = config.timeout.as_dict()
    limits["read"] = max(SUBSCRIBE_READ_TIMEOUT, limits["read"] or 0.0)
    return httpx.Timeout(**limits)
