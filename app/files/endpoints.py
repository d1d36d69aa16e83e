"""OpenAI's Files API (`/v1/files`) and Uploads API (`/v1/uploads`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response, StreamingResponse

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.db.session import SessionDep
from app.files import service
from app.files.multipart import read_multipart
from app.files.repository import FileRepository
from app.files.schemas import (
    FileDeleted,
    FileObject,
    Purpose,
    UploadComplete,
    UploadCreate,
    UploadObject,
    UploadPartObject,
)
from app.files.service import FilesContext
from app.jobs import service as jobs_service
from app.kit import idempotency
from app.kit.errors import APIError, InvalidPayload
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import AfterQuery, ListPage, Order, PageParams, to_page
from app.kit.time import to_unix
from app.models import File
from app.validation import service as validations
from app.validation.schemas import summary_of
from app.validation.service import ValidationContext

files_router = APIRouter(
    prefix="/v1/files", tags=["files"], route_class=JSONRoute, responses=ERROR_RESPONSES
)
uploads_router = APIRouter(
    prefix="/v1/uploads", tags=["uploads"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

FileId = Annotated[str, Path(max_length=64, description="The File's id (`file-…`).")]
UploadId = Annotated[str, Path(max_length=64, description="The Upload's id (`upload_…`).")]

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "additionalProperties": False,
                    "dependentRequired": {
                        "expires_after[anchor]": ["expires_after[seconds]"],
                        "expires_after[seconds]": ["expires_after[anchor]"],
                    },
                    "properties": {
                        "file": {"type": "string", "format": "binary", "minLength": 1},
                        "purpose": {"type": "string", "enum": [p.value for p in Purpose]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": 3600,
                            "maximum": 2592000,
                        },
                    },
                }
            }
        },
    }
}
_PART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "additionalProperties": False,
                    "properties": {"data": {"type": "string", "format": "binary", "minLength": 1}},
                }
            }
        },
    }
}


def files_context(request: Request) -> FilesContext:
    return FilesContext(
        settings=request.app.state.settings,
        storage=request.app.state.storage,
        sessionmaker=request.app.state.database.sessionmaker,
    )


Context = Annotated[FilesContext, Depends(files_context)]


class RangeNotSatisfiable(APIError):
    status_code = 416
    code = "range_not_satisfiable"


@files_router.post(
    "", response_model=FileObject, openapi_extra=_MULTIPART_BODY | idempotency.OPENAPI_HEADER
)
async def create_file(
    request: Request, principal: WritePrincipal, session: SessionDep, context: Context
) -> FileObject | Response:
    """Upload a file (multipart `file` and `purpose`), streamed to storage as it arrives.
    With an `Idempotency-Key` header a retried upload answers the first upload's File."""
    idempotency.check_key(request.headers.get(idempotency.HEADER))
    limit = context.settings.files.max_file_bytes
    form = await read_multipart(
        request, file_field="file", new_spool=lambda: context.storage.spool(limit, "file")
    )
    parts = [
        *idempotency.field_parts(form.fields.items()),
        f"filename={form.filename}",
        f"sha256={form.spool.sha256 if form.spool is not None else ''}",
    ]

    async def work() -> FileObject:
        row = await service.upload_form_to_file(session, context, principal.project_id, form)
        return await _with_validation(session, context, principal.project_id, row)

    try:
        return await idempotency.run(
            request, session, context.sessionmaker, principal.project_id, parts, work
        )
    finally:
        if form.spool is not None:
            form.spool.discard()  # a replayed answer stores nothing; a stored spool is gone


async def _with_validation(
    session: SessionDep, context: FilesContext, project_id: str, row: File
) -> FileObject:
    """A new fine-tune file is validated for the default model before it is answered (small
    files; large ones are queued for the validator worker)."""
    validation = ValidationContext(context.settings, context.storage, context.sessionmaker)
    report = await validations.validate_after_upload(session, validation, project_id, row)
    return FileObject.of(row, None if report is None else summary_of(report))


def file_page_params(
    after: AfterQuery = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="1 to 10,000.")] = 10_000,
    order: Annotated[Order, Query()] = Order.desc,
) -> PageParams:
    return PageParams(after=after, limit=limit, order=order)


@files_router.get("", response_model=ListPage[FileObject])
async def list_files(
    principal: ReadPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(file_page_params)],
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> ListPage[FileObject]:
    repository = FileRepository(session, principal.project_id)
    statement = repository.select()
    if purpose:
        statement = statement.where(File.purpose == purpose)
    rows, has_more = await repository.paginate(statement, page)
    items = await _file_objects(session, principal.project_id, rows)
    return to_page(items, has_more, lambda f: f.id)


@files_router.get("/{file_id}", response_model=FileObject)
async def retrieve_file(
    file_id: FileId, principal: ReadPrincipal, session: SessionDep
) -> FileObject:
    row = await service.get_file(session, principal.project_id, file_id)
    return (await _file_objects(session, principal.project_id, [row]))[0]


