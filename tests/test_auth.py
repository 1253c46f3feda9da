"""Credentials against the real server: secret keys, JWT scopes, and how failures answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import Tenant, assert_error, bearer


@pytest.fixture(scope="module")
def signing_secret(db: Any, tenant: Tenant) -> str:
    secret: str = db(
        "fetchval", "SELECT signing_secret FROM environments WHERE id = $1", tenant.environment_id
    )
    return secret


def make_jwt(secret: str, env: str, scopes: list[str], *, exp_in: int = 300, **extra: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"env": env, "sub": "test", "scopes": scopes, "iat": now, "exp": now + exp_in}
    claims.update(extra)
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture
def two_sessions(client: httpx.Client) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    a = client.post(
        "/api/v1/sessions", json={"type": "auth", "externalId": f"a-{uuid.uuid4().hex[:8]}"}
    ).json()
    b = client.post("/api/v1/sessions", json={"type": "auth"}).json()
    return a, b


def test_missing_and_malformed_credentials_are_401(anon: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}, bearer("garbage")):
        response = anon.get("/api/v1/sessions", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_unknown_and_revoked_keys_are_401(anon: httpx.Client, settings: Any) -> None:
    from tests.conftest import make_tenant

    assert_error(anon.get("/api/v1/sessions", headers=bearer("tl_sk_" + "x" * 43)), 401)
    fresh = make_tenant(settings, "revocation")
    assert anon.get("/api/v1/sessions", headers=bearer(fresh.key)).status_code == 200
    from tests.conftest import run

    async def revoke() -> None:
        import asyncpg

        from threadline.auth.keys import revoke_api_key

        conn = await asyncpg.connect(settings.database_url)
        try:
            await revoke_api_key(conn, fresh.key_id)
        finally:
            await conn.close()

    run(revoke())
    assert_error(anon.get("/api/v1/sessions", headers=bearer(fresh.key)), 401)


def test_keys_are_stored_hashed(db: Any, tenant: Tenant) -> None:
    row = db("fetchrow", "SELECT key_prefix, key_hash FROM api_keys WHERE id = $1", tenant.key_id)
    assert tenant.key.startswith(row["key_prefix"])
    assert len(row["key_prefix"]) < 16
    assert tenant.key.encode() not in bytes(row["key_hash"])
    dump = db("fetchval", "SELECT string_agg(t::text, ' ') FROM api_keys t")
    assert tenant.key not in dump


def test_expired_forged_none_and_foreign_tokens_are_401(
    anon: httpx.Client, signing_secret: str, tenant: Tenant, other_tenant: Tenant, db: Any
) -> None:
    env = tenant.environment_id
    expired = make_jwt(signing_secret, env, ["admin"], exp_in=-3600)
    forged = make_jwt("not-the-secret-but-long-enough-for-hs256", env, ["admin"])
    no_exp = jwt.encode({"env": env, "scopes": ["admin"]}, signing_secret, algorithm="HS256")
    unsigned = jwt.encode(
        {"env": env, "scopes": ["admin"], "exp": int(time.time()) + 60}, None, algorithm="none"
    )
    hs512 = jwt.encode(
        {"env": env, "scopes": ["admin"], "exp": int(time.time()) + 60}, signing_secret, algorithm="HS512"
    )
    no_env = jwt.encode(
        {"scopes": ["admin"], "exp": int(time.time()) + 60}, signing_secret, algorithm="HS256"
    )
    other_secret = db(
        "fetchval", "SELECT signing_secret FROM environments WHERE id = $1", other_tenant.environment_id
    )
    # Signed by the other environment but claiming ours: the signature does not verify.
    cross = make_jwt(other_secret, env, ["admin"])
    unknown_env = make_jwt(signing_secret, "env_doesnotexist", ["admin"])
    tampered = make_jwt(signing_secret, env, ["read:sessions"])
    header, _payload, signature = tampered.split(".")
    upgraded = make_jwt(signing_secret, env, ["admin"]).split(".")[1]
    tampered = f"{header}.{upgraded}.{signature}"
    for token in (expired, forged, no_exp, unsigned, hs512, no_env, cross, unknown_env, tampered):
        assert_error(anon.get("/api/v1/sessions", headers=bearer(token)), 401, "unauthorized")


def test_small_clock_skew_is_tolerated(anon: httpx.Client, signing_secret: str, tenant: Tenant) -> None:
    token = make_jwt(signing_secret, tenant.environment_id, ["read:sessions"], exp_in=-5)
    assert anon.get("/api/v1/sessions", headers=bearer(token)).status_code == 200


def test_environment_wide_scopes(
    anon: httpx.Client,
    signing_secret: str,
    tenant: Tenant,
    two_sessions: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = two_sessions
    env = tenant.environment_id

    def call(scopes: list[str]) -> dict[str, int]:
        h = bearer(make_jwt(signing_secret, env, scopes))
        return {
            "list": anon.get("/api/v1/sessions", headers=h).status_code,
            "count": anon.get("/api/v1/sessions/count", headers=h).status_code,
            "get": anon.get(f"/api/v1/sessions/{a['id']}", headers=h).status_code,
            "create": anon.post("/api/v1/sessions", json={"type": "auth"}, headers=h).status_code,
            "patch": anon.patch(f"/api/v1/sessions/{a['id']}", json={"tags": ["s"]}, headers=h).status_code,
            "token": anon.post(f"/api/v1/sessions/{a['id']}/tokens", headers=h).status_code,
        }

    everything = {"list": 200, "count": 200, "get": 200, "create": 201, "patch": 200, "token": 201}
    assert call(["admin"]) == everything
    assert call(["admin:sessions"]) == everything
    assert call(["read:sessions"]) == {**everything, "create": 403, "patch": 403, "token": 403}
    assert call(["read:all"]) == {**everything, "create": 403, "patch": 403, "token": 403}
    assert call(["write:sessions"]) == {**everything, "list": 403, "count": 403, "get": 403, "token": 403}
    assert call([]) == dict.fromkeys(everything, 403)
    assert call(["read:runs", "write:things"]) == dict.fromkeys(everything, 403)


def test_a_token_for_session_a_cannot_touch_session_b(
    anon: httpx.Client, client: httpx.Client, two_sessions: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, b = two_sessions
    minted = client.post(f"/api/v1/sessions/{a['id']}/tokens", json={"expiresInSeconds": 600})
    assert minted.status_code == 201, minted.text
    token = minted.json()
    assert token["scopes"] == [f"read:sessions:{a['id']}", f"write:sessions:{a['id']}"]
    h = bearer(token["token"])
    assert anon.get(f"/api/v1/sessions/{a['id']}", headers=h).status_code == 200
    assert anon.get(f"/api/v1/sessions/{a['externalId']}", headers=h).status_code == 200
    assert anon.patch(f"/api/v1/sessions/{a['id']}", json={"tags": ["t"]}, headers=h).status_code == 200
    assert_error(anon.get(f"/api/v1/sessions/{b['id']}", headers=h), 403, "forbidden")
    assert_error(anon.patch(f"/api/v1/sessions/{b['id']}", json={"tags": ["t"]}, headers=h), 403)
    assert_error(anon.post(f"/api/v1/sessions/{b['id']}/close", headers=h), 403)
    assert_error(anon.post(f"/api/v1/sessions/{b['id']}/tokens", headers=h), 403)
    assert_error(anon.post(f"/api/v1/sessions/{a['id']}/tokens", headers=h), 403)  # cannot mint more
    assert_error(anon.get("/api/v1/sessions", headers=h), 403)
    assert_error(anon.get("/api/v1/sessions/count", headers=h), 403)
    assert_error(anon.post("/api/v1/sessions", json={"type": "x"}, headers=h), 403)
    assert client.get(f"/api/v1/sessions/{b['id']}").json()["tags"] == []
    assert anon.post(f"/api/v1/sessions/{a['id']}/close", headers=h).status_code == 200


def test_session_scopes_by_external_id_and_read_only_tokens(
    anon: httpx.Client,
    client: httpx.Client,
    signing_secret: str,
    tenant: Tenant,
    two_sessions: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = two_sessions
    by_external = bearer(
        make_jwt(signing_secret, tenant.environment_id, [f"read:sessions:{a['externalId']}"])
    )
    assert anon.get(f"/api/v1/sessions/{a['id']}", headers=by_external).status_code == 200
    assert_error(anon.patch(f"/api/v1/sessions/{a['id']}", json={"tags": []}, headers=by_external), 403)
    read_only = client.post(f"/api/v1/sessions/{a['id']}/tokens", json={"scopes": ["read"]}).json()
    assert read_only["scopes"] == [f"read:sessions:{a['id']}"]
    assert anon.get(f"/api/v1/sessions/{a['id']}", headers=bearer(read_only["token"])).status_code == 200
    assert_error(anon.post(f"/api/v1/sessions/{a['id']}/close", headers=bearer(read_only["token"])), 403)


def test_minted_token_lifetime_is_bounded(client: httpx.Client, two_sessions: Any) -> None:
    a, _ = two_sessions
    default = client.post(f"/api/v1/sessions/{a['id']}/tokens").json()
    claims = jwt.decode(default["token"], options={"verify_signature": False})
    assert 3590 <= claims["exp"] - claims["iat"] <= 3600
    longest = client.post(f"/api/v1/sessions/{a['id']}/tokens", json={"expiresInSeconds": 86400})
    assert longest.status_code == 201
    for body in (
        {"expiresInSeconds": 86401},
        {"expiresInSeconds": 10},
        {"scopes": ["admin"]},
        {"scopes": []},
    ):
        assert_error(client.post(f"/api/v1/sessions/{a['id']}/tokens", json=body), 400)


def test_token_of_another_environment_sees_404_not_403(
    base_url: str,
    client: httpx.Client,
    other_tenant: Tenant,
    db: Any,
    two_sessions: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    a, _ = two_sessions
    other_secret = db(
        "fetchval", "SELECT signing_secret FROM environments WHERE id = $1", other_tenant.environment_id
    )
    token = make_jwt(other_secret, other_tenant.environment_id, [f"read:sessions:{a['id']}", "admin"])
    with httpx.Client(base_url=base_url) as c:
        assert_error(c.get(f"/api/v1/sessions/{a['id']}", headers=bearer(token)), 404)


def test_cors_preflight_and_exposed_headers(anon: httpx.Client, client: httpx.Client) -> None:
    preflight = anon.options(
        "/api/v1/sessions",
        headers={
            "Origin": "https://chat.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "https://chat.example.com")
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    response = client.post(
        "/api/v1/sessions", json={"type": "cors"}, headers={"Origin": "https://chat.example.com"}
    )
    assert response.headers["access-control-allow-origin"] in ("*", "https://chat.example.com")
    assert "threadline-lsn" in response.headers["access-control-expose-headers"].lower()
    assert response.headers["x-content-type-options"] == "nosniff"
