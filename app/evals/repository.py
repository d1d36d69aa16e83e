from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import cast, func, insert, select, update
from sqlalchemy.dialects.postgresql import JSONB

from app.db.repository import LeasedQueue, ProjectScopedRepository
from app.models import Eval, EvalExample, EvalResult, Job


class EvalRepository(ProjectScopedRepository[Eval]):
    model = Eval

    async def unlink_job(self, job_id: str, eval_id: str) -> None:
        """The job no longer names a deleted eval as its evaluation."""
        await self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.project_id == self.project_id, Job.eval_id == eval_id)
            .values(eval_id=None)
        )

    async def examples_page(
        self, eval_id: str, after: int | None, limit: int
    ) -> tuple[Sequence[EvalExample], bool]:
        """Examples of the eval in index order after `after`; (rows, has_more)."""
        statement = (
            select(EvalExample)
            .where(EvalExample.eval_id == eval_id, EvalExample.project_id == self.project_id)
            .order_by(EvalExample.example)
            .limit(limit + 1)
        )
        if after is not None:
            statement = statement.where(EvalExample.example > after)
        rows = (await self.session.scalars(statement)).all()
        return rows[:limit], len(rows) > limit

    async def results_for(self, eval_id: str, examples: Sequence[int]) -> Sequence[EvalResult]:
        if not examples:
            return []
        return (
            await self.session.scalars(
                select(EvalResult).where(
                    EvalResult.eval_id == eval_id,
                    EvalResult.project_id == self.project_id,
                    EvalResult.example.in_(examples),
                )
            )
        ).all()


class EvalQueue(LeasedQueue[Eval]):
    """The evaluator worker's view: every project's queued evals, and the rows of the one it
    holds."""

    model = Eval

    async def done_keys(self, eval_id: str) -> set[tuple[int, str]]:
        """(example, model) of every answer already written."""
        rows = await self.session.execute(
            select(EvalResult.example, EvalResult.model).where(EvalResult.eval_id == eval_id)
        )
        return {(example, model) for example, model in rows.all()}

    async def add_examples(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(insert(EvalExample), rows)

    async def add_results(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(insert(EvalResult), rows)

    async def examples(self, eval_id: str) -> Sequence[EvalExample]:
        return (
            await self.session.scalars(
                select(EvalExample)
                .where(EvalExample.eval_id == eval_id)
                .order_by(EvalExample.example)
            )
        ).all()

    async def results(self, eval_id: str) -> Sequence[EvalResult]:
        return (
            await self.session.scalars(select(EvalResult).where(EvalResult.eval_id == eval_id))
        ).all()

    async def add_verdicts(self, eval_id: str, verdicts: dict[int, dict[str, Any]]) -> None:
        """Merge the judge's verdicts (per compared model) into each example's."""
        for example, verdict in verdicts.items():
            merged = func.coalesce(EvalExample.judge, cast({}, JSONB)).op("||")(
                cast(verdict, JSONB)
            )
            await self.session.execute(
                update(EvalExample)
                .where(EvalExample.eval_id == eval_id, EvalExample.example == example)
                .values(judge=merged)
            )
