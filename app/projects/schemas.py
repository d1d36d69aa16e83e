from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field

from app.kit.time import to_unix
from app.kit.types import JSON_NUMBER
from app.models import Project
from app.projects.service import NAME_PATTERN


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)


class ProjectObject(BaseModel):
    id: str
    object: Literal["project"] = "project"
    name: str
    created_at: int
    training_budget_usd: float | None = Field(
        description="Jobs estimated above this cost are refused; null: no budget."
    )

    @classmethod
    def of(cls, row: Project) -> ProjectObject:
        return cls(
            id=row.id,
            name=row.name,
            created_at=to_unix(row.created_at) or 0,
            training_budget_usd=row.training_budget_usd,
        )


class ProjectUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)
    training_budget_usd: Annotated[float, Interval(ge=0, le=1e9), JSON_NUMBER] | None = None
