"""``client.subscriptions``: Durable Streams subscriptions (create, get, delete, membership) and
pull-wake work: ``claim()`` returns a :class:`Claim` whose ``ack()`` / ``release()`` carry the
claim's own token, so a worker needs nothing else to settle its wake.

    with client.subscriptions.claim("agents", worker="w1") as claim:   # released on error
        for stream in claim.pending:
            ...  # read stream.path from stream.acked_offset, handle, then:
        claim.ack({s.path: s.tail_offset for s in claim.pending}, done=True)

A claim whose lease ran out (the worker was too slow, or another took over) raises ``Fenced``
on ack: nothing it acked after that point moved a cursor.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

from threadline.client._requests import JSON, Request, json_body
from threadline.client._transport import AsyncTransport, SyncTransport
from threadline.errors import Fenced

__all__ = [
    "AsyncClaim",
    "AsyncSubscriptions",
    "Claim",
    "StreamCursor",
    "Subscription",
    "Subscriptions",
]

_PREFIX = "/v1/stream/__ds/subscriptions/"


@dataclass(frozen=True, slots=True)
class StreamCursor:
    """One linked stream: ``acked_offset`` is where the next read starts; a claim or webhook also
    says where the stream ends (``tail_offset``) and whether there is work (``has_pending``)."""

    path: str
    link_type: str
    acked_offset: str
    tail_offset: str | None = None
    has_pending: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StreamCursor:
        return cls(
            path=data["path"],
            link_type=data["link_type"],
            acked_offset=data["acked_offset"],
            tail_offset=data.get("tail_offset"),
            has_pending=bool(data.get("has_pending", False)),
        )


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    type: str
    pattern: str | None
    streams: list[StreamCursor]
    webhook: Mapping[str, Any] | None
    wake_stream: str | None
    lease_ttl_ms: int
    status: str
    description: str | None
    session_type: str | None
    created: bool  # this call created it (False: it existed with the same configuration)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, created: bool = False) -> Subscription:
        return cls(
            id=data["id"],
            type=data["type"],
            pattern=data.get("pattern"),
            streams=[StreamCursor.from_json(item) for item in data.get("streams", [])],
            webhook=data.get("webhook"),
            wake_stream=data.get("wake_stream"),
            lease_ttl_ms=int(data["lease_ttl_ms"]),
            status=data.get("status", "active"),
            description=data.get("description"),
            session_type=data.get("session_type"),
            created=created,
        )


def _path(subscription_id: str, tail: str = "") -> str:
    return _PREFIX + quote(subscription_id, safe="") + tail


def _json(method: str, path: str, data: Mapping[str, Any], *, token: str | None = None) -> Request:
    headers = {"Content-Type": JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"  # the wake's token, not the client's key
    return Request(method, path, body=json.dumps(data).encode(), headers=headers)


def _put(
    subscription_id: str,
    *,
    type: Literal["webhook", "pull-wake"],
    pattern: str | None,
    streams: Sequence[str] | None,
    webhook_url: str | None,
    wake_stream: str | None,
    lease_ttl_ms: int | None,
    description: str | None,
    session_type: str | None,
) -> Request:
    body: dict[str, Any] = {"type": type}
    optional: dict[str, Any] = {
        "pattern": pattern,
        "streams": list(streams) if streams is not None else None,
        "webhook": {"url": webhook_url} if webhook_url is not None else None,
        "wake_stream": wake_stream,
        "lease_ttl_ms": lease_ttl_ms,
        "description": description,
        "session_type": session_type,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    # Idempotent by design (same configuration: 200), so safe to resend.
    request = _json("PUT", _path(subscription_id), body)
    return Request(request.method, request.path, body=request.body, headers=request.headers, idempotent=True)


def _subscription(response: httpx.Response) -> Subscription:
    return Subscription.from_json(json_body(response), created=response.status_code == 201)


class _ClaimBase:
    def __init__(self, subscription_id: str, data: Mapping[str, Any]) -> None:
        self.subscription_id = subscription_id
        self.wake_id: str = data["wake_id"]
        self.generation: int = int(data["generation"])
        self.token: str = data["token"]
        self.lease_ttl_ms: int = int(data["lease_ttl_ms"])
        self.streams = [StreamCursor.from_json(item) for item in data["streams"]]
        self.settled = False

    @property
    def pending(self) -> list[StreamCursor]:
        """The streams with records past their acked offset when the claim was granted."""
        return [stream for stream in self.streams if stream.has_pending]

    def _ack_request(self, offsets: Mapping[str, str], done: bool) -> Request:
        acks = [{"stream": stream, "offset": offset} for stream, offset in offsets.items()]
        body = {"wake_id": self.wake_id, "generation": self.generation, "acks": acks, "done": done}
        return _json("POST", _path(self.subscription_id, "/ack"), body, token=self.token)

    def _release_request(self) -> Request:
        body = {"wake_id": self.wake_id, "generation": self.generation}
        return _json("POST", _path(self.subscription_id, "/release"), body, token=self.token)


class Claim(_ClaimBase):
    """A held lease. ``ack(offsets)`` without ``done`` also extends the lease (a heartbeat)."""

    def __init__(self, transport: SyncTransport, subscription_id: str, data: Mapping[str, Any]) -> None:
        super().__init__(subscription_id, data)
        self._transport = transport

    def ack(self, offsets: Mapping[str, str] | None = None, *, done: bool = False) -> bool:
        """Ack ``{stream path: offset}`` (inclusive). Returns ``next_wake`` (work left after done)."""
        response = self._transport.send(self._ack_request(offsets or {}, done))
        self.settled = self.settled or done
        return bool(json_body(response).get("next_wake", False))

    def release(self) -> None:
        self._transport.send(self._release_request())
        self.settled = True

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.settled and exc_type is not None:
            # A fenced claim has nothing left to release.
            with contextlib.suppress(Fenced):
                self.release()


class AsyncClaim(_ClaimBase):
    def __init__(self, transport: AsyncTransport, subscription_id: str, data: Mapping[str, Any]) -> None:
        super().__init__(subscription_id, data)
        self._transport = transport

    async def ack(self, offsets: Mapping[str, str] | None = None, *, done: bool = False) -> bool:
        response = await self._transport.send(self._ack_request(offsets or {}, done))
        self.settled = self.settled or done
        return bool(json_body(response).get("next_wake", False))

    async def release(self) -> None:
        await self._transport.send(self._release_request())
        self.settled = True

    async def __aenter__(self) -> AsyncClaim:
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if not self.settled and exc_type is not None:
            with contextlib.suppress(Fenced):
                await self.release()


class Subscriptions:
    def __init__(self, transport: SyncTransport) -> None:
        self._transport = transport

    def create(
        self,
        subscription_id: str,
        *,
        type: Literal["webhook", "pull-wake"],
        pattern: str | None = None,
        streams: Sequence[str] | None = None,
        webhook_url: str | None = None,
        wake_stream: str | None = None,
        lease_ttl_ms: int | None = None,
        description: str | None = None,
        session_type: str | None = None,
    ) -> Subscription:
        """Create, or re-confirm with the same configuration (``created`` False); a different
        configuration under the same id raises ``SubscriptionExists``."""
        return _subscription(
            self._transport.send(
                _put(
                    subscription_id,
                    type=type,
                    pattern=pattern,
                    streams=streams,
                    webhook_url=webhook_url,
                    wake_stream=wake_stream,
                    lease_ttl_ms=lease_ttl_ms,
                    description=description,
                    session_type=session_type,
                )
            )
        )

    def get(self, subscription_id: str) -> Subscription:
        return _subscription(self._transport.send(Request("GET", _path(subscription_id))))

    def delete(self, subscription_id: str) -> None:
        self._transport.send(Request("DELETE", _path(subscription_id), idempotent=True))

    def add_streams(self, subscription_id: str, streams: Sequence[str]) -> None:
        self._transport.send(_json("POST", _path(subscription_id, "/streams"), {"streams": list(streams)}))

    def remove_stream(self, subscription_id: str, stream: str) -> None:
        path = _path(subscription_id, "/streams/" + quote(stream, safe=""))
        self._transport.send(Request("DELETE", path, idempotent=True))

    def claim(self, subscription_id: str, *, worker: str) -> Claim:
        """Take the lease; ``AlreadyClaimed`` (``details["current_holder"]``) if another holds it."""
        response = self._transport.send(_json("POST", _path(subscription_id, "/claim"), {"worker": worker}))
        return Claim(self._transport, subscription_id, json_body(response))


class AsyncSubscriptions:
    def __init__(self, transport: AsyncTransport) -> None:
        self._transport = transport

    async def create(
        self,
        subscription_id: str,
        *,
        type: Literal["webhook", "pull-wake"],
        pattern: str | None = None,
        streams: Sequence[str] | None = None,
        webhook_url: str | None = None,
        wake_stream: str | None = None,
        lease_ttl_ms: int | None = None,
        description: str | None = None,
        session_type: str | None = None,
    ) -> Subscription:
        return _subscription(
            await self._transport.send(
                _put(
                    subscription_id,
                    type=type,
                    pattern=pattern,
                    streams=streams,
                    webhook_url=webhook_url,
                    wake_stream=wake_stream,
                    lease_ttl_ms=lease_ttl_ms,
                    description=description,
                    session_type=session_type,
                )
            )
        )

    async def get(self, subscription_id: str) -> Subscription:
        return _subscription(await self._transport.send(Request("GET", _path(subscription_id))))

    async def delete(self, subscription_id: str) -> None:
        await self._transport.send(Request("DELETE", _path(subscription_id), idempotent=True))

    async def add_streams(self, subscription_id: str, streams: Sequence[str]) -> None:
        await self._transport.send(
            _json("POST", _path(subscription_id, "/streams"), {"streams": list(streams)})
        )

    async def remove_stream(self, subscription_id: str, stream: str) -> None:
        path = _path(subscription_id, "/streams/" + quote(stream, safe=""))
        await self._transport.send(Request("DELETE", path, idempotent=True))

    async def claim(self, subscription_id: str, *, worker: str) -> AsyncClaim:
        response = await self._transport.send(
            _json("POST", _path(subscription_id, "/claim"), {"worker": worker})
        )
        return AsyncClaim(self._transport, subscription_id, json_body(response))
