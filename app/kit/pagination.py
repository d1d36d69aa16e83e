"""OpenAI-style cursor pagination: `after` (an object id), `limit`, `order`; `has_more` answers.

The query side is `Repository.paginate` (keyset on created_at, id).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

ItemT = TypeVar("ItemT", bound=BaseModel)

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class Order(enum.StrEnum):
    asc = "asc"
    desc = "desc"


class PageParams(BaseModel):
    after: str | None = None
    limit: int = DEFAULT_LIMIT
    order: Order = Order.desc


# The `after` cursor of every list: an id from a previous page (an empty one is refused).
AfterQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=128, description="Return objects after this id."),
]


def page_params(
    after: AfterQuery = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="Objects per page, 1 to 100.")
    ] = DEFAULT_LIMIT,
    order: Annotated[Order, Query(description="Order by creation time.")] = Order.desc,
) -> PageParams:
    return PageParams(after=after, limit=limit, order=order)


class ListPage(BaseModel, Generic[ItemT]):
    object: Literal["list"] = "list"
    data: list[ItemT]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def to_page(
    items: Sequence[ItemT], has_more: bool, id_of: Callable[[ItemT], str]
) -> ListPage[ItemT]:
    return ListPage[ItemT](
        data=list(items),
        first_id=id_of(items[0]) if items else None,
        last_id=id_of(items[-1]) if items else None,
        has_more=has_more,
    )
