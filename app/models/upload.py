from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class Upload(CreatedAtMixin, Base):
    """OpenAI's Upload: a large file arriving in parts, completed into a File."""

    __tablename__ = "uploads"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'completed', 'cancelled', 'expired')", name="status"
        ),
        Index("ix_uploads_project_id_created_at", "project_id", "created_at"),
        Index("ix_uploads_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mime_type: Mapped[str] = mapped_column(String(255), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    file_id: Mapped[str | None] = mapped_column(
        String(40), ForeignKey("files.id", ondelete="SET NULL"), nullable=True
    )
    # `expires_after` given at creation: the completed File expires this long after it is made.
    file_expires_after_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # When the maintenance worker removed the parts' content of this finished upload.
    parts_purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UploadPart(CreatedAtMixin, Base):
    __tablename__ = "upload_parts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    upload_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("uploads.id", ondelete="CASCADE"), nullable=False, index=True
    )
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    storage_key: Mapped[str] = mapped_column(String(200), nullable=False)
