"""Files and Uploads: store content once, record it, serve it back.

Order of writes, so that a crash at any point loses nothing and leaves nothing behind for long:
1. the body is spooled to a local temporary file (hash and size computed on the way);
2. the blob row is inserted or marked seen *in its own committed transaction*;
3. the content is put into storage (atomic) unless it is already there;
4. the File row is written by the request's unit of work.
A crash after 2 or 3 leaves a blob that no file references: garbage collection removes it after
the grace period (`TUNEGATE_FILES__BLOB_GC_GRACE`). Spool files of dead processes are swept too.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.files.formats import detect_format
from app.files.multipart import MultipartForm
from app.files.repository import BlobRepository, FileRepository, UploadRepository
from app.files.schemas import ExpiresAfter, Purpose, UploadComplete, UploadCreate
from app.files.storage import BlobStorage, Spool, blob_key, part_key
from app.kit.errors import BadRequest, Conflict, InvalidPayload, NotFound
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import File, Upload, UploadPart

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_FILENAME = 255


@dataclass(frozen=True)
class FilesContext:
    settings: Settings
    storage: BlobStorage
    sessionmaker: async_sessionmaker[AsyncSession]


def sanitize_filename(raw: str | None) -> str:
    """The last path component, without control characters, at most 255 characters."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _CONTROL.sub("", name).strip()
    if name in {"", ".", ".."}:
        name = "upload"
    if len(name) > MAX_FILENAME:
        _, dot, suffix = name.rpartition(".")
        keep = suffix if dot and len(suffix) <= 16 else ""
        name = name[: MAX_FILENAME - len(keep) - (1 if keep else 0)] + (f".{keep}" if keep else "")
    return name


def parse_purpose(value: str | None) -> Purpose:
    if value is None or value == "":
        raise InvalidPayload("Missing required parameter: 'purpose'.", param="purpose")
    try:
        return Purpose(value)
    except ValueError:
        allowed = ", ".join(p.value for p in Purpose)
        raise InvalidPayload(
            f"'{value}' is not a supported purpose; use one of: {allowed}.", param="purpose"
        ) from None


def expiry_from_form(fields: dict[str, str], now: datetime) -> datetime | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    try:
        if not (seconds or "").isascii() or not (seconds or "").isdigit():
            raise ValueError("not an integer")
        after = ExpiresAfter(anchor=anchor, seconds=int(seconds or ""))
    except ValueError:
        raise InvalidPayload(
            "expires_after needs anchor=created_at and seconds between 3600 and 2592000.",
            param="expires_after",
        ) from None
    return now + timedelta(seconds=after.seconds)


async def store_content(context: FilesContext, spool: Spool) -> None:
    """Steps 2 and 3 above: make the spooled content a durable blob (consumes the spool)."""
    spool.close()
    key = blob_key(spool.sha256)
    try:
        async with context.sessionmaker() as session, session.begin():
            await BlobRepository(session).touch(spool.sha256, spool.size, key, utcnow())
        if await context.storage.exists(key):
            spool.discard()
        else:
            await context.storage.put_file(key, spool.path)
    except BaseException:
        spool.discard()
        raise


async def create_file(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    spool: Spool,
    filename: str,
    purpose: Purpose | str,
    expires_at: datetime | None = None,
) -> File:
    spool.close()
    if spool.size == 0:
        spool.discard()
        raise BadRequest("The file is empty.", param="file")
    try:
        detection = await asyncio.to_thread(detect_format, spool.path, filename)
    except BaseException:
        spool.discard()
        raise
    size, sha256 = spool.size, spool.sha256
    await store_content(context, spool)
    row = File(
        id=new_id("file-"),
        purpose=str(purpose),
        filename=filename,
        bytes=size,
        sha256=sha256,
        status="processed",
        format=detection.format.value,
        format_reason=detection.reason,
        examples=detection.examples,
        expires_at=expires_at,
    )
    FileRepository(session, project_id).add(row)
    await session.flush()
    return row


