"""`/v1/projects`: admin management of projects (tenants)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from app.auth.dependencies import AdminPrincipal
from app.db.session import SessionDep
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import ListPage, PageParams, page_params, to_page
from app.projects import service
from app.projects.repository import ProjectRepository
from app.projects.schemas import ProjectCreate, ProjectObject, ProjectUpdate

router = APIRouter(
    prefix="/v1/projects", tags=["projects"], route_class=JSONRoute, responses=ERROR_RESPONSES
)


@router.post("", response_model=ProjectObject)
async def create_project(
    body: ProjectCreate, _: AdminPrincipal, session: SessionDep
) -> ProjectObject:
    return ProjectObject.of(await service.create(session, body.name))


@router.get("", response_model=ListPage[ProjectObject])
async def list_projects(
    _: AdminPrincipal, session: SessionDep, page: Annotated[PageParams, Depends(page_params)]
) -> ListPage[ProjectObject]:
    repository = ProjectRepository(session)
    rows, has_more = await repository.paginate(repository.select(), page)
    return to_page([ProjectObject.of(row) for row in rows], has_more, lambda p: p.id)


@router.patch("/{project_id}", response_model=ProjectObject)
async def update_project(
    project_id: Annotated[str, Path(max_length=64)],
    body: ProjectUpdate,
    _: AdminPrincipal,
    session: SessionDep,
) -> ProjectObject:
    """Rename a project or set its training budget (send null to remove the budget)."""
    project = await service.update(session, project_id, body.model_dump(exclude_unset=True))
    return ProjectObject.of(project)


@router.get("/{project_id}", response_model=ProjectObject)
async def retrieve_project(
    project_id: Annotated[str, Path(max_length=64)], _: AdminPrincipal, session: SessionDep
) -> ProjectObject:
    return ProjectObject.of(await service.get(session, project_id))