async def _file_objects(
    session: SessionDep, project_id: str, rows: Sequence[File]
) -> list[FileObject]:
    """File objects carrying the summary of their latest validation (one query for all)."""
    latest = await validations.latest_summaries(session, project_id, [row.id for row in rows])
    return [
        FileObject.of(row, summary_of(latest[row.id]) if row.id in latest else None) for row in rows
    ]


@files_router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(
    file_id: FileId, principal: WritePrincipal, session: SessionDep
) -> FileDeleted:
    """Delete a file; a file an unfinished job trains on answers 409."""
    await jobs_service.ensure_not_in_use(session, principal.project_id, file_id)
    row = await service.delete_file(session, principal.project_id, file_id)
    return FileDeleted(id=row.id)


_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range -> (start, end exclusive); None means "serve it all"."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore the header
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable(
                f"Range {header} selects no bytes of a {size}-byte file.",
                headers={"Content-Range": f"bytes */{size}"},
            )
        return max(0, size - length), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise RangeNotSatisfiable(
            f"Range {header} is outside the file ({size} bytes).",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


@files_router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"},
        206: {"content": {"application/octet-stream": {}}, "description": "The requested range"},
        416: ERROR_RESPONSES[400] | {"description": "Range not satisfiable"},
    },
)
async def download_file(
    request: Request,
    file_id: FileId,
    principal: ReadPrincipal,
    session: SessionDep,
    context: Context,
) -> StreamingResponse:
    """The file's bytes, streamed; a single `Range: bytes=a-b` is honoured (206)."""
    # The unit of work ends when this function returns, before the first byte is streamed.
    row = await service.get_file(session, principal.project_id, file_id)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": _content_disposition(row.filename),
        "ETag": f'"{row.sha256}"',
    }
    span = (
        _parse_range(request.headers.get("range", ""), row.bytes)
        if "range" in request.headers
        else None
    )
    if span is None:
        headers["Content-Length"] = str(row.bytes)
        return StreamingResponse(
            service.read_content(context, row),
            media_type="application/octet-stream",
            headers=headers,
        )
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{row.bytes}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        service.read_content(context, row, start, end),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )


def _content_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


# --- Uploads ------------------------------------------------------------------------------------


@uploads_router.post("", response_model=UploadObject, openapi_extra=idempotency.OPENAPI_HEADER)
async def create_upload(
    request: Request,
    body: UploadCreate,
    principal: WritePrincipal,
    session: SessionDep,
    context: Context,
) -> UploadObject | Response:
    """Start a large upload; add parts of up to 64 MB, then complete it into a File."""

    async def work() -> UploadObject:
        row = await service.create_upload(session, context, principal.project_id, body)
        return UploadObject.of(row)

    return await idempotency.run(
        request, session, context.sessionmaker, principal.project_id, [await request.body()], work
    )


@uploads_router.post(
    "/{upload_id}/parts", response_model=UploadPartObject, openapi_extra=_PART_BODY
)
async def add_upload_part(
    request: Request,
    upload_id: UploadId,
    principal: WritePrincipal,
    session: SessionDep,
    context: Context,
) -> UploadPartObject:
    upload = await service.check_upload_open(context, principal.project_id, upload_id)
    limit = min(context.settings.files.max_part_bytes, upload.bytes)
    form = await read_multipart(
        request, file_field="data", new_spool=lambda: context.storage.spool(limit, "part", "data")
    )
    unknown = sorted(set(form.fields))
    if unknown:
        if form.spool is not None:
            form.spool.discard()
        raise InvalidPayload(
            f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
        )
    part = await service.add_part(session, context, principal.project_id, upload, form)
    return UploadPartObject(
        id=part.id, created_at=to_unix(part.created_at) or 0, upload_id=upload.id
    )


@uploads_router.post("/{upload_id}/complete", response_model=UploadObject)
async def complete_upload(
    upload_id: UploadId,
    body: UploadComplete,
    principal: WritePrincipal,
    session: SessionDep,
    context: Context,
) -> UploadObject:
    upload, file = await service.complete_upload(
        session, context, principal.project_id, upload_id, body
    )
    answer = UploadObject.of(upload)
    answer.file = await _with_validation(session, context, principal.project_id, file)
    return answer


@uploads_router.post("/{upload_id}/cancel", response_model=UploadObject)
async def cancel_upload(
    upload_id: UploadId, principal: WritePrincipal, session: SessionDep
) -> UploadObject:
    return UploadObject.of(await service.cancel_upload(session, principal.project_id, upload_id))


@uploads_router.get("/{upload_id}", response_model=UploadObject)
async def retrieve_upload(
    upload_id: UploadId, principal: ReadPrincipal, session: SessionDep
) -> UploadObject:
    """tunegate extension: read an Upload's status (OpenAI has no such call)."""
    upload = await service.get_upload(session, principal.project_id, upload_id)
    return UploadObject.of(
        upload, await service.upload_file_of(session, principal.project_id, upload)
    )
