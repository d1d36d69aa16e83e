"""Time helpers: everything is timezone-aware UTC; the API speaks Unix seconds."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())
