"""The two clients: :class:`Threadline` (sync, on ``httpx.Client``) and :class:`AsyncThreadline`
(on ``httpx.AsyncClient``). Same surface; the async one's calls are awaited.

Lifecycle: a client is open from construction until ``close()`` (or the end of its ``with``
block); a closed client refuses calls with :class:`ClientClosed` and cannot be reopened.
"""

from __future__ import annotations

import httpx

from threadline.client._channels import AsyncChannel, AsyncStreams, Channel, Streams
from threadline.client._config import (
    DEFAULT_TIMEOUT,
    AsyncCredential,
    ClientConfig,
    Credential,
    RetryPolicy,
    resolve_base_url,
    resolve_credential,
)
from threadline.client._models import Io
from threadline.client._sessions import AsyncSessions, Sessions
from threadline.client._subscriptions import AsyncSubscriptions, Subscriptions
from threadline.client._transport import AsyncTransport, SyncTransport

__all__ = ["AsyncThreadline", "Threadline"]


def _config(
    base_url: str | None, timeout: float | httpx.Timeout | None, max_retries: int, reconnect_timeout: float
) -> ClientConfig:
    return ClientConfig(
        base_url=resolve_base_url(base_url),
        timeout=DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout),
        retry=RetryPolicy(max_retries=max_retries),
        reconnect_timeout=reconnect_timeout,
    )


class Threadline:
    """``Threadline(base_url=..., api_key=...)``; both default to ``THREADLINE_URL`` /
    ``THREADLINE_API_KEY``. ``api_key`` may be a callable returning a token (called again on
    every reconnect and after a 401)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: Credential | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        reconnect_timeout: float = 120.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        credential = resolve_credential(api_key)
        assert isinstance(credential, str) or callable(credential)
        self._transport = SyncTransport(
            _config(base_url, timeout, max_retries, reconnect_timeout),
            credential,  # type: ignore[arg-type]
            http_client,
        )
        self.sessions = Sessions(self._transport)
        self.streams = Streams(self._transport)
        self.subscriptions = Subscriptions(self._transport)

    @property
    def base_url(self) -> str:
        return self._transport.config.base_url

    def channel(self, session: str, io: Io) -> Channel:
        """A session channel's handle by session id or externalId, without fetching the session."""
        return self.sessions.channel(session, io)

    def close(self) -> None:
        self._transport.close()

    @property
    def is_closed(self) -> bool:
        return self._transport.closed

    def __enter__(self) -> Threadline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncThreadline:
    """The asyncio client; ``api_key`` may also be an async callable."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: AsyncCredential | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        reconnect_timeout: float = 120.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._transport = AsyncTransport(
            _config(base_url, timeout, max_retries, reconnect_timeout),
            resolve_credential(api_key),
            http_client,
        )
        self.sessions = AsyncSessions(self._transport)
        self.streams = AsyncStreams(self._transport)
        self.subscriptions = AsyncSubscriptions(self._transport)

    @property
    def base_url(self) -> str:
        return self._transport.config.base_url

    def channel(self, session: str, io: Io) -> AsyncChannel:
        return self.sessions.channel(session, io)

    async def aclose(self) -> None:
        await self._transport.close()

    @property
    def is_closed(self) -> bool:
        return self._transport.closed

    async def __aenter__(self) -> AsyncThreadline:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
