"""Validation reports, cost estimates, conversions and splits (tunegate extensions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.db.session import SessionDep
from app.files import service as files
from app.files.endpoints import Context as FilesContextDep
from app.files.schemas import FileObject
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import ListPage, PageParams, page_params, to_page
from app.models import File
from app.validation import derive, service
from app.validation.repository import ValidationRepository
from app.validation.schemas import (
    Conversion,
    ConversionCreate,
    Estimate,
    EstimateCreate,
    Split,
    SplitCreate,
    ValidationCreate,
    ValidationObject,
    summary_of,
)
from app.validation.service import ValidationContext

router = APIRouter(tags=["validation"], route_class=JSONRoute, responses=ERROR_RESPONSES)

FileId = Annotated[str, Path(max_length=64, description="The File's id (`file-…`).")]
ValidationId = Annotated[str, Path(max_length=64, description="The validation's id (`fval_…`).")]


def validation_context(request: Request) -> ValidationContext:
    return ValidationContext(
        settings=request.app.state.settings,
        storage=request.app.state.storage,
        sessionmaker=request.app.state.database.sessionmaker,
    )


Context = Annotated[ValidationContext, Depends(validation_context)]


@router.post("/v1/files/{file_id}/validations", response_model=ValidationObject)
async def create_validation(
    file_id: FileId,
    body: ValidationCreate,
    principal: WritePrincipal,
    session: SessionDep,
    context: Context,
) -> ValidationObject:
    """Check a file against a model and method: errors, warnings, stats, tokens, cost.
    Small files are answered `succeeded` at once; large ones `queued` (poll the GET)."""
    async with context.sessionmaker() as reader:  # the engine runs with no transaction open
        file = await files.get_file(reader, principal.project_id, file_id)
    target = service.resolve_target(context.settings, body.model, body.method, body.n_epochs)
    row = await service.create_validation(session, context, principal.project_id, file, target)
    return ValidationObject.of(row)


@router.get("/v1/files/{file_id}/validations", response_model=ListPage[ValidationObject])
async def list_validations(
    file_id: FileId,
    principal: ReadPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(page_params)],
) -> ListPage[ValidationObject]:
    await files.get_file(session, principal.project_id, file_id)
    repository = ValidationRepository(session, principal.project_id)
    statement = repository.select().where(repository.model.file_id == file_id)
    rows, has_more = await repository.paginate(statement, page)
    return to_page([ValidationObject.of(r) for r in rows], has_more, lambda v: v.id)


@router.get("/v1/files/{file_id}/validations/{validation_id}", response_model=ValidationObject)
async def retrieve_validation(
    file_id: FileId, validation_id: ValidationId, principal: ReadPrincipal, session: SessionDep
) -> ValidationObject:
    row = await service.get_validation(session, principal.project_id, file_id, validation_id)
    return ValidationObject.of(row)


@router.post(
    "/v1/files/{file_id}/validations/{validation_id}/cancel", response_model=ValidationObject
)
async def cancel_validation(
    file_id: FileId, validation_id: ValidationId, principal: WritePrincipal, session: SessionDep
) -> ValidationObject:
    row = await service.cancel_validation(session, principal.project_id, file_id, validation_id)
    return ValidationObject.of(row)


@router.post("/v1/fine_tuning/estimates", response_model=Estimate)
async def create_estimate(
    body: EstimateCreate, principal: WritePrincipal, session: SessionDep, context: Context
) -> Estimate:
    """Trained tokens, epochs and cost of a job before it is created (nothing is submitted)."""
    return await service.estimate(session, context, principal.project_id, body)


async def _file_object(
    session: SessionDep, context: ValidationContext, project_id: str, row: File
) -> FileObject:
    report = await service.validate_after_upload(session, context, project_id, row)
    return FileObject.of(row, None if report is None else summary_of(report))


@router.post("/v1/files/{file_id}/conversions", response_model=Conversion)
async def create_conversion(
    file_id: FileId,
    body: ConversionCreate,
    principal: WritePrincipal,
    session: SessionDep,
    files_context: FilesContextDep,
    context: Context,
) -> Conversion:
    """Convert CSV, prompt/completion, Gemini or Vertex data to OpenAI chat JSONL (or chat
    data to legacy prompt/completion) as a new File recording its source."""
    row, result = await derive.convert(session, files_context, principal.project_id, file_id, body)
    return Conversion(
        file=await _file_object(session, context, principal.project_id, row),
        examples_in=result.examples_in,
        examples_out=result.examples_out,
        duplicates_dropped=result.duplicates_dropped,
        skipped_count=result.skipped_count,
        skipped=result.skipped,
    )


@router.post("/v1/files/{file_id}/splits", response_model=Split)
async def create_split(
    file_id: FileId,
    body: SplitCreate,
    principal: WritePrincipal,
    session: SessionDep,
    files_context: FilesContextDep,
    context: Context,
) -> Split:
    """Split into a train File and a validation File, deterministic for a seed."""
    train, held_out, result = await derive.split(
        session, files_context, principal.project_id, file_id, body
    )
    return Split(
        train_file=await _file_object(session, context, principal.project_id, train),
        validation_file=await _file_object(session, context, principal.project_id, held_out),
        labels=result.labels,
    )
