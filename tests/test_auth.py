"""Authentication and scopes: every bad key is a clean 401, every wrong scope a 403."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text

from app.models import ApiKey, Scope
from tests.factories import Factories


def assert_envelope(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


async def test_missing_key_is_401_in_openai_envelope(client) -> None:
    error = assert_envelope(await client.get("/v1/projects"), 401, "invalid_api_key")
    assert "API key" in error["message"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Bearer  tg-abc-def",
        "Bearer tg-abc-def extra",
        "Basic dXNlcjpwYXNz",
        "tg-abcdefghij-secret",
        "Bearer sk-proj-not-a-tunegate-key",
        "Bearer tg-AAAAAAAAAA-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
        "Bearer \u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9",
    ],
)
async def test_malformed_or_unknown_keys_are_401(client, header: str) -> None:
    response = await client.get("/v1/projects", headers={"Authorization": header.encode("utf-8")})
    assert_envelope(response, 401, "invalid_api_key")
    assert response.headers["x-request-id"]


async def test_revoked_key_is_401(client_for, factories: Factories) -> None:
    admin = await factories.key(scope=Scope.admin)
    victim = await factories.key(admin.project, scope=Scope.read)
    reader = client_for(victim.key)
    assert (await reader.get("/healthz")).status_code == 200

    revoked = await client_for(admin.key).post(f"/v1/api_keys/{victim.key_row.id}/revoke")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    error = assert_envelope(await reader.get("/v1/projects"), 401, "invalid_api_key")
    assert "revoked" in error["message"]


@pytest.mark.parametrize("scope", [Scope.read, Scope.write])
async def test_admin_endpoints_refuse_lower_scopes(client_for, factories, scope) -> None:
    creds = await factories.key(scope=scope)
    api = client_for(creds.key)
    assert_envelope(await api.get("/v1/projects"), 403, "insufficient_scope")
    assert_envelope(await api.post("/v1/api_keys", json={"scope": "admin"}), 403)
    assert_envelope(await api.post("/v1/projects", json={"name": "sneaky"}), 403)


async def test_keys_are_stored_hashed(client_for, factories, session) -> None:
    admin = await factories.key(scope=Scope.admin)
    created = (await client_for(admin.key).post("/v1/api_keys", json={"scope": "read"})).json()
    plaintext = created["key"]
    assert plaintext.startswith(f"tg-{created['prefix']}-")
    row = await session.scalar(select(ApiKey).where(ApiKey.id == created["id"]))
    assert row is not None and plaintext not in {row.key_hash, row.prefix, row.name}
    # Nothing anywhere in the table holds the key itself.
    dump = await session.scalar(text("SELECT string_agg(t::text, ' ') FROM api_keys t"))
    assert plaintext not in dump
    # And it is never shown again.
    listed = (await client_for(admin.key).get("/v1/api_keys")).json()["data"]
    assert all("key" not in item for item in listed)
    fetched = (await client_for(admin.key).get(f"/v1/api_keys/{created['id']}")).json()
    assert "key" not in fetched


async def test_last_used_at_is_recorded_without_a_write_per_request(
    client_for, factories, session
) -> None:
    creds = await factories.key(scope=Scope.admin)
    api = client_for(creds.key)
    assert creds.key_row.last_used_at is None
    assert (await api.get("/v1/projects")).status_code == 200
    first = await session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == creds.key_row.id))
    assert first is not None
    for _ in range(3):
        assert (await api.get("/v1/projects")).status_code == 200
    again = await session.scalar(
        select(ApiKey.last_used_at)
        .where(ApiKey.id == creds.key_row.id)
        .execution_options(populate_existing=True)
    )
    assert again == first  # within the resolution (60 s): no further writes


async def test_rate_limit_per_key_answers_429_with_retry_after(
    app_factory, client_for, factories
) -> None:
    limited_app = app_factory(auth={"rate_limit_per_minute": 3})
    creds = await factories.key(scope=Scope.admin)
    api = client_for(creds.key, target=limited_app)
    for _ in range(3):
        assert (await api.get("/v1/projects")).status_code == 200
    response = await api.get("/v1/projects")
    assert_envelope(response, 429, "rate_limit_exceeded")
    assert int(response.headers["retry-after"]) >= 1
    # Another key has its own budget.
    other = await factories.key(creds.project, scope=Scope.admin)
    assert (await client_for(other.key, target=limited_app).get("/v1/projects")).status_code == 200
