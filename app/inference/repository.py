from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, func, select

from app.db.repository import ProjectScopedRepository
from app.models import Feedback, ModelAlias, UsageRecord


class UsageRepository(ProjectScopedRepository[UsageRecord]):
    model = UsageRecord

    async def latest_of_request(self, request_id: str) -> UsageRecord | None:
        """The usage record of a request id (the latest, should a caller have sent one
        `x-request-id` with several requests)."""
        found: UsageRecord | None = await self.session.scalar(
            self.select()
            .where(UsageRecord.request_id == request_id)
            .order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc())
            .limit(1)
        )
        return found

    async def arms_of_alias(
        self, alias: str, since: datetime, until: datetime
    ) -> dict[str, dict[str, Any]]:
        """Per model that served requests naming `alias` in [since, until): requests, errors,
        tokens, and the latency of the answered ones (status < 400)."""
        answered = UsageRecord.status < 400
        latency = UsageRecord.latency_ms
        rows = await self.session.execute(
            select(
                UsageRecord.model,
                func.count().label("requests"),
                func.count().filter(UsageRecord.status >= 400).label("errors"),
                func.percentile_cont(0.5).within_group(latency).filter(answered).label("p50"),
                func.percentile_cont(0.95).within_group(latency).filter(answered).label("p95"),
                func.avg(latency).filter(answered).label("mean"),
                func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt"),
                func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion"),
            )
            .where(
                UsageRecord.project_id == self.project_id,
                UsageRecord.alias == alias,
                UsageRecord.created_at >= since,
                UsageRecord.created_at < until,
            )
            .group_by(UsageRecord.model)
        )
        return {
            row.model: {
                "requests": int(row.requests),
                "errors": int(row.errors),
                "latency_ms": {
                    "p50": _number(row.p50),
                    "p95": _number(row.p95),
                    "mean": _number(row.mean),
                },
                "prompt_tokens": int(row.prompt),
                "completion_tokens": int(row.completion),
            }
            for row in rows
        }

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


class FeedbackRepository(ProjectScopedRepository[Feedback]):
    model = Feedback

    async def arms_of_alias(
        self, alias: str, since: datetime, until: datetime
    ) -> dict[str, dict[str, Any]]:
        """Per model, the feedback given in [since, until) about requests naming `alias`: how
        much, the scores' count, mean and sample standard deviation, and each label's count."""
        in_window = (
            Feedback.project_id == self.project_id,
            Feedback.alias == alias,
            Feedback.created_at >= since,
            Feedback.created_at < until,
        )
        scores = await self.session.execute(
            select(
                Feedback.model,
                func.count().label("given"),
                func.count(Feedback.score).label("scored"),
                func.avg(Feedback.score).label("mean"),
                func.stddev_samp(Feedback.score).label("stddev"),
            )
            .where(*in_window)
            .group_by(Feedback.model)
        )
        arms: dict[str, dict[str, Any]] = {
            row.model: {
                "count": int(row.given),
                "scored": int(row.scored),
                "mean_score": _number(row.mean),
                "stddev": _number(row.stddev),
                "labels": {},
            }
            for row in scores
        }
        labels = await self.session.execute(
            select(Feedback.model, Feedback.label, func.count().label("given"))
            .where(*in_window, Feedback.label.is_not(None))
            .group_by(Feedback.model, Feedback.label)
            .order_by(Feedback.model, Feedback.label)
        )
        for row in labels:
            arms[row.model]["labels"][row.label] = int(row.given)
        return arms


def _number(value: Any) -> float | None:
    """A float from an aggregate (numeric comes back as Decimal; nothing to aggregate is None)."""
    return None if value is None else float(value)
