from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.kit.time import to_unix
from app.kit.types import JSON_INTEGER
from app.models import Job, JobCheckpoint, JobEvent
from app.validation.schemas import Hyperparameters

SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_METADATA_PAIRS = 16


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class JobMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: SupervisedMethod | None = None


class JobCreate(BaseModel):
    """OpenAI's create-job parameters, plus tunegate's `provider`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = Field(
        default=None,
        max_length=64,
        # Documented here, checked by _suffix_characters (whose message says what is allowed).
        json_schema_extra={"pattern": SUFFIX_PATTERN.pattern},
        description="Up to 64 letters, digits, '-' or '_'.",
    )
    seed: Annotated[int, Interval(ge=0, le=2_147_483_647), JSON_INTEGER] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None,
        description="Up to 16 key-value pairs (keys up to 64 characters); 15 for OpenAI jobs.",
        json_schema_extra={
            "maxProperties": MAX_METADATA_PAIRS,
            "propertyNames": {"minLength": 1, "maxLength": 64},
        },
    )
    method: JobMethod | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method; still accepted."
    )
    integrations: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported by tunegate: only null or [] is accepted."
    )
    provider: str | None = Field(
        default=None,
        max_length=32,
        description="tunegate: a configured provider (`openai`, `local`); default: the model's.",
    )
    evaluate: bool = Field(
        default=False,
        description="tunegate: when the job succeeds, evaluate the fine-tuned model against its "
        "base model on the validation file (an eval, linked as `eval_id`; needs "
        "`validation_file`).",
    )

    @field_validator("suffix")
    @classmethod
    def _suffix_characters(cls, value: str | None) -> str | None:
        if value is not None and not SUFFIX_PATTERN.match(value):
            raise ValueError("must be 1 to 64 letters, digits, '-' or '_'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        if any(not key or len(key) > 64 for key in value):
            raise ValueError("keys must be 1 to 64 characters")
        return value


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, stored: dict[str, Any] | None) -> JobError | None:
        """The stored error (ours, or a provider's, which may lack fields) in OpenAI's shape."""
        if not stored:
            return None
        param = stored.get("param")
        return cls(
            code=str(stored.get("code") or "provider_error"),
            message=str(stored.get("message") or "The job failed at its provider."),
            param=param if isinstance(param, str) else None,
        )


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal[
        "validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"
    ]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None
    method: dict[str, Any]
    provider: str = Field(description="tunegate: which provider runs the job.")
    provider_job_id: str | None = Field(description="tunegate: the job's id at the provider.")
    estimated_cost: float | None = Field(description="tunegate: estimated cost in USD.")
    evaluate: bool = Field(
        default=False, description="tunegate: evaluated against its base model when it succeeds."
    )
    eval_id: str | None = Field(
        default=None, description="tunegate: the eval made when it succeeded (`evaluate`)."
    )

    @classmethod
    def of(cls, row: Job) -> JobObject:
        return cls(
            id=row.id,
            created_at=to_unix(row.created_at) or 0,
            error=JobError.of(row.error),
            fine_tuned_model=row.fine_tuned_model,
            finished_at=to_unix(row.finished_at),
            hyperparameters=row.hyperparameters,
            model=row.model,
            organization_id=row.project_id,
            result_files=list(row.result_files or []),
            seed=row.seed or 0,
            status=row.status,
            trained_tokens=row.trained_tokens,
            training_file=row.training_file,
            validation_file=row.validation_file,
            estimated_finish=to_unix(row.estimated_finish),
            metadata=row.job_metadata,
            method=row.method,
            provider=row.provider,
            provider_job_id=row.provider_job_id,
            estimated_cost=row.estimated_cost_usd,
            evaluate=bool(row.evaluate),
            eval_id=row.eval_id,
        )


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None

    @classmethod
    def of(cls, row: JobEvent) -> JobEventObject:
        return cls(
            id=row.id,
            created_at=to_unix(row.created_at) or 0,
            level=row.level if row.level in {"info", "warn", "error"} else "info",
            message=row.message,
            type="metrics" if row.type == "metrics" else "message",
            data=row.data,
        )


class JobCheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int

    @classmethod
    def of(cls, row: JobCheckpoint) -> JobCheckpointObject:
        return cls(
            id=row.id,
            created_at=to_unix(row.created_at) or 0,
            fine_tuned_model_checkpoint=row.fine_tuned_model_checkpoint,
            fine_tuning_job_id=row.job_id,
            metrics=row.metrics,
            step_number=row.step_number,
        )


class JobMetricsPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int


class JobMetricsObject(BaseModel):
    """Per-step training metrics of a job (tunegate extension): train/valid loss and accuracy
    as the provider reported them, one point per step, oldest first."""

    object: Literal["fine_tuning.job.metrics"] = "fine_tuning.job.metrics"
    fine_tuning_job_id: str
    data: list[JobMetricsPoint]
