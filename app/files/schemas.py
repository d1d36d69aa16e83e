from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.kit.time import to_unix
from app.kit.types import JSONInt
from app.models import File, Upload

MAX_UPLOAD_BYTES = 8 * 1024 * 1024 * 1024  # OpenAI's limit; the setting may only lower it


class Purpose(enum.StrEnum):
    """Purposes a client may upload with (OpenAI's; outputs such as fine-tune-results are ours)."""

    fine_tune = "fine-tune"
    batch = "batch"
    assistants = "assistants"
    vision = "vision"
    user_data = "user_data"
    evals = "evals"


class FileObject(BaseModel):
    """OpenAI's File object plus tunegate's fields (sha256, format, examples, validation)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str = Field(description="SHA-256 of the content (tunegate extension).")
    format: str = Field(
        description="Detected dataset format: chat, dpo, prompt_completion, csv, gemini, "
        "vertex_text or unknown (tunegate extension)."
    )
    format_reason: str | None = Field(
        default=None, description="Why the format is unknown, naming the line where it can."
    )
    examples: int | None = Field(default=None, description="Examples (lines or CSV rows).")
    validation: dict[str, Any] | None = Field(
        default=None, description="Summary of the latest validation report, once there is one."
    )

    derived_from: dict[str, Any] | None = Field(
        default=None, description="The file and operation this file was made from, if any."
    )

    @classmethod
    def of(cls, row: File, validation: dict[str, Any] | None = None) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=to_unix(row.created_at) or 0,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            status_details=row.status_details,
            expires_at=to_unix(row.expires_at),
            sha256=row.sha256,
            format=row.format,
            format_reason=row.format_reason,
            examples=row.examples,
            validation=validation,
            derived_from=row.derived_from,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: JSONInt = Field(ge=3600, le=2592000)


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=1024)
    purpose: Purpose
    bytes: JSONInt = Field(
        ge=1,
        le=MAX_UPLOAD_BYTES,
        description="Total size of the file (at most 8 GB); the parts must add up to it.",
    )
    mime_type: str = Field(min_length=1, max_length=255)
    expires_after: ExpiresAfter | None = None


class UploadComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    part_ids: list[str] = Field(
        min_length=1,
        max_length=10_000,
        json_schema_extra={"uniqueItems": True},
        description="The parts, in the order their bytes make the file.",
    )
    md5: str | None = Field(default=None, max_length=64)


class UploadObject(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None = None

    @classmethod
    def of(cls, row: Upload, file: File | None = None) -> UploadObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=to_unix(row.created_at) or 0,
            expires_at=to_unix(row.expires_at) or 0,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            file=None if file is None else FileObject.of(file),
        )


class UploadPartObject(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str
