"""Base models per provider (context limit, training price, methods, shutdown date) and the
fine-tuned models succeeded jobs made.

The catalog (`app/validation/catalog.py`) knows every base model tunegate can validate for;
each provider's own list (`Provider.list_base_models`, e.g. OpenAI's `shutdown_date`) is stored
in `base_models` by the syncer every `REFRESH_EVERY` and overrides the catalog where it says
more. Listing never calls a provider, so `GET /v1/models` is fast and works while one is down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.kit.errors import NotFound
from app.kit.logging import get_logger
from app.kit.time import to_unix, utcnow
from app.models import Job, JobCheckpoint
from app.providers.base import Provider, ProviderError
from app.registry.repository import FineTunedModelRepository, RegistryRepository
from app.validation.catalog import known_models, resolve_model

log = get_logger("tunegate.registry")

REFRESH_EVERY = timedelta(hours=1)


@dataclass(frozen=True)
class BaseEntry:
    id: str
    provider: str
    context_limit: int | None
    training_usd_per_1m: float | None
    methods: tuple[str, ...]
    shutdown_date: str | None
    created: int


async def refresh_base_models(
    sessionmaker: async_sessionmaker[AsyncSession], providers: Mapping[str, Provider]
) -> int:
    """Ask each provider for its base models (no transaction open), then store them."""
    stored = 0
    for name, provider in providers.items():
        try:
            infos = await provider.list_base_models()
        except ProviderError as exc:
            log.warning("base models not refreshed", provider=name, error=str(exc))
            continue
        if not infos:
            continue
        now = utcnow()
        rows = [
            {
                "provider": name,
                "id": info.id,
                "context_limit": info.context_limit,
                "training_usd_per_1m": info.training_usd_per_1m,
                "methods": list(info.methods),
                "shutdown_date": info.shutdown_date,
                "refreshed_at": now,
            }
            for info in infos
        ]
        async with sessionmaker() as session, session.begin():
            await RegistryRepository(session).upsert_base_models(rows)
        stored += len(rows)
    return stored


async def base_models(session: AsyncSession, providers: set[str]) -> list[BaseEntry]:
    """Base models of the configured providers: the catalog, overridden by what they reported."""
    entries: dict[tuple[str, str], BaseEntry] = {
        (spec.provider, spec.id): BaseEntry(
            id=spec.id,
            provider=spec.provider,
            context_limit=spec.context_limit,
            training_usd_per_1m=spec.training_usd_per_1m,
            methods=spec.methods,
            shutdown_date=None,
            created=0,
        )
        for spec in known_models()
        if spec.provider in providers
    }
    if providers:
        for row in await RegistryRepository(session).base_models(providers):
            known = entries.get((row.provider, row.id))
            entries[(row.provider, row.id)] = BaseEntry(
                id=row.id,
                provider=row.provider,
                context_limit=row.context_limit
                if row.context_limit is not None
                else (known.context_limit if known else None),
                training_usd_per_1m=row.training_usd_per_1m
                if row.training_usd_per_1m is not None
                else (known.training_usd_per_1m if known else None),
                methods=tuple(row.methods) or (known.methods if known else ()),
                shutdown_date=row.shutdown_date,
                created=known.created if known else to_unix(row.refreshed_at) or 0,
            )
    return sorted(entries.values(), key=lambda entry: (entry.provider, entry.id))


def model_not_found(model: str) -> NotFound:
    """OpenAI's answer for a model that is unknown, deleted or another project's."""
    return NotFound(
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def base_model_provider(session: AsyncSession, providers: set[str], model: str) -> str | None:
    """Which of `providers` has `model` as a base model: the catalog first (no query), then
    what the providers reported. One row, where `base_models` builds the whole list."""
    spec = resolve_model(model)  # an id or an undated name (`gpt-4o-mini`)
    if spec is not None and spec.provider in providers and not model.startswith("ft:"):
        return spec.provider
    if not providers:
        return None
    return await RegistryRepository(session).provider_of(model, providers)


async def tuned_model_provider(session: AsyncSession, project_id: str, model: str) -> str | None:
    """The provider of a fine-tuned model or checkpoint (`ft:…`) of the project; None when it
    is unknown, deleted or another project's."""
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


async def shutdown_within(
    session: AsyncSession, provider: str, model: str, days: int, today: date
) -> str | None:
    """The base model's shutdown date when it falls within `days` of `today`, else None."""
    spec = resolve_model(model)
    model_id = spec.id if spec is not None else model
    shutdown = await RegistryRepository(session).shutdown_date(provider, model_id)
    if not shutdown:
        return None
    try:
        when = date.fromisoformat(shutdown[:10])
    except ValueError:
        return None
    return shutdown if when - today <= timedelta(days=days) else None
