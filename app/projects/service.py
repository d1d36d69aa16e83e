"""Projects (tenants). Managed by admin keys, which act for the whole instance."""

from __future__ import annotations

import re

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.kit.errors import Conflict, InvalidPayload, NotFound
from app.kit.ids import new_id
from app.models import Project
from app.projects.repository import ProjectRepository

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidPayload(
            "A project name is 1 to 64 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            param="name",
        )
    return name


async def create(session: AsyncSession, name: str) -> Project:
    check_name(name)
    repository = ProjectRepository(session)
    if await repository.by_name(name) is not None:
        raise Conflict(f"A project named '{name}' already exists.", param="name")
    project = Project(id=new_id("proj_"), name=name)
    try:
        async with session.begin_nested():
            session.add(project)
            await session.flush()
    except IntegrityError:
        raise Conflict(f"A project named '{name}' already exists.", param="name") from None
    await session.refresh(project)
    return project


async def update(session: AsyncSession, project_id: str, changes: dict[str, object]) -> Project:
    project = await get(session, project_id)
    if "name" in changes and changes["name"] is not None and changes["name"] != project.name:
        name = check_name(str(changes["name"]))
        if await ProjectRepository(session).by_name(name) is not None:
            raise Conflict(f"A project named '{name}' already exists.", param="name")
        project.name = name
    if "training_budget_usd" in changes:
        budget = changes["training_budget_usd"]
        project.training_budget_usd = None if budget is None else float(budget)  # type: ignore[arg-type]
    await session.flush()
    return project


async def get_or_create(session: AsyncSession, name: str) -> Project:
    existing = await ProjectRepository(session).by_name(check_name(name))
    return existing if existing is not None else await create(session, name)


async def get(session: AsyncSession, project_id: str) -> Project:
    project = await ProjectRepository(session).get(project_id)
    if project is None:
        raise NotFound(f"No project with id '{project_id}'.", param="project_id")
    return project


async def get_by_id_or_name(session: AsyncSession, ident: str) -> Project:
    repository = ProjectRepository(session)
    project = await repository.get(ident) or await repository.by_name(ident)
    if project is None:
        raise NotFound(f"No project with id or name '{ident}'.", param="project")
    return project
