from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.dialects.postgresql import distinct_on

from app.db.repository import LeasedQueue, ProjectScopedRepository
from app.models import ValidationReport


class ValidationRepository(ProjectScopedRepository[ValidationReport]):
    model = ValidationReport

    async def latest_per_file(self, file_ids: Sequence[str]) -> dict[str, ValidationReport]:
        if not file_ids:
            return {}
        rows = await self.session.scalars(
            self.select()
            .where(ValidationReport.file_id.in_(file_ids))
            .order_by(ValidationReport.file_id, ValidationReport.created_at.desc())
            .ext(distinct_on(ValidationReport.file_id))
        )
        return {row.file_id: row for row in rows}

    async def latest_succeeded(
        self, file_id: str, model: str, method: str
    ) -> ValidationReport | None:
        return await self._latest(file_id, model, method, ("succeeded",))

    async def latest_unfinished(
        self, file_id: str, model: str, method: str
    ) -> ValidationReport | None:
        return await self._latest(file_id, model, method, ("queued", "running"))

    async def _latest(
        self, file_id: str, model: str, method: str, statuses: tuple[str, ...]
    ) -> ValidationReport | None:
        found: ValidationReport | None = await self.session.scalar(
            self.select()
            .where(
                ValidationReport.file_id == file_id,
                ValidationReport.model == model,
                ValidationReport.method == method,
                ValidationReport.status.in_(statuses),
            )
            .order_by(ValidationReport.created_at.desc())
            .limit(1)
        )
        return found


class ValidationQueue(LeasedQueue[ValidationReport]):
    """The validator worker's view: every project's queued reports."""

    model = ValidationReport
