"""FastAPI dependencies: who is calling, and may they do this."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.cache import KeyCache
from app.auth.keys import hash_key
from app.auth.service import Principal, authenticate, key_from_authorization
from app.db.engine import Database
from app.kit.errors import PermissionDenied, RateLimited
from app.models import Scope

# Documents bearer auth in the OpenAPI file; the header itself is parsed strictly below.
bearer_doc = HTTPBearer(auto_error=False, description="A tunegate API key: `tg-<prefix>-<secret>`.")


class RateLimiter:
    """Fixed one-minute windows per key, in process memory (per replica)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._windows: dict[str, tuple[int, int]] = {}

    def check(self, key_id: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        window = int(now // 60)
        start, count = self._windows.get(key_id, (window, 0))
        if start != window:
            start, count = window, 0
        if count >= self.per_minute:
            retry_after = max(1, math.ceil((window + 1) * 60 - now))
            raise RateLimited(
                f"Rate limit reached: {self.per_minute} requests per minute for this key. "
                f"Retry in {retry_after} s.",
                headers={"Retry-After": str(retry_after)},
            )
        self._windows[key_id] = (start, count + 1)
        if len(self._windows) > 100_000:  # forget idle keys so memory stays bounded
            self._windows = {k: v for k, v in self._windows.items() if v[0] == window}


async def authenticate_request(state: Any, authorization: str | None) -> Principal:
    """The caller of a request (the app's `state`, its Authorization header), counted
    against the per-key rate limit. Keys checked recently come from the process's key cache."""
    key = key_from_authorization(authorization)
    key_hash = hash_key(key)
    cache: KeyCache = state.key_cache
    principal = cache.get(key_hash)
    if principal is None:
        generation = cache.generation
        database: Database = state.database
        # Its own short transaction: the request's unit of work starts only when the endpoint
        # touches the database, so a long upload keeps no transaction open while bytes arrive.
        async with database.sessionmaker() as session, session.begin():
            principal = await authenticate(session, key_hash, state.settings)
        cache.put(key_hash, principal, generation)
    state.rate_limiter.check(principal.key_id)
    return principal


def check_scope(principal: Principal, scope: Scope) -> None:
    if not principal.scope.allows(scope):
        raise PermissionDenied(
            f"This API key has scope '{principal.scope.value}'; this request needs '{scope.value}'."
        )


async def current_principal(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_doc)] = None,
) -> Principal:
    return await authenticate_request(request.app.state, request.headers.get("authorization"))


def require(scope: Scope) -> object:
    async def dependency(
        principal: Annotated[Principal, Depends(current_principal)],
    ) -> Principal:
        check_scope(principal, scope)
        return principal

    return Depends(dependency)


ReadPrincipal = Annotated[Principal, require(Scope.read)]
WritePrincipal = Annotated[Principal, require(Scope.write)]
AdminPrincipal = Annotated[Principal, require(Scope.admin)]
