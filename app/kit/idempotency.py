"""`Idempotency-Key` for creating POSTs (Stripe's and OpenAI's convention).

Same key and same request → the first answer again, without doing the work twice; same key and
another request → 422; same key while the first request is still being worked on → 409.
Keys are per project and kept 24 hours.

The key is claimed in its own committed transaction *before* the work, so a concurrent request
sees it; the answer is stored by the request's unit of work, so it is kept exactly when the
work's effects are. A request that fails releases its key, and the client may retry with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import JSONResponse, Response

from app.kit.errors import Conflict, InvalidPayload
from app.kit.time import utcnow
from app.models import IdempotencyKey

AnswerT = TypeVar("AnswerT", bound=BaseModel)

# `openapi_extra` for a route that honours the header, so clients and schema tests see it.
OPENAPI_HEADER: dict[str, Any] = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "Same key and request within 24 h: the first answer again.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
        }
    ]
}

HEADER = "Idempotency-Key"
RETENTION = timedelta(hours=24)
# An unfinished claim this old belongs to a request that died; longer than any upload takes.
ABANDONED_AFTER = timedelta(hours=2)
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def check_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not _VALID.match(value):
        raise InvalidPayload(
            "Idempotency-Key must be 1 to 255 printable ASCII characters.", param=HEADER
        )
    return value


@dataclass
class Claim:
    """What `claim` found: `replay` holds a stored answer to send again, else `row_id` is ours."""

    row_id: int | None = None
    replay: tuple[int, dict[str, Any]] | None = None


async def claim(
    sessionmaker: async_sessionmaker[AsyncSession], project_id: str, key: str, print_: str
) -> Claim:
    now = utcnow()
    async with sessionmaker() as session, session.begin():
        # Forget an expired key first, so it can be reused after 24 hours.
        await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.project_id == project_id,
                IdempotencyKey.key == key,
                IdempotencyKey.created_at < now - RETENTION,
            )
        )
        inserted = await session.scalar(
            insert(IdempotencyKey)
            .values(project_id=project_id, key=key, fingerprint=print_, created_at=now)
            .on_conflict_do_nothing(constraint="uq_idempotency_keys_project_key")
            .returning(IdempotencyKey.id)
        )
        if inserted is not None:
            return Claim(row_id=int(inserted))
        existing = await session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.project_id == project_id, IdempotencyKey.key == key
            )
        )
    if existing is None:  # released between our insert and our read: the client may retry
        raise Conflict("A request with this Idempotency-Key just finished; retry.", param=HEADER)
    if existing.fingerprint != print_:
        raise InvalidPayload(
            "This Idempotency-Key was used with a different request; use a new key.",
            param=HEADER,
            code="idempotency_key_reused",
        )
    if existing.status_code is None and existing.created_at < now - ABANDONED_AFTER:
        # Its request died without releasing the key (a killed process): take it over.
        async with sessionmaker() as session, session.begin():
            await session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.id == existing.id)
                .values(created_at=now)
            )
        return Claim(row_id=existing.id)
    if existing.status_code is None or existing.response is None:
        raise Conflict(
            "A request with this Idempotency-Key is still being processed.",
            param=HEADER,
            code="idempotency_key_in_progress",
        )
    return Claim(replay=(existing.status_code, existing.response))


async def complete(
    session: AsyncSession, row_id: int, status_code: int, response: dict[str, Any]
) -> None:
    """Store the answer in the request's unit of work (kept only if the work commits)."""
    await session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == row_id)
        .values(status_code=status_code, response=response, completed_at=utcnow())
    )


async def release(sessionmaker: async_sessionmaker[AsyncSession], row_id: int) -> None:
    async with sessionmaker() as session, session.begin():
        await session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row_id))


async def purge_expired(session: AsyncSession) -> int:
    result = await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - RETENTION)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def field_parts(fields: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{name}={value}" for name, value in sorted(fields)]


async def run(
    request: Request,
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    project_id: str,
    parts: Sequence[bytes | str],
    work: Callable[[], Awaitable[AnswerT]],
) -> AnswerT | Response:
    """Do `work` once per Idempotency-Key (when the request carries one)."""
    key = check_key(request.headers.get(HEADER))
    if key is None:
        return await work()
    found = await claim(
        sessionmaker, project_id, key, fingerprint(request.method, request.url.path, *parts)
    )
    if found.replay is not None:
        status_code, body = found.replay
        return JSONResponse(body, status_code=status_code, headers={"Idempotent-Replayed": "true"})
    assert found.row_id is not None
    try:
        answer = await work()
        await complete(session, found.row_id, 200, answer.model_dump(mode="json"))
    except BaseException:
        await release(sessionmaker, found.row_id)
        raise
    return answer
