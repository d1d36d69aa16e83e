from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Interval, Len
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from app.files.schemas import FileObject
from app.kit.time import to_unix
from app.kit.types import JSON_INTEGER, JSON_NUMBER, JSONInt, JSONNumber
from app.models import ValidationReport
from app.validation.cost import EpochsSource
from app.validation.target import Method


class ValidationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128, description="Target model, e.g. gpt-4o-mini.")
    method: Method = "supervised"
    n_epochs: Annotated[int, Interval(ge=1, le=50), JSON_INTEGER] | None = Field(
        default=None, description="Default: OpenAI's rule."
    )


class ValidationProgress(BaseModel):
    bytes_done: int
    bytes_total: int
    lines_done: int


class ValidationObject(BaseModel):
    id: str
    object: Literal["file.validation"] = "file.validation"
    file_id: str
    model: str
    method: str
    n_epochs: int | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    verdict: Literal["valid", "valid_with_warnings", "invalid"] | None
    progress: ValidationProgress
    report: dict[str, Any] | None = Field(
        default=None,
        description="errors, warnings, stats, tokens, cost (see the README); once succeeded.",
    )
    error: str | None = None
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, row: ValidationReport) -> ValidationObject:
        return cls(
            id=row.id,
            file_id=row.file_id,
            model=row.model,
            method=row.method,
            n_epochs=row.n_epochs,
            status=row.status,
            verdict=row.verdict,
            progress=ValidationProgress(
                bytes_done=row.bytes_done, bytes_total=row.bytes_total, lines_done=row.lines_done
            ),
            report=row.report,
            error=row.error,
            created_at=to_unix(row.created_at) or 0,
            started_at=to_unix(row.started_at),
            finished_at=to_unix(row.finished_at),
        )


def summary_of(row: ValidationReport) -> dict[str, Any]:
    """The short form shown inside a File object."""
    report = row.report or {}
    cost = report.get("cost") or {}
    tokens = report.get("tokens") or {}
    return {
        "id": row.id,
        "status": row.status,
        "model": row.model,
        "method": row.method,
        "verdict": row.verdict,
        "errors": sum(e.get("count", 0) for e in report.get("errors", [])),
        "warnings": sum(w.get("count", 0) for w in report.get("warnings", [])),
        "examples": report.get("examples"),
        "total_tokens": tokens.get("total"),
        "estimated_cost_usd": cost.get("usd"),
    }


ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters with their ranges (the jobs API checks the same)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Interval(ge=1, le=50), JSON_INTEGER] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Interval(ge=1, le=256), JSON_INTEGER] | Literal["auto"] = "auto"
    learning_rate_multiplier: (
        Annotated[float, Interval(gt=0, le=100), JSON_NUMBER] | Literal["auto"]
    ) = "auto"
    beta: Annotated[float, Interval(gt=0, le=2), JSON_NUMBER] | Literal["auto"] | None = None
    # tunegate extensions for the local provider's LoRA training.
    lora_r: Annotated[int, Interval(ge=1, le=512), JSON_INTEGER] | None = None
    lora_alpha: Annotated[int, Interval(ge=1, le=4096), JSON_INTEGER] | None = None
    lora_dropout: Annotated[float, Interval(ge=0, lt=1), JSON_NUMBER] | None = None
    target_modules: Annotated[list[ModuleName], Len(1, 64)] | None = None


class MethodDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Method
    supervised: MethodDetails | None = None
    dpo: MethodDetails | None = None


class EstimateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    method: MethodSpec | None = None
    hyperparameters: Hyperparameters | None = None


class Estimate(BaseModel):
    object: Literal["fine_tuning.estimate"] = "fine_tuning.estimate"
    model: str
    method: Method
    training_file: str
    validation_file: str | None
    n_epochs: int
    n_epochs_source: EpochsSource
    examples: int
    trained_tokens: int = Field(description="Billable tokens: per epoch times epochs.")
    estimated_cost_usd: float | None
    usd_per_1m_tokens: float | None
    price_date: str | None
    expected_duration_seconds: int | None = Field(
        default=None, description="Known for the local trainer; None for hosted providers."
    )
    verdict: str | None
    training_validation_id: str
    validation_validation_id: str | None


class ConversionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: Literal["chat", "prompt_completion"] = "chat"
    system_message: str | None = Field(default=None, max_length=100_000)
    strip_whitespace: StrictBool = False
    drop_duplicates: StrictBool = False
    add_separator: str | None = Field(default=None, max_length=32)
    add_leading_space: StrictBool = False
    add_trailing_newline: StrictBool = False


class Conversion(BaseModel):
    object: Literal["file.conversion"] = "file.conversion"
    file: FileObject
    examples_in: int
    examples_out: int
    duplicates_dropped: int
    skipped_count: int
    skipped: list[dict[str, Any]]


class SplitCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    validation_fraction: JSONNumber = Field(ge=0.05, le=0.5)
    seed: JSONInt = Field(default=0, ge=0, le=2**31 - 1)
    stratify_by_label: StrictBool = False


class Split(BaseModel):
    object: Literal["file.split"] = "file.split"
    train_file: FileObject
    validation_file: FileObject
    labels: dict[str, dict[str, int]] | None
