from __future__ import annotations

from sqlalchemy import Float, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class Project(CreatedAtMixin, Base):
    """A tenant: every file, job, model and webhook belongs to exactly one project."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # Jobs whose estimated cost is above this are refused (None: no budget).
    training_budget_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
