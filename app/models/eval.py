from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin

EVAL_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class Eval(CreatedAtMixin, Base):
    """Models compared on held-out examples, and the evaluator's work queue (SKIP LOCKED +
    lease, like validation reports). `config` holds what was asked (metrics, normalisation,
    judge, generation settings); `results` the aggregates once it has run."""

    __tablename__ = "evals"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"
        ),
        Index("ix_evals_project_id_created_at", "project_id", "created_at"),
        # The evaluator's queue: only unfinished evals are indexed.
        Index(
            "ix_evals_queue", "created_at", postgresql_where=text("status IN ('queued', 'running')")
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    models: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    file_id: Mapped[str] = mapped_column(String(40), nullable=False, index=True)
    fine_tuning_job_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    skipped_lines: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completions_total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completions_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    results: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    eval_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONB, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EvalExample(Base):
    """A held-out example of an eval: the prompt (every message before the last assistant one)
    and the expected answer (that message), with the file line it came from."""

    __tablename__ = "eval_examples"

    eval_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("evals.id", ondelete="CASCADE"), primary_key=True
    )
    example: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    line: Mapped[int] = mapped_column(Integer, nullable=False)
    prompt: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False)
    expected: Mapped[str] = mapped_column(Text, nullable=False)
    # The judge's verdicts about this example: per compared model, both orders.
    judge: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)


class EvalResult(Base):
    """One model's answer to one held-out example, scored; written as the evaluator goes, so a
    resumed eval skips what is done."""

    __tablename__ = "eval_results"

    eval_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("evals.id", ondelete="CASCADE"), primary_key=True
    )
    example: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    exact_match: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    f1: Mapped[float | None] = mapped_column(Float, nullable=True)
    valid_json: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
