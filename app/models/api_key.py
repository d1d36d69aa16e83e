from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, CreatedAtMixin


class Scope(enum.StrEnum):
    """What a key may do; each scope includes the ones below it."""

    read = "read"
    write = "write"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, required: Scope) -> bool:
        return self.rank >= required.rank


_RANKS = {Scope.read: 0, Scope.write: 1, Scope.admin: 2}


class ApiKey(CreatedAtMixin, Base):
    """An API key. Only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("scope IN ('read', 'write', 'admin')", name="scope"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    # Visible part of the key (`tg-<prefix>-…`), for people to tell keys apart.
    prefix: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
