"""Projects (tenants). Managed by admin keys, which act for the whole instance."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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


async def _ensure_name_free(session: AsyncSession, name: str) -> None:
    if await ProjectRepository(session).by_name(name) is not None:
        raise Conflict(f"A project named '{name}' already exists.", param="name")


async def create(session: AsyncSession, name: str) -> Project:
    await _ensure_name_free(session, check_name(name))
    project = Project(id=new_id("proj_"), name=name)
    try:
        async with session.begin_nested():
            session.add(project)
            await session.flush()
    except IntegrityError:
        raise Conflict(f"A project named '{name}' already exists.", param="name") from None
    await session.refresh(project)
    return project


async def update(session: AsyncSession, project_id: str, changes: Mapping[str, Any]) -> Project:
    """Apply the fields a PATCH sent (`changes` holds only those): a new name, or a training
    budget (None removes it)."""
    project = await get(session, project_id)
    if "name" in changes:
        name = changes["name"]
        if name is None:
            raise InvalidPayload("A project's name cannot be removed (null).", param="name")
        if name != project.name:
            await _ensure_name_free(session, check_name(name))
            project.name = name
    if "training_budget_usd" in changes:
        project.training_budget_usd = changes["training_budget_usd"]
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
