"""Repository base classes. All SQL lives in repositories.

`ProjectScopedRepository` is the one way to read a project-owned table: every query it builds
carries the project filter, so no endpoint can forget it and another project's id is simply
"not found". `LeasedQueue` is a worker's view of a table of queued work (validations, evals).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Select, and_, or_, select, update
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


class LeasedQueue(Repository[ModelT]):
    """Rows of work (`status` queued/running, `lease_until`, `attempts`, `started_at`) that
    workers claim with SKIP LOCKED and a lease, and write only while the lease is theirs.

    No project filter: the worker acts for whichever project owns the claimed row, and
    writes only that row (and its own children)."""

    async def claim(self, now: datetime, lease_until: datetime) -> ModelT | None:
        """The oldest queued row, or a running one whose lease expired (its worker died),
        leased to the caller."""
        table = cast(Any, self.model)
        claimed: ModelT | None = await self.session.scalar(
            select(self.model)
            .where(
                or_(
                    table.status == "queued",
                    (table.status == "running") & (table.lease_until < now),
                )
            )
            .order_by(table.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if claimed is not None:
            row = cast(Any, claimed)
            row.status = "running"
            row.lease_until = lease_until
            row.attempts += 1
            row.started_at = row.started_at or now
            await self.session.flush()
        return claimed

    async def update_if_leased(
        self, row_id: str, held_lease: datetime, /, **values: Any
    ) -> ModelT | None:
        """Write only while we still hold the lease we claimed; None if someone took over."""
        row: ModelT | None = await self.session.scalar(
            update(self.model)
            .where(*self._leased(row_id, held_lease))
            .values(**values)
            .returning(self.model)
        )
        return row

    async def get_leased(self, row_id: str, held_lease: datetime) -> ModelT | None:
        """The row, locked, only while the lease we took is still ours."""
        found: ModelT | None = await self.session.scalar(
            select(self.model).where(*self._leased(row_id, held_lease)).with_for_update()
        )
        return found

    def _leased(self, row_id: str, held_lease: datetime) -> tuple[Any, ...]:
        table = cast(Any, self.model)
        return (
            table.id == row_id,
            table.status == "running",
            table.lease_until == held_lease,
        )
