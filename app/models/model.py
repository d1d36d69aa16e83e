from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class ProviderBaseModel(Base):
    """A base model a provider can fine-tune, as last reported by it (the models registry)."""

    __tablename__ = "base_models"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    context_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    training_usd_per_1m: Mapped[float | None] = mapped_column(Float, nullable=True)
    methods: Mapped[list[str]] = mapped_column(JSONB, nullable=False, default=list)
    shutdown_date: Mapped[str | None] = mapped_column(String(10), nullable=True)
    refreshed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class FineTunedModel(CreatedAtMixin, Base):
    """A model a succeeded job made; owned by the job's project. Deleting marks it deleted."""

    __tablename__ = "fine_tuned_models"
    __table_args__ = (
        Index("ix_fine_tuned_models_project_id_created_at", "project_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    provider: Mapped[str] = mapped_column(String(32), nullable=False)
    base_model: Mapped[str] = mapped_column(String(256), nullable=False)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True
    )
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
