"""Threadline's Python SDK: ``from threadline.client import Threadline, AsyncThreadline``.

Needs only httpx (``pip install threadline``; the server is ``threadline[server]``), and imports
nothing from the server's modules. Errors: see :mod:`threadline.client._errors` for the tree.
"""

from __future__ import annotations

from threadline.client._channels import AsyncChannel, AsyncStreams, Channel, Streams
from threadline.client._client import AsyncThreadline, Threadline
from threadline.client._config import RetryPolicy
from threadline.client._errors import (
    ClientClosed,
    ClientError,
    ConnectionFailed,
    GatewayFailed,
    RequestTimedOut,
    UnexpectedResponse,
    WriterFailed,
)
from threadline.client._models import (
    AppendResult,
    ChannelStats,
    ForkedFrom,
    ReadResult,
    Record,
    Session,
    SessionCounts,
    SessionToken,
    StreamInfo,
)
from threadline.client._requests import Producer, SessionFilters
from threadline.client._sessions import AsyncSessions, Sessions
from threadline.client._subscriptions import (
    AsyncClaim,
    AsyncSubscriptions,
    Claim,
    StreamCursor,
    Subscription,
    Subscriptions,
)
from threadline.client._writer import AsyncWriter, Writer, WriterState
from threadline.errors import *  # noqa: F403  (every API error class, as raised by the client)
from threadline.errors import __all__ as _api_errors

__all__ = [
    "AppendResult",
    "AsyncClaim",
    "AsyncSubscriptions",
    "Claim",
    "StreamCursor",
    "Subscription",
    "Subscriptions",
    "AsyncChannel",
    "AsyncSessions",
    "AsyncStreams",
    "AsyncThreadline",
    "AsyncWriter",
    "Channel",
    "ChannelStats",
    "ForkedFrom",
    "ClientClosed",
    "ClientError",
    "ConnectionFailed",
    "GatewayFailed",
    "Producer",
    "ReadResult",
    "Record",
    "RequestTimedOut",
    "RetryPolicy",
    "Session",
    "SessionCounts",
    "SessionFilters",
    "SessionToken",
    "Sessions",
    "StreamInfo",
    "Streams",
    "Threadline",
    "UnexpectedResponse",
    "Writer",
    "WriterFailed",
    "WriterState",
    *(
        name
        for name in _api_errors
        if name not in ("EngineError", "DependencyUnavailable", "DependencyRefused", "api_error_classes")
    ),
]
