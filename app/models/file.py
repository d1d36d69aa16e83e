from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class File(CreatedAtMixin, Base):
    """OpenAI's File: a project's named pointer at a blob, with what tunegate learnt of it."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_id_created_at", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(
        String(64), ForeignKey("blobs.sha256"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    format: Mapped[str] = mapped_column(String(32), nullable=False)
    format_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What this file was made from (a conversion or a split), for people to trace it back.
    derived_from: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
