"""Every ORM model, one module per table, imported here so Alembic sees one metadata."""

from app.models.api_key import ApiKey, Scope
from app.models.project import Project

__all__ = ["ApiKey", "Project", "Scope"]
