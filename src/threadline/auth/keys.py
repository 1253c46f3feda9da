"""Tenancy bootstrap and secret API keys.

Keys are 256-bit random strings, so a plain SHA-256 is enough to store them: there is nothing to
brute-force, and lookup by hash stays a single index probe on the hot path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from threadline.auth.principal import Environment
from threadline.db import Conn
from threadline.ids import SECRET_KEY_PREFIX, new_id, new_secret_key, new_signing_secret

__all__ = [
    "ApiKey",
    "bootstrap_environment",
    "create_api_key",
    "find_key",
    "hash_key",
    "list_api_keys",
    "revoke_api_key",
    "signing_secret",
]

_DISPLAY_PREFIX_LENGTH = len(SECRET_KEY_PREFIX) + 6


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    environment_id: str
    name: str
    key_prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        environment_id=row["environment_id"],
        name=row["name"],
        key_prefix=row["key_prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


async def bootstrap_environment(
    conn: Conn,
    *,
    organization: str = "default",
    project: str = "default",
    environment: str = "dev",
) -> Environment:
    """Create (or find) ``organization/project/environment`` by slug; safe to run concurrently."""
    async with conn.transaction():
        org_id = await conn.fetchval(
            """INSERT INTO organizations (id, slug, name) VALUES ($1, $2, $2)
               ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id""",
            new_id("org"),
            organization,
        )
        project_id = await conn.fetchval(
            """INSERT INTO projects (id, organization_id, slug, name) VALUES ($1, $2, $3, $3)
               ON CONFLICT (organization_id, slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id""",
            new_id("proj"),
            org_id,
            project,
        )
        env_id = await conn.fetchval(
            """INSERT INTO environments (id, organization_id, project_id, slug, signing_secret)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (project_id, slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id""",
            new_id("env"),
            org_id,
            project_id,
            environment,
            new_signing_secret(),
        )
    return Environment(id=env_id, project_id=project_id, organization_id=org_id)


async def create_api_key(conn: Conn, environment_id: str, name: str) -> tuple[ApiKey, str]:
    """Return the stored key and its plaintext, which is never retrievable again."""
    plaintext = new_secret_key()
    row = await conn.fetchrow(
        """INSERT INTO api_keys (id, environment_id, name, key_prefix, key_hash)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        new_id("key"),
        environment_id,
        name,
        plaintext[:_DISPLAY_PREFIX_LENGTH],
        hash_key(plaintext),
    )
    assert row is not None
    return _api_key(row), plaintext


async def list_api_keys(conn: Conn, environment_id: str | None = None) -> list[ApiKey]:
    rows = await conn.fetch(
        "SELECT * FROM api_keys WHERE $1::text IS NULL OR environment_id = $1 ORDER BY created_at",
        environment_id,
    )
    return [_api_key(row) for row in rows]


async def revoke_api_key(conn: Conn, key_id: str) -> ApiKey | None:
    """Revoke by id; revoking twice keeps the first revocation time. None if no such key."""
    row = await conn.fetchrow(
        """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING *""",
        key_id,
    )
    return None if row is None else _api_key(row)


async def find_key(conn: Conn, key: str) -> tuple[str, Environment] | None:
    """Resolve a live secret key to ``(key_id, environment)``."""
    row = await conn.fetchrow(
        """UPDATE api_keys k SET last_used_at = now()
           FROM environments e
           WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND e.id = k.environment_id
           RETURNING k.id, e.id AS env_id, e.project_id, e.organization_id""",
        hash_key(key),
    )
    if row is None:
        return None
    return row["id"], Environment(row["env_id"], row["project_id"], row["organization_id"])


async def signing_secret(conn: Conn, environment_id: str) -> str:
    """The secret the environment's JWTs are signed with (HS256)."""
    secret = await conn.fetchval("SELECT signing_secret FROM environments WHERE id = $1", environment_id)
    if secret is None:
        raise LookupError(f"environment {environment_id!r} does not exist")
    return str(secret)
