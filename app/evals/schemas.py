from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.kit.time import to_unix
from app.kit.types import JSONNumber
from app.models import Eval

Metric = Literal["exact_match", "accuracy", "f1", "json_valid", "latency", "tokens"]
METRICS: tuple[Metric, ...] = ("exact_match", "accuracy", "f1", "json_valid", "latency", "tokens")
MAX_MODELS = 5


class Normalize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trim: bool = Field(default=True, description="Strip white space around both answers.")
    ignore_case: bool = Field(default=False, description="Compare case-insensitively.")


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="Any model the project may use.")
    rubric: str = Field(
        min_length=1,
        max_length=8000,
        description="What a better answer is, in your words (e.g. 'correct, concise, polite').",
    )


class EvalCreate(BaseModel):
    """What to compare: two or more models on a held-out chat JSONL file."""

    model_config = ConfigDict(extra="forbid")

    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        min_length=2,
        max_length=MAX_MODELS,
        description="Model ids (or aliases); the first is the baseline the others are compared "
        "with, typically the base model and then its fine-tune.",
        json_schema_extra={"uniqueItems": True},
    )
    file: str = Field(
        min_length=1,
        max_length=64,
        description="A chat JSONL file (e.g. a validation split): each example's last assistant "
        "message is the expected answer, the messages before it the prompt.",
    )
    metrics: list[Metric] | None = Field(
        default=None,
        description="Which metrics to report (default: every one that applies). accuracy, the "
        "per-label accuracy and the confusion matrix apply when the expected answers are a few "
        "labels; json_valid when they are JSON.",
    )
    normalize: Normalize = Field(default_factory=Normalize)
    judge: JudgeConfig | None = Field(
        default=None,
        description="A model that compares each answer with the baseline's, by the rubric, "
        "asked twice with the order swapped.",
    )
    max_examples: int = Field(default=1000, ge=1, le=10_000)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=32_768,
        description="Per answer (default: twice the longest expected answer, at least 16).",
    )
    temperature: JSONNumber = Field(default=0.0, ge=0.0, le=2.0)
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @field_validator("models")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each model may appear once")
        return value


class EvalError(BaseModel):
    code: str
    message: str


class EvalProgress(BaseModel):
    examples: int | None = Field(description="Usable examples in the file (null until read).")
    completions_done: int
    completions_total: int


class EvalObject(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    models: list[str]
    file: str
    fine_tuning_job_id: str | None = Field(
        description="The job whose `evaluate: true` made this eval."
    )
    metrics: list[str]
    normalize: Normalize
    judge: JudgeConfig | None
    max_examples: int
    max_tokens: int | None
    temperature: float
    progress: EvalProgress
    results: dict[str, Any] | None = Field(
        description="Per model aggregates with 95 % intervals, comparisons with the baseline, "
        "the judge's win/tie/loss rates and the verdict; null until the eval succeeded."
    )
    error: EvalError | None
    metadata: dict[str, str] | None
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, row: Eval) -> EvalObject:
        config = row.config
        judge = config.get("judge")
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            models=list(row.models),
            file=row.file_id,
            fine_tuning_job_id=row.fine_tuning_job_id,
            metrics=list(config.get("metrics") or METRICS),
            normalize=Normalize(**config.get("normalize", {})),
            judge=JudgeConfig(**judge) if judge else None,
            max_examples=int(config.get("max_examples", 1000)),
            max_tokens=config.get("max_tokens"),
            temperature=float(config.get("temperature", 0.0)),
            progress=EvalProgress(
                examples=row.examples,
                completions_done=row.completions_done,
                completions_total=row.completions_total,
            ),
            results=row.results,
            error=EvalError(**row.error) if row.error else None,
            metadata=row.eval_metadata,
            created_at=to_unix(row.created_at) or 0,
            started_at=to_unix(row.started_at),
            finished_at=to_unix(row.finished_at),
        )


class EvalAnswer(BaseModel):
    model: str
    output: str | None
    error: str | None
    exact_match: bool | None
    label: str | None = Field(description="The label answered (classification evals).")
    f1: float | None
    valid_json: bool | None
    latency_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None


class EvalResultObject(BaseModel):
    """One held-out example: its prompt, the expected answer, every model's answer."""

    object: Literal["eval.result"] = "eval.result"
    id: str = Field(description="The example's index in the eval, as a pagination cursor.")
    example: int
    line: int
    prompt: list[dict[str, Any]]
    expected: str
    answers: list[EvalAnswer]
    judge: dict[str, Any] | None = Field(
        description="Per compared model: the judge's verdict in both orders and the outcome."
    )


class EvalDeleted(BaseModel):
    id: str
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool
