"""Which provider answers a model for a project, and provider errors in OpenAI's envelope.

A model is one of: an alias of the caller's project (resolved to its target), a fine-tuned
model of the project (not deleted), a checkpoint of one of its jobs, or a base model of a
configured provider. Anything else — another project's
model included — is 404 `model_not_found`, as OpenAI answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.inference.repository import AliasRepository
from app.kit.errors import (
    APIError,
    BadGateway,
    BadRequest,
    Conflict,
    GatewayTimeout,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from app.models import Job, JobCheckpoint
from app.providers.base import (
    Provider,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotFound,
    ProviderPermissionDenied,
    ProviderRateLimited,
    ProviderTimeout,
)
from app.registry import service as registry
from app.registry.repository import FineTunedModelRepository
from app.validation.catalog import known_models


@dataclass(frozen=True)
class Route:
    model: str  # what the provider is asked for: an alias's target
    provider: Provider


ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


async def check_target(
    session: AsyncSession, configured: set[str], project_id: str, model: str
) -> None:
    """An alias points at a model the project may use (not at another alias)."""
    if await _provider_of(session, configured, project_id, model) is None:
        raise registry.model_not_found(model)


async def check_alias_name(session: AsyncSession, configured: set[str], name: str) -> None:
    """An alias may not shadow a base model of any provider tunegate knows, configured or not
    (a fine-tuned model's `ft:` names never match the pattern)."""
    every = configured | {spec.provider for spec in known_models()}
    if await registry.base_model_provider(session, every, name) is not None:
        raise Conflict(
            f"'{name}' is a base model's id; choose another alias name.",
            param="name",
            code="alias_shadows_model",
        )


async def resolve(
    sessionmaker: async_sessionmaker[AsyncSession],
    providers: dict[str, Provider],
    project_id: str,
    model: str,
) -> Route:
    """The provider for `model`, read in a short session of its own (no transaction stays open
    while the provider answers)."""
    async with sessionmaker() as session:
        target = model
        if ":" not in model:  # an alias never has one (ALIAS_PATTERN); `ft:` models always do
            alias = await AliasRepository(session, project_id).get(model)
            target = alias.model if alias is not None else model
        provider_name = await _provider_of(session, set(providers), project_id, target)
    if provider_name is None:
        raise registry.model_not_found(model)
    model = target
    provider = providers.get(provider_name)
    if provider is None:
        raise ServiceUnavailable(
            f"The provider '{provider_name}' of the model `{model}` is not configured.",
            code="provider_not_configured",
        )
    return Route(model=model, provider=provider)


async def _provider_of(
    session: AsyncSession, configured: set[str], project_id: str, model: str
) -> str | None:
    """The provider of a model (not an alias) the project may use, or None: a fine-tuned
    model or checkpoint (`ft:…`) of the project, else a base model of a configured provider."""
    if not model.startswith("ft:"):
        return await registry.base_model_provider(session, configured, model)
    tuned = await FineTunedModelRepository(session, project_id).get(model)
    if tuned is not None:
        return tuned.provider
    checkpoint_provider: str | None = await session.scalar(
        select(Job.provider)
        .join(JobCheckpoint, JobCheckpoint.job_id == Job.id)
        .where(
            JobCheckpoint.project_id == project_id,
            JobCheckpoint.fine_tuned_model_checkpoint == model,
        )
        .limit(1)
    )
    return checkpoint_provider


def upstream_error(exc: ProviderError, model: str) -> APIError:
    """A provider failure as the caller should see it: 429 keeps its Retry-After, a timeout is
    504, a provider that fails or cannot be reached 502, a refused request 400 (its message)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, ProviderRateLimited):
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return RateLimited(
            f"The provider is rate limiting requests: {detail}",
            code=exc.code or "rate_limit_exceeded",
            headers=headers,
        )
    if isinstance(exc, ProviderTimeout):
        return GatewayTimeout(f"The provider did not answer in time: {detail}")
    if isinstance(exc, ProviderNotFound):
        return registry.model_not_found(model)
    if isinstance(exc, ProviderBadRequest):
        return BadRequest(detail, param=exc.param, code=exc.code or "invalid_request")
    if isinstance(exc, ProviderPermissionDenied):
        return PermissionDenied(detail, code=exc.code or "provider_permission_denied")
    if isinstance(exc, ProviderAuthError):
        return BadGateway(
            "The provider refused tunegate's credentials; an operator must fix its API key.",
            code="upstream_auth_failed",
        )
    return BadGateway(f"The provider failed: {detail}")
