from __future__ import annotations

from sqlalchemy import CheckConstraint, Float, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class Feedback(CreatedAtMixin, Base):
    """What a user thought of one completion: a score in [-1, 1] and/or a label, maybe a comment.

    The model that answered and the alias the request named are copied from its usage record
    when the feedback arrives, so the A/B report reads feedback per arm without a join (and a
    request id a caller reused for several requests counts once, for the latest)."""

    __tablename__ = "feedback"
    __table_args__ = (
        CheckConstraint("score IS NULL OR (score >= -1 AND score <= 1)", name="score_range"),
        CheckConstraint("score IS NOT NULL OR label IS NOT NULL", name="score_or_label"),
        Index("ix_feedback_project_id_request_id", "project_id", "request_id"),
        # The A/B report reads one alias's feedback in a time window.
        Index("ix_feedback_project_id_alias_created_at", "project_id", "alias", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    alias: Mapped[str | None] = mapped_column(String(64), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
