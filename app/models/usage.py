from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Identity, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class UsageRecord(Base):
    """One inference request: who asked which model, the tokens the provider reported, how long
    it took and how it ended. Written in batches, off the request path."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_project_id_created_at", "project_id", "created_at"),
        # The A/B report reads one alias's records in a time window.
        Index("ix_usage_records_project_id_alias_created_at", "project_id", "alias", "created_at"),
        # Feedback names the request it is about.
        Index("ix_usage_records_project_id_request_id", "project_id", "request_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    api_key_id: Mapped[str] = mapped_column(String(40), nullable=False)
    # As long as an `x-request-id` a caller may choose (app/kit/http.py).
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model: Mapped[str] = mapped_column(String(256), nullable=False)  # the model that answered
    # The alias the request named, when it named one (`model` is then the arm it was sent to).
    alias: Mapped[str | None] = mapped_column(String(64), nullable=True)
    provider: Mapped[str] = mapped_column(String(32), nullable=False)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    latency_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
