"""OpenAI's models API: `GET /v1/models`, `GET /v1/models/{model}`, `DELETE /v1/models/{model}`.

A project sees the base models of the providers this deployment has configured, its own
fine-tuned models (not another project's, not deleted ones), then its model aliases. Deleting a
fine-tuned model deletes it at its provider, then marks it deleted here; base models cannot be
deleted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.db.session import SessionDep
from app.inference.repository import AliasRepository
from app.kit.errors import PermissionDenied
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.time import to_unix, utcnow
from app.models import FineTunedModel, ModelAlias
from app.providers.api_errors import as_api_error, provider_not_configured
from app.providers.base import Provider, ProviderError, ProviderNotFound
from app.registry import service
from app.registry.repository import FineTunedModelRepository
from app.registry.service import BaseEntry
from app.validation.catalog import snapshot_of
from app.webhooks.events import emit

router = APIRouter(
    prefix="/v1/models", tags=["models"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

ModelId = Annotated[str, Path(max_length=256, description="A model id, e.g. `ft:gpt-4o-mini:…`.")]


class ModelObject(BaseModel):
    """OpenAI's Model object plus what tunegate knows of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    provider: str = Field(description="Which provider serves and tunes it (tunegate extension).")
    kind: Literal["base", "fine-tuned", "alias"]
    context_limit: int | None = None
    training_usd_per_1m: float | None = None
    methods: list[str] | None = None
    shutdown_date: str | None = None
    base_model: str | None = None
    fine_tuning_job_id: str | None = None
    alias_for: str | None = Field(
        default=None, description="An alias's model, or its heaviest arm (tunegate)."
    )
    arms: dict[str, int] | None = Field(
        default=None, description="A split alias's models and their weights (tunegate)."
    )

    @classmethod
    def of_base(cls, entry: BaseEntry) -> ModelObject:
        return cls(
            id=entry.id,
            created=entry.created,
            owned_by="system" if entry.provider != "openai" else "openai",
            provider=entry.provider,
            kind="base",
            context_limit=entry.context_limit,
            training_usd_per_1m=entry.training_usd_per_1m,
            methods=list(entry.methods),
            shutdown_date=entry.shutdown_date,
        )

    @classmethod
    def of_fine_tuned(cls, row: FineTunedModel) -> ModelObject:
        return cls(
            id=row.id,
            created=to_unix(row.created_at) or 0,
            owned_by=row.project_id,
            provider=row.provider,
            kind="fine-tuned",
            base_model=row.base_model,
            fine_tuning_job_id=row.job_id,
        )


def _alias_object(row: ModelAlias, target: ModelObject) -> ModelObject:
    return ModelObject(
        id=row.name,
        created=to_unix(row.created_at) or 0,
        owned_by=row.project_id,
        provider=target.provider,
        kind="alias",
        alias_for=row.model,
        arms=row.weights,
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


def _providers(request: Request) -> dict[str, Provider]:
    providers: dict[str, Provider] = request.app.state.providers or {}
    return providers


@router.get("", response_model=ModelList)
async def list_models(request: Request, principal: ReadPrincipal, session: SessionDep) -> ModelList:
    """Base models of the configured providers, then the project's fine-tuned models."""
    bases = await service.base_models(session, set(_providers(request)))
    tuned = await FineTunedModelRepository(session, principal.project_id).all()
    models = [ModelObject.of_base(b) for b in bases] + [ModelObject.of_fine_tuned(t) for t in tuned]
    by_id = {model.id: model for model in models}
    aliases = await AliasRepository(session, principal.project_id).list(
        AliasRepository(session, principal.project_id).select().order_by(ModelAlias.name)
    )
    # An alias whose model is gone (deleted) routes nowhere: not listed. Its model may be
    # named undated ("gpt-4o-mini"): the snapshot that name stands for.
    for alias in aliases:
        target = by_id.get(alias.model) or by_id.get(snapshot_of(alias.model))
        if target is not None:
            models.append(_alias_object(alias, target))
    return ModelList(data=models)


@router.get("/{model}", response_model=ModelObject)
async def retrieve_model(
    model: ModelId, request: Request, principal: ReadPrincipal, session: SessionDep
) -> ModelObject:
    """A base model, a fine-tuned model of this project, or one of its aliases."""
    found = await _model_object(session, principal.project_id, set(_providers(request)), model)
    if found is not None:
        return found
    alias = await AliasRepository(session, principal.project_id).get(model)
    if alias is not None:
        target = await _model_object(
            session, principal.project_id, set(_providers(request)), alias.model
        )
        if target is not None:
            return _alias_object(alias, target)
    raise service.model_not_found(model)


async def _model_object(
    session: SessionDep, project_id: str, providers: set[str], model: str
) -> ModelObject | None:
    tuned = await FineTunedModelRepository(session, project_id).get(model)
    if tuned is not None:
        return ModelObject.of_fine_tuned(tuned)
    # An undated name ("gpt-4o-mini") is a model too, as at OpenAI: the snapshot it names,
    # under the name asked.
    wanted = {model, snapshot_of(model)}
    for entry in await service.base_models(session, providers):
        if entry.id in wanted:
            return ModelObject.of_base(replace(entry, id=model))
    return None


@router.delete("/{model}", response_model=ModelDeleted)
async def delete_model(
    model: ModelId, request: Request, principal: WritePrincipal, session: SessionDep
) -> ModelDeleted:
    """Delete a fine-tuned model of this project at its provider, then here."""
    sessionmaker = request.app.state.database.sessionmaker
    async with sessionmaker() as reader:  # read, then call the provider with no transaction open
        tuned = await FineTunedModelRepository(reader, principal.project_id).get(model)
        is_base = tuned is None and (
            await service.base_model_provider(reader, set(_providers(request)), model) is not None
        )
    if tuned is None:
        if is_base:
            raise PermissionDenied(
                f"The model '{model}' is a base model; only fine-tuned models can be deleted.",
                param="model",
                code="model_not_deletable",
            )
        raise service.model_not_found(model)
    provider = _providers(request).get(tuned.provider)
    if provider is None:
        raise provider_not_configured(tuned.provider, f"the model `{model}`")
    try:
        await provider.delete_model(model)
    except ProviderNotFound:
        pass  # already gone upstream: mark it deleted here too
    except ProviderError as exc:
        raise as_api_error(exc, "delete the model") from None
    row = await FineTunedModelRepository(session, principal.project_id).get(model, for_update=True)
    deleted = ModelDeleted(id=model, deleted=True)
    if row is not None and row.deleted_at is None:
        row.deleted_at = utcnow()
        # About the job's model: ordered after the job's own events for each consumer.
        subject = row.job_id or model
        await emit(session, principal.project_id, "model.deleted", subject, deleted.model_dump())
    return deleted
