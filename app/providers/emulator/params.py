"""Reading request bodies and query strings with OpenAI's error answers for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from app.providers.emulator.errors import (
    bad_request,
    invalid_type,
    invalid_value,
    missing_parameter,
)

T = TypeVar("T")


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON. If you have trouble figuring out how to fix "
            "this, please contact us through our help center at help.openai.com.)"
        )
    return body


def required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise missing_parameter(name)
    if not isinstance(value, str):
        raise invalid_type(name, "a string", value)
    return value


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid_type(name, "a string", value)
    return value


def optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid_type(name, "an integer", value)
    return value


def optional_object(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise invalid_type(name, "an object", value)
    return value


def query_limit(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise invalid_type("limit", "an integer", raw) from None
    if not 1 <= limit <= maximum:
        raise invalid_value("limit", f"expected a value between 1 and {maximum}, got {limit}.")
    return limit


def query_order(request: Request) -> str:
    order = request.query_params.get("order", "desc")
    if order not in {"asc", "desc"}:
        raise invalid_value("order", f"expected 'asc' or 'desc', got {order!r}.")
    return order


def page(
    items: Sequence[T], after: str | None, limit: int, id_of: Callable[[T], str]
) -> tuple[list[T], bool]:
    """The `limit` items following `after` in `items` (already in listing order)."""
    start = 0
    if after:
        ids = [id_of(item) for item in items]
        if after not in ids:
            return [], False
        start = ids.index(after) + 1
    chosen = list(items[start : start + limit])
    return chosen, start + limit < len(items)


def list_body(data: list[dict[str, Any]], has_more: bool, *, ids: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if ids:
        body["first_id"] = data[0]["id"] if data else None
        body["last_id"] = data[-1]["id"] if data else None
    return body
