"""Sending one webhook: the allow-list re-checked with fresh DNS, the Ed25519 signature, the POST,
and what the answer means. No state: the service decides what a success or a failure does to the
subscription (ack, retry schedule)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from threadline.errors import WebhookUrlRejected
from threadline.subscriptions.webhooks import SigningKey, WebhookPolicy, signature_header

__all__ = ["DeliveryFailed", "WebhookSender"]


class DeliveryFailed(Exception):
    """The receiver did not take the wake (refused, unreachable, non-2xx, or no longer allowed)."""


class WebhookSender:
    def __init__(self, policy: WebhookPolicy, *, timeout_seconds: float) -> None:
        self._policy = policy
        # Redirects are not followed: a redirect could lead anywhere the allow-list forbids.
        self._http = httpx.AsyncClient(timeout=timeout_seconds, follow_redirects=False, trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, url: str, payload: dict[str, Any], key: SigningKey) -> bool:
        """POST the signed wake; True when the receiver answered ``{"done": true}`` (§7.1)."""
        body = orjson.dumps(payload)
        try:
            await self._policy.check_delivery(url)
            response = await self._http.post(
                url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "Webhook-Signature": signature_header(key, int(time.time()), body),
                },
            )
        except (httpx.HTTPError, WebhookUrlRejected, OSError) as exc:
            raise DeliveryFailed(str(exc) or type(exc).__name__) from exc
        if not response.is_success:
            raise DeliveryFailed(f"webhook answered {response.status_code}")
        return _json_object(response.content).get("done") is True


def _json_object(content: bytes) -> dict[str, Any]:
    """The answer as an object ({} when it is not one: only {"done": true} means anything)."""
    try:
        value = orjson.loads(content) if content.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
