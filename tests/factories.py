"""Factories for test data, written through the same services the API uses."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import service as auth
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import ApiKey, FineTunedModel, Job, Project, Scope
from app.projects import service as projects

_numbers = count(1)


@dataclass
class Credentials:
    project: Project
    key_row: ApiKey
    key: str


@dataclass
class Factories:
    session: AsyncSession

    async def project(self, name: str | None = None) -> Project:
        project = await projects.create(self.session, name or f"project-{next(_numbers)}")
        await self.session.commit()
        return project

    async def key(self, project: Project | None = None, scope: Scope = Scope.write) -> Credentials:
        project = project or await self.project()
        row, plaintext = await auth.create_key(self.session, project, scope)
        await self.session.commit()
        return Credentials(project=project, key_row=row, key=plaintext)

    async def fine_tuned_model(
        self, project: Project, model_id: str, base_model: str = "gpt-4o-mini-2024-07-18"
    ) -> FineTunedModel:
        """An OpenAI fine-tuned model of `project`, made by a succeeded job of its own."""
        job = Job(
            id=new_id("ftjob-"),
            project_id=project.id,
            provider="openai",
            model=base_model,
            training_file="file-x",
            method={"type": "supervised"},
            hyperparameters={},
            status="succeeded",
            result_files=[],
            submit_attempts=1,
        )
        self.session.add(job)
        await self.session.flush()
        model = FineTunedModel(
            id=model_id,
            project_id=project.id,
            provider="openai",
            base_model=base_model,
            job_id=job.id,
            created_at=utcnow(),
        )
        self.session.add(model)
        await self.session.commit()
        return model
