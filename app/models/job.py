from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
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

JOB_STATUSES = (
    "validating_files",
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "paused",
)
# Unfinished jobs: they still need their files (jobs/state.py decides the moves between them).
ACTIVE_JOB_STATUSES = frozenset({"validating_files", "queued", "running", "paused"})


class Job(CreatedAtMixin, Base):
    """OpenAI's fine_tuning.job plus how tunegate drives it at the provider."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('validating_files', 'queued', 'running', 'succeeded', 'failed', "
            "'cancelled', 'paused')",
            name="status",
        ),
        Index("ix_jobs_project_id_created_at", "project_id", "created_at"),
        # The submitter's queue: jobs stored but not yet created at the provider.
        Index(
            "ix_jobs_submit_queue",
            "next_attempt_at",
            postgresql_where=text("submitted_at IS NULL AND status = 'validating_files'"),
        ),
        # The syncer's queue: submitted, unfinished jobs by provider and due time.
        Index(
            "ix_jobs_sync_queue",
            "provider",
            "sync_due_at",
            postgresql_where=text("sync_due_at IS NOT NULL"),
        ),
        Index("ix_jobs_provider_provider_job_id", "provider", "provider_job_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    provider: Mapped[str] = mapped_column(String(32), nullable=False)
    provider_job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    training_file: Mapped[str] = mapped_column(String(40), nullable=False, index=True)
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONB, nullable=True)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSONB, nullable=False, default=list)
    estimated_cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # tunegate's automatic evaluation: asked at creation, the eval made when the job succeeded.
    evaluate: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default="false"
    )
    eval_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # Submission (the submitter worker): attempts, backoff and the lease of the worker on it.
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    submit_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_submit_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Syncing (the syncer worker): when the job is next due, the lease of the syncer on it, the
    # provider cursors already read, and consecutive failures for the backoff.
    sync_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sync_lease_until: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    sync_requested_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    sync_failures: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    last_synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_sync_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    event_cursor: Mapped[str | None] = mapped_column(String(128), nullable=True)
    checkpoint_cursor: Mapped[str | None] = mapped_column(String(128), nullable=True)

    @property
    def file_ids(self) -> list[str]:
        """The training file, then the validation file when there is one."""
        return [f for f in (self.training_file, self.validation_file) if f is not None]


class JobEvent(CreatedAtMixin, Base):
    """fine_tuning.job.event: tunegate's own (status changes) and the provider's, stored once."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_id_created_at", "job_id", "created_at"),
        Index(
            "uq_job_events_job_id_provider_event_id",
            "job_id",
            "provider_event_id",
            unique=True,
            postgresql_where=text("provider_event_id IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    level: Mapped[str] = mapped_column(String(16), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False, default="message")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    provider_event_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class JobCheckpoint(CreatedAtMixin, Base):
    __tablename__ = "job_checkpoints"
    __table_args__ = (Index("ix_job_checkpoints_job_id_step", "job_id", "step_number"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(256), nullable=False)
    step_number: Mapped[int] = mapped_column(Integer, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)


class ProviderFile(CreatedAtMixin, Base):
    """A File already uploaded to a provider: uploaded once per file and provider."""

    __tablename__ = "provider_files"

    file_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    provider_file_id: Mapped[str] = mapped_column(String(128), nullable=False)


class JobMetric(Base):
    """One training step's metrics (train/valid loss and accuracy), stored once per step."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    values: Mapped[dict[str, float]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ProviderRateBudget(Base):
    """A token bucket per provider shared by every replica: requests it may still make now."""

    __tablename__ = "provider_rate_budgets"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ProviderWebhookReceipt(Base):
    """An inbound provider webhook already handled (by its `webhook-id`), kept a day."""

    __tablename__ = "provider_webhook_receipts"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, index=True
    )
