"""`/v1/api_keys`: admin management of API keys (create, list, retrieve, revoke)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from app.auth import service
from app.auth.dependencies import AdminPrincipal
from app.auth.repository import ApiKeyRepository
from app.auth.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyDeleted, ApiKeyObject
from app.db.session import SessionDep
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import ListPage, PageParams, page_params, to_page
from app.projects import service as projects

router = APIRouter(
    prefix="/v1/api_keys", tags=["api_keys"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

KeyId = Annotated[str, Path(max_length=128, description="Key id (`key_…`) or visible prefix.")]


@router.post("", response_model=ApiKeyCreated)
async def create_api_key(
    body: ApiKeyCreate, principal: AdminPrincipal, session: SessionDep
) -> ApiKeyCreated:
    """Create a key. The key itself is in this answer only; tunegate keeps just its hash."""
    project = await projects.get(session, body.project_id or principal.project_id)
    row, plaintext = await service.create_key(session, project, body.scope, body.name)
    return ApiKeyCreated(**ApiKeyObject.of(row).model_dump(), key=plaintext)


@router.get("", response_model=ListPage[ApiKeyObject])
async def list_api_keys(
    principal: AdminPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(page_params)],
    project_id: Annotated[
        str | None, Query(max_length=64, description="Default: the caller's project.")
    ] = None,
) -> ListPage[ApiKeyObject]:
    """List keys of a project (visible prefixes only)."""
    project = await projects.get(session, project_id or principal.project_id)
    repository = ApiKeyRepository(session, project.id)
    rows, has_more = await repository.paginate(repository.select(), page)
    return to_page([ApiKeyObject.of(row) for row in rows], has_more, lambda k: k.id)


@router.get("/{key_id}", response_model=ApiKeyObject)
async def retrieve_api_key(key_id: KeyId, _: AdminPrincipal, session: SessionDep) -> ApiKeyObject:
    return ApiKeyObject.of(await service.find_one_key(session, key_id))


@router.post("/{key_id}/revoke", response_model=ApiKeyObject)
async def revoke_api_key(
    key_id: KeyId, request: Request, _: AdminPrincipal, session: SessionDep
) -> ApiKeyObject:
    """Revoke a key: it answers 401 from now on. The record stays for audit."""
    key = await service.revoke_key(session, await service.find_one_key(session, key_id))
    # This process forgets it now; the others when the revocation's notification arrives.
    request.app.state.key_cache.forget_key(key.id)
    return ApiKeyObject.of(key)


@router.delete("/{key_id}", response_model=ApiKeyDeleted)
async def delete_api_key(
    key_id: KeyId, request: Request, _: AdminPrincipal, session: SessionDep
) -> ApiKeyDeleted:
    """Same as revoke, answered with a deleted object (OpenAI's shape)."""
    key = await service.revoke_key(session, await service.find_one_key(session, key_id))
    request.app.state.key_cache.forget_key(key.id)
    return ApiKeyDeleted(id=key.id)
