"""HS256 JWTs signed with an environment's secret.

The environment is named by the ``env`` claim, so the server knows which secret to verify with;
the claim is read unverified only to pick the key, and the token counts only once the signature
checks out. ``alg`` is pinned to HS256: ``none`` and asymmetric algorithms are refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from threadline.errors import EngineError

__all__ = [
    "ALGORITHM",
    "InvalidToken",
    "TokenClaims",
    "looks_like_jwt",
    "mint_token",
    "read_unverified_env",
    "verify_token",
]

ALGORITHM = "HS256"


class InvalidToken(EngineError):
    """A JWT that is malformed, badly signed, expired or of the wrong algorithm."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    environment_id: str
    subject: str
    scopes: frozenset[str]
    expires_at: int


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2


def mint_token(
    *, secret: str, environment_id: str, scopes: Iterable[str], ttl_seconds: int, subject: str
) -> tuple[str, int]:
    """Return ``(token, exp)``."""
    now = int(time.time())
    exp = now + ttl_seconds
    claims = {
        "env": environment_id,
        "sub": subject,
        "scopes": sorted(scopes),
        "iat": now,
        "exp": exp,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM), exp


def read_unverified_env(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise InvalidToken("malformed token") from exc
    if header.get("alg") != ALGORITHM:
        raise InvalidToken(f"token algorithm must be {ALGORITHM}")
    env = claims.get("env")
    if not isinstance(env, str) or not env:
        raise InvalidToken("token has no env claim")
    return env


def _parse_scopes(claims: dict[str, Any]) -> frozenset[str]:
    raw = claims.get("scopes", claims.get("scope", []))
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise InvalidToken("scopes claim must be a list of strings or a space-separated string")
    return frozenset(raw)


def verify_token(token: str, *, secret: str, leeway_seconds: int) -> TokenClaims:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=leeway_seconds,
            options={"require": ["exp", "env"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("token expired") from exc
    except jwt.PyJWTError as exc:
        raise InvalidToken("invalid token") from exc
    return TokenClaims(
        environment_id=str(claims["env"]),
        subject=str(claims.get("sub", "")),
        scopes=_parse_scopes(claims),
        expires_at=int(claims["exp"]),
    )
