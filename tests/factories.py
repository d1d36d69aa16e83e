"""Factories for test data, written through the same services the API uses."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import service as auth
from app.models import ApiKey, Project, Scope
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
