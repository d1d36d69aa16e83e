from __future__ import annotations

from sqlalchemy import select

from app.db.repository import Repository
from app.models import Project


class ProjectRepository(Repository[Project]):
    model = Project

    async def by_name(self, name: str) -> Project | None:
        return await self.session.scalar(select(Project).where(Project.name == name))
