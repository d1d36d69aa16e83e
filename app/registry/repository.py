"""SQL of the models registry: base models as providers report them, fine-tuned models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.repository import ProjectScopedRepository
from app.models import FineTunedModel, ProviderBaseModel

_REFRESHED = ("context_limit", "training_usd_per_1m", "methods", "shutdown_date", "refreshed_at")


class RegistryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def upsert_base_models(self, rows: list[dict[str, Any]]) -> None:
        statement = insert(ProviderBaseModel).values(rows)
        await self.session.execute(
            statement.on_conflict_do_update(
                index_elements=["provider", "id"],
                set_={column: statement.excluded[column] for column in _REFRESHED},
            )
        )

    async def base_models(self, providers: set[str]) -> Sequence[ProviderBaseModel]:
        rows = await self.session.scalars(
            select(ProviderBaseModel).where(ProviderBaseModel.provider.in_(providers))
        )
        return rows.all()

    async def provider_of(self, model_id: str, providers: set[str]) -> str | None:
        """One of `providers` that reported `model_id` as a base model, or None."""
        found: str | None = await self.session.scalar(
            select(ProviderBaseModel.provider)
            .where(ProviderBaseModel.id == model_id, ProviderBaseModel.provider.in_(providers))
            .order_by(ProviderBaseModel.provider)
            .limit(1)
        )
        return found

    async def shutdown_date(self, provider: str, model_id: str) -> str | None:
        found: str | None = await self.session.scalar(
            select(ProviderBaseModel.shutdown_date).where(
                ProviderBaseModel.provider == provider, ProviderBaseModel.id == model_id
            )
        )
        return found


class FineTunedModelRepository(ProjectScopedRepository[FineTunedModel]):
    """A project's fine-tuned models that are not deleted."""

    model = FineTunedModel

    def select(self) -> Select[Any]:
        return super().select().where(FineTunedModel.deleted_at.is_(None))

    async def all(self) -> Sequence[FineTunedModel]:
        return await self.list(self.select().order_by(FineTunedModel.created_at, FineTunedModel.id))
