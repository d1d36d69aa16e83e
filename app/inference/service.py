"""Which provider answers a model for a project, and provider errors in OpenAI's envelope.

A model is one of: an alias of the caller's project (resolved to its target, or to one of its
arms when it splits traffic), a fine-tuned model of the project (not deleted), a checkpoint of
one of its jobs, or a base model of a configured provider. Anything else — another project's
model included — is 404 `model_not_found`, as OpenAI answers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.inference.repository import AliasRepository, UsageRepository
from app.inference.usage import UsageRecorder
from app.kit.errors import APIError, Conflict, NotFound
from app.models import ModelAlias, UsageRecord
from app.providers.api_errors import as_api_error, provider_not_configured
from app.providers.base import (
    Provider,
    ProviderError,
    ProviderNotFound,
)
from app.registry import service as registry
from app.validation.catalog import known_models, resolve_model


@dataclass(frozen=True)
class Route:
    model: str  # what the provider is asked for: an alias's target (or the arm chosen)
    provider: Provider
    alias: str | None = None  # the alias the request named, if it named one


# Providers whose every base model tunegate knows (the local one's are registered at start-up):
# a name they do not have is unknown, not something to ask them about.
CLOSED_PROVIDERS = frozenset({"local"})

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# What an alias of one model reports as its weights: all of its traffic.
SINGLE_ARM_WEIGHT = 100


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


def weights_of(alias: ModelAlias) -> dict[str, int]:
    """An alias's arms and their weights; an alias of one model has one arm."""
    return dict(alias.weights) if alias.weights else {alias.model: SINGLE_ARM_WEIGHT}


def heaviest_arm(weights: Mapping[str, int]) -> str:
    """The arm with the most weight (ties: the first id in sorted order), stored as the
    alias's `model` so readers that know one model per alias still name a real one."""
    return max(sorted(weights), key=weights.__getitem__)


def choose_arm(alias: str, weights: Mapping[str, int], user: str | None) -> str:
    """One arm of a split alias, each with the probability of its share of the weights.

    With a `user`, the choice is a stable hash of (alias, user), so that user gets the same
    arm from every process and after restarts (Python's `hash()` is salted per process); the
    hash is read as a point in [0, 1), so scaled weights (90/10, 9/1) route alike and moving
    weight between arms moves only the users it must. Without one, a random point."""
    if user:
        digest = hashlib.blake2b(f"{alias}\0{user}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64
    else:
        point = random.random()
    arms = sorted(weights.items())  # one order everywhere (JSONB keeps its own key order)
    total = sum(weight for _, weight in arms)
    below = 0
    for model, weight in arms:
        below += weight
        if point * total < below:
            return model
    return arms[-1][0]  # not reached: point < 1


async def resolve(
    sessionmaker: async_sessionmaker[AsyncSession],
    providers: dict[str, Provider],
    project_id: str,
    model: str,
    user: str | None = None,
) -> Route:
    """The provider for `model`, read in a short session of its own (no transaction stays open
    while the provider answers). `user` (the request's field) keeps a split alias sticky."""
    configured = set(providers)
    target = model
    alias_name: str | None = None
    spec = None if model.startswith("ft:") else resolve_model(model)
    if spec is not None and spec.provider in configured:
        provider_name: str | None = spec.provider  # a catalogued base model: no query at all
    else:
        async with sessionmaker() as session:
            if ":" not in model:  # an alias never has one (ALIAS_PATTERN); `ft:` models do
                alias = await AliasRepository(session, project_id).get(model)
                if alias is not None:
                    alias_name = alias.name
                    target = alias.model
                    if alias.weights:
                        target = choose_arm(alias.name, alias.weights, user)
            provider_name = await _provider_of(session, configured, project_id, target)
        open_ended = configured - CLOSED_PROVIDERS
        if provider_name is None and not target.startswith("ft:") and len(open_ended) == 1:
            # Any other base model of the only provider whose models tunegate does not know
            # in full (it answers 404 for an unknown one, which is `model_not_found` too).
            provider_name = next(iter(open_ended))
    if provider_name is None:
        raise registry.model_not_found(model)
    model = target
    provider = providers.get(provider_name)
    if provider is None:
        raise provider_not_configured(provider_name, f"the model `{model}`")
    return Route(model=model, provider=provider, alias=alias_name)


async def _provider_of(
    session: AsyncSession, configured: set[str], project_id: str, model: str
) -> str | None:
    """The provider of a model (not an alias) the project may use, or None: a fine-tuned
    model or checkpoint (`ft:…`) of the project, else a base model of a configured provider."""
    if not model.startswith("ft:"):
        return await registry.base_model_provider(session, configured, model)
    return await registry.tuned_model_provider(session, project_id, model)


async def served_request(
    session: AsyncSession, recorder: UsageRecorder, project_id: str, request_id: str
) -> UsageRecord:
    """The usage record of a completion this project asked for, by its request id.

    Records are written in batches about every second (`usage.py`), so one this process
    answered a moment ago may still be in memory: it is written before the second look. One
    another replica answered within its last flush interval is not found yet (404; a retry
    a second later finds it)."""
    usage = UsageRepository(session, project_id)
    found = await usage.latest_of_request(request_id)
    if found is None:
        await recorder.flush()
        found = await usage.latest_of_request(request_id)
    if found is None:
        raise NotFound(
            f"No completion of this project has the request id '{request_id}'.",
            param="request_id",
            code="request_not_found",
        )
    return found


def upstream_error(exc: ProviderError, model: str, what: str = "chat completion") -> APIError:
    """A provider failure as the caller sees it; a model the provider does not know is
    `model_not_found`, as OpenAI answers."""
    if isinstance(exc, ProviderNotFound):
        return registry.model_not_found(model)
    return as_api_error(exc, what)
