from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select, update

from app.db.repository import ProjectScopedRepository, Repository
from app.models import ApiKey, Project, Scope


class ApiKeyLookup(Repository[ApiKey]):
    """Unscoped reads used before the caller's project is known (authentication, bootstrap)."""

    model = ApiKey

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        return await self.session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))

    async def any_active_admin(self) -> bool:
        found = await self.session.scalar(
            select(ApiKey.id)
            .where(ApiKey.scope == Scope.admin.value, ApiKey.revoked_at.is_(None))
            .limit(1)
        )
        return found is not None

    async def by_id_or_prefix(self, ident: str) -> Sequence[ApiKey]:
        return (
            await self.session.scalars(
                select(ApiKey).where(or_(ApiKey.id == ident, ApiKey.prefix == ident))
            )
        ).all()

    async def all_with_project_names(self, project_id: str | None) -> list[tuple[ApiKey, str]]:
        statement = select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id)
        if project_id is not None:
            statement = statement.where(ApiKey.project_id == project_id)
        rows = await self.session.execute(statement.order_by(ApiKey.created_at, ApiKey.id))
        return [(key, name) for key, name in rows.all()]

    async def touch(self, key_id: str, moment: datetime) -> None:
        await self.session.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=moment)
        )


class ApiKeyRepository(ProjectScopedRepository[ApiKey]):
    model = ApiKey
