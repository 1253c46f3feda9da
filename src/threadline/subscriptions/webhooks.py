"""Webhook safety and signing: which URLs the server may call, how it signs what it sends, and
when it retries.

Destinations (protocol §6.2, §12.8): the operator lists allowed hosts in
``THREADLINE_WEBHOOK_ALLOWED_HOSTS``; nothing else is ever called. ``*`` or ``*.example.com``
admit public hosts over https only; a private, loopback, link-local or otherwise non-global
address (written literally or resolved from the name) is refused unless its host is listed
exactly, which is also the only way to allow plain http (a local development receiver). The
check runs when a subscription is created and again, with a fresh DNS answer, before every
delivery, so a name that later resolves to an internal address is not called.

Signing (§7.1): ``Webhook-Signature: t=<unix seconds>,kid=<key id>,ed25519=<base64url>`` over
``<t>.<raw body>`` with the server's Ed25519 key, whose public half the JWKS endpoint publishes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import random
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from threadline.errors import WebhookUrlRejected

__all__ = [
    "SigningKey",
    "WebhookPolicy",
    "retry_delay_seconds",
    "signature_header",
]

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
RETRY_JITTER = 0.2
_RNG = random.Random()
_RESOLVE_SECONDS = 5.0


def retry_delay_seconds(attempt: int, *, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): 1 s doubling to 60 s, ±20% jitter (§7.1),
    so receivers that failed together do not all get retried in the same instant."""
    base = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** max(0, attempt - 1))
    jitter: float = (rng or _RNG).uniform(-RETRY_JITTER, RETRY_JITTER)
    return base * (1 + jitter)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One Ed25519 webhook signing key. ``kid`` derives from the public key, so it is stable and
    unique for the key's lifetime."""

    kid: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private_bytes(Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SigningKey:
        private = Ed25519PrivateKey.from_private_bytes(raw)
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(kid="ds_" + _b64url(hashlib.sha256(public).digest())[:22], private=private)

    def private_bytes(self) -> bytes:
        return self.private.private_bytes_raw()

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
            "x": _b64url(raw),
        }

    def sign(self, timestamp: int, body: bytes) -> str:
        return _b64url(self.private.sign(f"{timestamp}.".encode() + body))


def signature_header(key: SigningKey, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},kid={key.kid},ed25519={key.sign(timestamp, body)}"


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _is_public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


class WebhookPolicy:
    """The operator's allow-list of webhook hosts (``THREADLINE_WEBHOOK_ALLOWED_HOSTS``)."""

    def __init__(self, allowed_hosts: str) -> None:
        entries = [entry.strip().lower().rstrip(".") for entry in allowed_hosts.split(",")]
        entries = [entry for entry in entries if entry]
        self.any_public = "*" in entries
        self.suffixes = tuple(entry[1:] for entry in entries if entry.startswith("*.") and len(entry) > 2)
        self.exact = frozenset(entry.strip("[]") for entry in entries if not entry.startswith("*"))

    def check_url(self, url: str) -> tuple[str, bool]:
        """``(host, listed exactly)`` when the URL's shape and host are allowed; raises
        :class:`WebhookUrlRejected` otherwise. Addresses are checked separately (they need DNS)."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower().rstrip(".")
            _ = parts.port  # a malformed port raises here
        except ValueError:
            raise WebhookUrlRejected("webhook.url is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not host:
            raise WebhookUrlRejected("webhook.url must be an http(s) URL with a host")
        if parts.username is not None or parts.password is not None:
            raise WebhookUrlRejected("webhook.url must not carry credentials")
        exact = host in self.exact
        wildcard = self.any_public or any(host.endswith(suffix) for suffix in self.suffixes)
        if not exact and not wildcard:
            raise WebhookUrlRejected(
                f"webhook host {host!r} is not allowed by this server (THREADLINE_WEBHOOK_ALLOWED_HOSTS)"
            )
        if parts.scheme != "https" and not exact:
            raise WebhookUrlRejected(
                "webhook.url must use https (http only for hosts the operator lists exactly)"
            )
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not exact and not _is_public(literal):
            raise WebhookUrlRejected("webhook.url points at a private, loopback or link-local address")
        return host, exact

    async def check_delivery(self, url: str) -> None:
        """Re-check ``url`` right before a delivery, resolving its host: a name allowed by a
        wildcard must resolve only to public addresses."""
        host, exact = self.check_url(url)
        if exact:
            return
        port = urlsplit(url).port or 443
        try:
            async with asyncio.timeout(_RESOLVE_SECONDS):  # a stalled resolver is a refusal, not a hang
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise WebhookUrlRejected(f"webhook host {host!r} does not resolve: {exc!r}") from None
        for info in infos:
            try:
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            except ValueError:
                raise WebhookUrlRejected(f"webhook host {host!r} resolves to an unusable address") from None
            if not _is_public(address):
                raise WebhookUrlRejected(f"webhook host {host!r} resolves to a non-public address")
