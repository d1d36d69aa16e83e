from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class ModelAlias(CreatedAtMixin, Base):
    """A stable name of a project (`support-bot`) for one of its models, or for several that
    split its traffic by weight (an A/B test); switched atomically."""

    __tablename__ = "model_aliases"

    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The model, or the heaviest arm of a split alias, so readers that know one model still work.
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    # A split alias's arms, {model: integer weight}; null for an alias of one model.
    weights: Mapped[dict[str, int] | None] = mapped_column(JSONB, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
