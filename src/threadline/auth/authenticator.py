"""Turn a request's credential into a :class:`Principal`.

A resolved credential is cached for ``auth_cache_seconds`` so the append path does not pay a
Postgres round trip per request; a revoked key therefore stops working within that time on every
instance.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import HTTPConnection

from threadline.auth.keys import find_key, hash_key
from threadline.auth.principal import Environment, Principal
from threadline.auth.tokens import InvalidToken, looks_like_jwt, read_unverified_env, verify_token
from threadline.db import ConnectionSource
from threadline.errors import Unauthorized
from threadline.ids import SECRET_KEY_PREFIX

__all__ = ["Authenticator"]

_ALL = frozenset({"admin"})


class _TtlCache:
    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._entries: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: Any, value: Any) -> None:
        if self._ttl <= 0:
            return
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self._ttl, value)


class Authenticator:
    def __init__(self, pool: ConnectionSource, *, cache_seconds: float, jwt_leeway_seconds: int) -> None:
        self._pool = pool
        self._leeway = jwt_leeway_seconds
        self._keys = _TtlCache(cache_seconds)
        self._secrets = _TtlCache(cache_seconds)

    async def authenticate(self, conn: HTTPConnection, *, allow_query_token: bool = False) -> Principal:
        credential = self._credential(conn, allow_query_token=allow_query_token)
        if credential.startswith(SECRET_KEY_PREFIX):
            return await self._from_secret_key(credential)
        if looks_like_jwt(credential):
            return await self._from_jwt(credential)
        raise Unauthorized("credential is neither a secret key (tl_sk_…) nor a JWT")

    @staticmethod
    def _credential(conn: HTTPConnection, *, allow_query_token: bool) -> str:
        header = conn.headers.get("authorization")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("Authorization header must be 'Bearer <key or token>'")
            return value.strip()
        if allow_query_token and (token := conn.query_params.get("token")):
            if token.startswith(SECRET_KEY_PREFIX):
                # URLs end up in logs, proxies and browser history; a secret key there is leaked.
                raise Unauthorized(
                    "secret keys are never accepted in URLs: send it as 'Authorization: Bearer', "
                    "or put a session token (POST /api/v1/sessions/{session}/tokens) in ?token="
                )
            return token
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <key or token>'")

    async def _from_secret_key(self, key: str) -> Principal:
        digest = hash_key(key)
        found = self._keys.get(digest)
        if found is None:
            async with self._pool.acquire() as conn:
                found = await find_key(conn, key)
            if found is None:
                raise Unauthorized("unknown or revoked API key")
            self._keys.put(digest, found)
        key_id, environment = found
        return Principal(environment=environment, kind="secret_key", subject=key_id, scopes=_ALL)

    async def _from_jwt(self, token: str) -> Principal:
        try:
            env_id = read_unverified_env(token)
        except InvalidToken as exc:
            raise Unauthorized(str(exc)) from None
        cached = self._secrets.get(env_id)
        if cached is None:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT id, project_id, organization_id, signing_secret FROM environments WHERE id = $1",
                    env_id,
                )
            if row is None:
                # Same answer as a bad signature: do not reveal which environments exist.
                raise Unauthorized("invalid token")
            cached = (
                Environment(row["id"], row["project_id"], row["organization_id"]),
                row["signing_secret"],
            )
            self._secrets.put(env_id, cached)
        environment, secret = cached
        try:
            claims = verify_token(token, secret=secret, leeway_seconds=self._leeway)
        except InvalidToken as exc:
            raise Unauthorized(str(exc)) from None
        return Principal(environment=environment, kind="jwt", subject=claims.subject, scopes=claims.scopes)
