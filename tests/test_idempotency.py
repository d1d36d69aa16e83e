"""Idempotency-Key on creating POSTs: replay, reuse with another body, in-flight, bad keys."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.kit import idempotency
from app.kit.time import utcnow
from app.models import IdempotencyKey, Scope
from tests.test_auth import assert_envelope


@pytest.fixture
async def creds(factories):
    return await factories.key(scope=Scope.write)


@pytest.fixture
def api(client_for, creds):
    return client_for(creds.key)


def post_file(api, content: bytes, key: str | None, name: str = "a.jsonl"):
    headers = {"Idempotency-Key": key} if key else {}
    return api.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": "batch"}, headers=headers
    )


async def test_same_key_and_body_replays_the_first_answer(api) -> None:
    first = await post_file(api, b"hello", "key-1")
    again = await post_file(api, b"hello", "key-1")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert [f["id"] for f in (await api.get("/v1/files")).json()["data"]] == [first.json()["id"]]
    # Without a key, or with another key, it is a new file.
    assert (await post_file(api, b"hello", None)).json()["id"] != first.json()["id"]
    assert (await post_file(api, b"hello", "key-2")).json()["id"] != first.json()["id"]


async def test_same_key_with_another_body_is_422(api) -> None:
    assert (await post_file(api, b"hello", "key-x")).status_code == 200
    error = assert_envelope(await post_file(api, b"goodbye", "key-x"), 422)
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert_envelope(await post_file(api, b"hello", "key-x", name="other.jsonl"), 422)


async def test_key_still_in_progress_is_409(api, creds, sessionmaker) -> None:
    parts = [
        *idempotency.field_parts([("purpose", "batch")]),
        "filename=a.jsonl",
        f"sha256={hashlib.sha256(b'hello').hexdigest()}",
    ]
    claimed = await idempotency.claim(
        sessionmaker, creds.project.id, "busy", idempotency.fingerprint("POST", "/v1/files", *parts)
    )
    assert claimed.row_id is not None
    error = assert_envelope(await post_file(api, b"hello", "busy"), 409)
    assert error["code"] == "idempotency_key_in_progress"


async def test_abandoned_and_expired_keys_can_be_used_again(api, session) -> None:
    first = (await post_file(api, b"hello", "old-key")).json()
    await session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.key == "old-key")
        .values(created_at=utcnow() - timedelta(hours=25))
    )
    await session.commit()
    later = await post_file(api, b"hello", "old-key")
    assert later.status_code == 200 and later.json()["id"] != first["id"]


async def test_failed_request_releases_its_key(api) -> None:
    assert_envelope(await post_file(api, b"", "retry-me"), 400)  # empty file
    assert (await post_file(api, b"now with content", "retry-me")).status_code == 200


async def test_keys_are_per_project_and_checked(api, client_for, factories) -> None:
    mine = (await post_file(api, b"hello", "shared-key")).json()
    other = client_for((await factories.key(scope=Scope.write)).key)
    theirs = await post_file(other, b"hello", "shared-key")
    assert theirs.status_code == 200 and theirs.json()["id"] != mine["id"]
    assert_envelope(await post_file(api, b"hello", "bad key with spaces"), 422)
    assert_envelope(await post_file(api, b"hello", "k" * 300), 422)


async def test_upload_creation_is_idempotent(api) -> None:
    body = {
        "filename": "big.jsonl",
        "purpose": "fine-tune",
        "bytes": 100,
        "mime_type": "text/jsonl",
    }
    first = await api.post("/v1/uploads", json=body, headers={"Idempotency-Key": "u-1"})
    again = await api.post("/v1/uploads", json=body, headers={"Idempotency-Key": "u-1"})
    assert first.json()["id"] == again.json()["id"]
    changed = await api.post(
        "/v1/uploads", json=body | {"bytes": 101}, headers={"Idempotency-Key": "u-1"}
    )
    assert_envelope(changed, 422)
