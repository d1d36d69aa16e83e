from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.kit.time import to_unix
from app.models import ApiKey, Scope


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project_id: str | None = Field(
        default=None, max_length=64, description="Project the key acts for; default: the caller's."
    )
    scope: Scope = Field(default=Scope.write, description="admin, write or read.")
    name: str | None = Field(default=None, max_length=128, description="A label for people.")


class ApiKeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    project_id: str
    name: str | None
    scope: Scope
    prefix: str = Field(description="The visible part of the key; the rest is never shown again.")
    created_at: int
    last_used_at: int | None
    revoked_at: int | None

    @classmethod
    def of(cls, row: ApiKey) -> ApiKeyObject:
        return cls(
            id=row.id,
            project_id=row.project_id,
            name=row.name,
            scope=Scope(row.scope),
            prefix=row.prefix,
            created_at=to_unix(row.created_at) or 0,
            last_used_at=to_unix(row.last_used_at),
            revoked_at=to_unix(row.revoked_at),
        )


class ApiKeyCreated(ApiKeyObject):
    key: str = Field(description="The API key. Shown only in this answer: store it now.")


class ApiKeyDeleted(BaseModel):
    id: str
    object: Literal["api_key.deleted"] = "api_key.deleted"
    deleted: bool = True
