from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import distinct_on

from app.db.repository import ProjectScopedRepository, Repository
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


class ValidationQueue(Repository[ValidationReport]):
    """The validator worker's view: every project's queued reports (no project filter — the
    worker acts for whichever project owns the claimed report, and writes only that row)."""

    model = ValidationReport

    async def claim(self, now: datetime, lease_until: datetime) -> ValidationReport | None:
        claimed: ValidationReport | None = await self.session.scalar(
            select(ValidationReport)
            .where(
                or_(
                    ValidationReport.status == "queued",
                    (ValidationReport.status == "running") & (ValidationReport.lease_until < now),
                )
            )
            .order_by(ValidationReport.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if claimed is not None:
            claimed.status = "running"
            claimed.lease_until = lease_until
            claimed.attempts += 1
            claimed.started_at = claimed.started_at or now
            await self.session.flush()
        return claimed

    async def update_if_leased(
        self, report_id: str, held_lease: datetime, /, **values: Any
    ) -> ValidationReport | None:
        """Write only while we still hold the lease we claimed; None if someone took over."""
        row: ValidationReport | None = await self.session.scalar(
            update(ValidationReport)
            .where(
                ValidationReport.id == report_id,
                ValidationReport.status == "running",
                ValidationReport.lease_until == held_lease,
            )
            .values(**values)
            .returning(ValidationReport)
        )
        return row
