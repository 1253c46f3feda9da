"""Client configuration: where the server is, the credential, timeouts and retries.

Arguments win over the environment (``THREADLINE_URL``, ``THREADLINE_API_KEY``). A credential is a
string, or a callable (sync, or async for :class:`AsyncThreadline`) that returns one; a callable
is called again on every reconnect and after every 401, so short-lived tokens refresh without the
caller noticing and without losing a subscription's position.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final

import httpx

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncCredential",
    "ClientConfig",
    "Credential",
    "RetryPolicy",
    "resolve_base_url",
]

Credential = str | Callable[[], str]
AsyncCredential = str | Callable[[], str] | Callable[[], Awaitable[str]]

DEFAULT_URL: Final = "http://127.0.0.1:8080"
# Reads get a generous timeout: a subscription waits on heartbeats (every 15 s by default), and a
# connection that stays silent for two of them is dead, so it is dropped and resumed.
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)
SUBSCRIBE_READ_TIMEOUT: Final = 45.0


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("THREADLINE_URL") or DEFAULT_URL).rstrip("/")


def resolve_credential(api_key: AsyncCredential | None) -> AsyncCredential:
    if api_key is not None:
        return api_key
    key = os.environ.get("THREADLINE_API_KEY")
    if not key:
        raise ValueError("pass api_key=... or set THREADLINE_API_KEY")
    return key


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying again.

    Retried: connection failures, timeouts and 503 answers (waiting ``Retry-After`` when the
    server sends it). A request that may have reached the server (a timed-out POST) is retried
    only if repeating it cannot apply it twice (producer headers, an ``externalId`` create, a close).
    """

    max_retries: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0

    def backoff(self, attempt: int, headers: Mapping[str, str] | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0)."""
        retry_after = _retry_after(headers.get("retry-after")) if headers is not None else None
        if retry_after is not None:
            return float(min(retry_after, self.max_backoff * 4))
        ceiling = min(self.max_backoff, self.initial_backoff * (2.0**attempt))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    base_url: str
    timeout: httpx.Timeout
    retry: RetryPolicy
    # How long a subscription keeps reconnecting to a server that does not answer before it gives up.
    reconnect_timeout: float = 120.0
