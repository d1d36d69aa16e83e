"""Files made from files: conversions to OpenAI chat JSONL, and train/validation splits.

The source blob is read streaming and the output spooled, so memory stays flat; the new Files
record what they were derived from and are validated like any upload.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, BinaryIO, cast

from sqlalchemy.ext.asyncio import AsyncSession

from app.files import service as files
from app.files.formats import DatasetFormat
from app.files.service import FilesContext
from app.files.storage import Spool, blob_key
from app.kit.errors import BadRequest
from app.models import File
from app.validation.conversions import (
    ConversionError,
    ConversionOptions,
    ConversionResult,
    convert_file,
)
from app.validation.schemas import ConversionCreate, SplitCreate
from app.validation.splits import SplitOptions, SplitResult, split_file


def _stem(filename: str) -> str:
    return filename.rsplit(".", 1)[0] if "." in filename else filename


async def _new_file(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    spool: Spool,
    filename: str,
    purpose: str,
    derived_from: dict[str, Any],
) -> File:
    row = await files.create_file(
        session, context, project_id, spool, files.sanitize_filename(filename), purpose
    )
    row.derived_from = derived_from
    await session.flush()
    return row


async def convert(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    file_id: str,
    body: ConversionCreate,
) -> tuple[File, ConversionResult]:
    async with context.sessionmaker() as reader:  # no transaction stays open during the I/O
        source = await files.get_file(reader, project_id, file_id)
    spool = context.storage.spool(context.settings.files.max_upload_bytes, "converted file")
    try:
        options = ConversionOptions(
            to_format=body.to,
            system_message=body.system_message,
            strip_whitespace=body.strip_whitespace,
            drop_duplicates=body.drop_duplicates,
            add_separator=body.add_separator,
            add_leading_space=body.add_leading_space,
            add_trailing_newline=body.add_trailing_newline,
        )
        async with context.storage.materialize(blob_key(source.sha256)) as path:
            result = await asyncio.to_thread(
                convert_file, path, DatasetFormat(source.format), cast(BinaryIO, spool), options
            )
    except (ConversionError, ValueError) as exc:
        spool.discard()
        raise BadRequest(str(exc), code="unsupported_conversion") from None
    except BaseException:
        spool.discard()
        raise
    if result.examples_out == 0:
        spool.discard()
        raise BadRequest(
            f"Nothing could be converted: all {result.examples_in} examples were skipped "
            f"(first: {result.skipped[:1]}).",
            param="file_id",
            code="empty_conversion",
        )
    derived = {
        "file_id": source.id,
        "operation": "conversion",
        "options": body.model_dump(),
        "examples_in": result.examples_in,
        "examples_out": result.examples_out,
    }
    row = await _new_file(
        session,
        context,
        project_id,
        spool,
        f"{_stem(source.filename)}.{body.to}.jsonl",
        source.purpose,
        derived,
    )
    return row, result


async def split(
    session: AsyncSession,
    context: FilesContext,
    project_id: str,
    file_id: str,
    body: SplitCreate,
) -> tuple[File, File, SplitResult]:
    async with context.sessionmaker() as reader:  # no transaction stays open during the I/O
        source = await files.get_file(reader, project_id, file_id)
    if source.format in {DatasetFormat.csv.value, DatasetFormat.unknown.value}:
        raise BadRequest(
            f"File {file_id} is {source.format}, not JSON Lines"
            + (
                f": convert it first (POST /v1/files/{file_id}/conversions)."
                if source.format == DatasetFormat.csv.value
                else f" ({source.format_reason})."
            ),
            param="file_id",
            code="unsupported_split",
        )
    options = SplitOptions(
        validation_fraction=body.validation_fraction,
        seed=body.seed,
        stratify_by_label=body.stratify_by_label,
    )
    limit = context.settings.files.max_upload_bytes
    train, held_out = (
        context.storage.spool(limit, "train split"),
        context.storage.spool(limit, "validation split"),
    )
    try:
        async with context.storage.materialize(blob_key(source.sha256)) as path:
            result = await asyncio.to_thread(
                split_file, Path(path), cast(BinaryIO, train), cast(BinaryIO, held_out), options
            )
    except ValueError as exc:
        train.discard()
        held_out.discard()
        raise BadRequest(str(exc), code="unsupported_split") from None
    except BaseException:
        train.discard()
        held_out.discard()
        raise
    common = {"file_id": source.id, "operation": "split", "options": body.model_dump()}
    stem = _stem(source.filename)
    train_row = await _new_file(
        session,
        context,
        project_id,
        train,
        f"{stem}.train.jsonl",
        source.purpose,
        common | {"part": "train", "examples": result.train_examples},
    )
    validation_row = await _new_file(
        session,
        context,
        project_id,
        held_out,
        f"{stem}.validation.jsonl",
        source.purpose,
        common | {"part": "validation", "examples": result.validation_examples},
    )
    return train_row, validation_row, result
