"""Repository base classes. All SQL lives in repositories.

`ProjectScopedRepository` is the one way to read a project-owned table: every query it builds
carries the project filter, so no endpoint can forget it and another project's id is simply
"not found".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.base import Base
from app.kit.errors import NotFound
from app.kit.pagination import Order, PageParams

ModelT = TypeVar("ModelT", bound=Base)


class Repository(Generic[ModelT]):
    model: type[ModelT]

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def select(self) -> Select[Any]:
        return select(self.model)

    async def get(self, id: str, *, for_update: bool = False) -> ModelT | None:
        """The row with this id (in scope), or None; `for_update` locks it (SELECT … FOR UPDATE)."""
        statement = self.select().where(self._id_column() == id)
        if for_update:
            statement = statement.with_for_update()
        found: ModelT | None = await self.session.scalar(statement)
        return found

    async def list(self, statement: Select[Any]) -> Sequence[ModelT]:
        rows: Sequence[ModelT] = (await self.session.scalars(statement)).all()
        return rows

    def add(self, obj: ModelT) -> ModelT:
        self.session.add(obj)
        return obj

    async def paginate(
        self, statement: Select[Any], params: PageParams
    ) -> tuple[Sequence[ModelT], bool]:
        """Keyset page of `statement` on (created_at, id); returns (rows, has_more).

        The `after` cursor is looked up through `self.select()`, so an id from outside this
        repository's scope is an unknown cursor, never a leak of its position.
        """
        created = self.model.created_at  # type: ignore[attr-defined]
        ident = self._id_column()
        if params.after:
            anchor = await self.session.scalar(
                self.select().with_only_columns(created).where(ident == params.after)
            )
            if anchor is None:
                raise NotFound(f"No object with id '{params.after}' to page after.", param="after")
            if params.order is Order.desc:
                statement = statement.where(
                    or_(created < anchor, and_(created == anchor, ident < params.after))
                )
            else:
                statement = statement.where(
                    or_(created > anchor, and_(created == anchor, ident > params.after))
                )
        if params.order is Order.desc:
            statement = statement.order_by(created.desc(), ident.desc())
        else:
            statement = statement.order_by(created.asc(), ident.asc())
        rows: Sequence[ModelT] = (
            await self.session.scalars(statement.limit(params.limit + 1))
        ).all()
        return rows[: params.limit], len(rows) > params.limit

    async def flush(self) -> None:
        await self.session.flush()

    def _id_column(self) -> Any:
        return self.model.id  # type: ignore[attr-defined]


class ProjectScopedRepository(Repository[ModelT]):
    """A repository whose every query is limited to one project's rows."""

    def __init__(self, session: AsyncSession, project_id: str) -> None:
        super().__init__(session)
        self.project_id = project_id

    def select(self) -> Select[Any]:
        return select(self.model).where(self.model.project_id == self.project_id)  # type: ignore[attr-defined]

    def add(self, obj: ModelT) -> ModelT:
        obj.project_id = self.project_id  # type: ignore[attr-defined]
        self.session.add(obj)
        return obj