async def file_from_bytes(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    filename: str,
    content: bytes,
    purpose: str,
) -> File:
    """A file tunegate itself makes (a job's result file): stored like an upload."""
    spool = context.storage.spool(max(1, len(content)))
    try:
        spool.write(content)
    except BaseException:
        spool.discard()
        raise
    return await create_file(
        session, context, project_id, spool, sanitize_filename(filename), purpose
    )


async def upload_form_to_file(
    session: AsyncSession, context: FilesContext, project_id: str, form: MultipartForm
) -> File:
    """POST /v1/files: the fields next to the file are checked before anything is stored."""
    spool = form.spool
    try:
        if spool is None:
            raise InvalidPayload("Missing required parameter: 'file'.", param="file")
        unknown = set(form.fields) - {"purpose", "expires_after[anchor]", "expires_after[seconds]"}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidPayload(f"Unrecognized request argument supplied: {name}", param=name)
        purpose = parse_purpose(form.fields.get("purpose"))
        expires_at = expiry_from_form(form.fields, utcnow())
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    filename = sanitize_filename(form.filename)
    return await create_file(session, context, project_id, spool, filename, purpose, expires_at)


async def get_file(session: AsyncSession, project_id: str, file_id: str) -> File:
    row = await FileRepository(session, project_id).get(file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


async def delete_file(session: AsyncSession, project_id: str, file_id: str) -> File:
    """Delete the File; its blob goes when no other file uses it (garbage collection)."""
    row = await get_file(session, project_id, file_id)
    await session.delete(row)
    await BlobRepository(session).mark_seen([row.sha256], utcnow())
    await session.flush()
    return row


def read_content(
    context: FilesContext, row: File, start: int = 0, end: int | None = None
) -> AsyncIterator[bytes]:
    return context.storage.read(blob_key(row.sha256), start, end)


# --- Uploads ------------------------------------------------------------------------------------


async def create_upload(
    session: AsyncSession, context: FilesContext, project_id: str, body: UploadCreate
) -> Upload:
    limit = context.settings.files.max_upload_bytes
    if body.bytes > limit:
        raise InvalidPayload(
            f"An Upload can hold at most {limit} bytes; {body.bytes} were declared.",
            param="bytes",
        )
    now = utcnow()
    row = Upload(
        id=new_id("upload_"),
        filename=sanitize_filename(body.filename),
        purpose=body.purpose.value,
        bytes=body.bytes,
        mime_type=body.mime_type,
        status="pending",
        created_at=now,
        expires_at=now + context.settings.files.upload_ttl,
        file_expires_after_seconds=None
        if body.expires_after is None
        else body.expires_after.seconds,
    )
    UploadRepository(session, project_id).add(row)
    await session.flush()
    return row


async def get_upload(
    session: AsyncSession, project_id: str, upload_id: str, *, for_update: bool = False
) -> Upload:
    row = await UploadRepository(session, project_id).get(upload_id, for_update=for_update)
    if row is None:
        raise NotFound(f"No such Upload object: {upload_id}", param="upload_id")
    return row


def _require_pending(upload: Upload, now: datetime) -> None:
    if upload.status == "pending" and upload.expires_at <= now:
        raise Conflict(f"Upload {upload.id} has expired.", code="upload_expired")
    if upload.status != "pending":
        raise Conflict(
            f"Upload {upload.id} is {upload.status}; it no longer accepts changes.",
            code=f"upload_{upload.status}",
        )


async def check_upload_open(context: FilesContext, project_id: str, upload_id: str) -> Upload:
    """A short read before a part streams in, so a closed upload is refused at once."""
    async with context.sessionmaker() as session:
        upload = await get_upload(session, project_id, upload_id)
    _require_pending(upload, utcnow())
    return upload


async def add_part(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    upload: Upload,
    form: MultipartForm,
) -> UploadPart:
    spool = form.spool
    if spool is None:
        raise InvalidPayload("Missing required parameter: 'data'.", param="data")
    spool.close()
    if spool.size == 0:
        spool.discard()
        raise BadRequest("The part is empty.", param="data")
    part_id = new_id("part_")
    part = UploadPart(
        id=part_id,
        upload_id=upload.id,
        project_id=project_id,
        bytes=spool.size,
        storage_key=part_key(upload.id, part_id),
    )
    try:
        await context.storage.put_file(part.storage_key, spool.path)
    except BaseException:
        spool.discard()
        raise
    try:
        locked = await get_upload(session, project_id, upload.id, for_update=True)
        _require_pending(locked, utcnow())
        received = await UploadRepository(session, project_id).received_bytes(upload.id)
        if received + part.bytes > locked.bytes:
            raise BadRequest(
                f"This part would bring the upload to {received + part.bytes} bytes, over the "
                f"{locked.bytes} declared when it was created.",
                param="data",
                code="upload_too_large",
            )
    except BaseException:
        await context.storage.delete(part.storage_key)
        raise
    session.add(part)
    await session.flush()
    return part


async def complete_upload(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    upload_id: str,
    body: UploadComplete,
) -> tuple[Upload, File]:
    # Read what is needed in a short transaction of its own: the concatenation below may take
    # minutes, and no transaction stays open meanwhile.
    async with context.sessionmaker() as reader:
        upload = await get_upload(reader, project_id, upload_id)
        _require_pending(upload, utcnow())
        duplicates = sorted(p for p, n in Counter(body.part_ids).items() if n > 1)
        if duplicates:
            raise InvalidPayload(
                f"Part {duplicates[0]} is listed more than once.", param="part_ids"
            )
        parts = await UploadRepository(reader, project_id).parts(upload_id, body.part_ids)
    by_id = {part.id: part for part in parts}
    missing = [p for p in body.part_ids if p not in by_id]
    if missing:
        raise InvalidPayload(
            f"Part {missing[0]} does not belong to upload {upload_id}.", param="part_ids"
        )
    ordered: Sequence[UploadPart] = [by_id[p] for p in body.part_ids]
    total = sum(part.bytes for part in ordered)
    if total != upload.bytes:
        raise BadRequest(
            f"The parts add up to {total} bytes but the upload was created with "
            f"bytes={upload.bytes}.",
            param="part_ids",
            code="upload_size_mismatch",
        )

    spool = context.storage.spool(context.settings.files.max_upload_bytes, "upload")
    if body.md5:
        spool.track_md5()
    try:
        for part in ordered:
            async for chunk in context.storage.read(part.storage_key):
                spool.write(chunk)
    except FileNotFoundError:
        spool.discard()
        raise Conflict(
            f"Upload {upload_id} was cancelled or expired while it was being completed."
        ) from None
    except BaseException:
        spool.discard()
        raise
    if body.md5 and spool.md5 != body.md5.lower():
        spool.discard()
        raise BadRequest(
            f"The md5 of the assembled file is {spool.md5}, not {body.md5}.",
            param="md5",
            code="md5_mismatch",
        )
    expires_at = (
        None
        if upload.file_expires_after_seconds is None
        else utcnow() + timedelta(seconds=upload.file_expires_after_seconds)
    )
    file = await create_file(
        session, context, project_id, spool, upload.filename, Purpose(upload.purpose), expires_at
    )
    # Only a still-pending upload completes: a concurrent complete or cancel wins otherwise.
    completed = await UploadRepository(session, project_id).complete_if_pending(upload_id, file.id)
    if completed is None:
        raise Conflict(f"Upload {upload_id} was completed or cancelled meanwhile.")
    return completed, file


async def cancel_upload(session: AsyncSession, project_id: str, upload_id: str) -> Upload:
    upload = await get_upload(session, project_id, upload_id, for_update=True)
    if upload.status != "cancelled":
        _require_pending(upload, utcnow())
        upload.status = "cancelled"
        await session.flush()
    return upload


async def upload_file_of(session: AsyncSession, project_id: str, upload: Upload) -> File | None:
    if upload.file_id is None:
        return None
    return await FileRepository(session, project_id).get(upload.file_id)
