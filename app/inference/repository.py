from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, func, select

from app.db.repository import ProjectScopedRepository
from app.models import ModelAlias, UsageRecord


class UsageRepository(ProjectScopedRepository[UsageRecord]):
    model = UsageRecord

    async def totals(
        self, since: datetime, until: datetime, group_by: Literal["model", "day"]
    ) -> list[tuple[Any, dict[str, int]]]:
        """Requests, errors and tokens per model or per UTC day, in [since, until)."""
        key: Any = (
            UsageRecord.model
            if group_by == "model"
            else func.to_char(func.timezone("UTC", UsageRecord.created_at), "YYYY-MM-DD")
        )
        rows = await self.session.execute(
            select(
                key.label("key"),
                func.count().label("requests"),
                func.count(case((UsageRecord.status >= 400, 1))).label("errors"),
                func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt"),
                func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion"),
            )
            .where(
                UsageRecord.project_id == self.project_id,
                UsageRecord.created_at >= since,
                UsageRecord.created_at < until,
            )
            .group_by(key)
            .order_by(key)
        )
        return [
            (
                row.key,
                {
                    "requests": int(row.requests),
                    "errors": int(row.errors),
                    "prompt_tokens": int(row.prompt),
                    "completion_tokens": int(row.completion),
                    "total_tokens": int(row.prompt) + int(row.completion),
                },
            )
            for row in rows
        ]


class AliasRepository(ProjectScopedRepository[ModelAlias]):
    model = ModelAlias

    def _id_column(self) -> Any:
        return ModelAlias.name
