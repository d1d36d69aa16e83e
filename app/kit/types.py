"""Request field types with JSON's semantics rather than Python's conversions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator


def _json_integer(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer (pydantic checks it has no fraction), but neither
    # `true` nor `"5"` is one, though Python would convert both.
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be an integer")
    return value


def _json_number(value: Any) -> Any:
    # Neither `true` nor `"0.2"` is a JSON number, though Python would convert both.
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be a number")
    return value


JSON_INTEGER = BeforeValidator(_json_integer)
JSON_NUMBER = BeforeValidator(_json_number)
# Put range constraints *before* JSON_INTEGER (Annotated[int, Interval(...), JSON_INTEGER]) so
# they stay in the JSON schema; the same for JSON_NUMBER.
JSONInt = Annotated[int, JSON_INTEGER]
JSONNumber = Annotated[float, JSON_NUMBER]


def fields_given(combinator: Literal["oneOf", "anyOf"], **types: str) -> dict[str, Any]:
    """JSON Schema for a body that must give exactly one (`oneOf`) or at least one (`anyOf`) of
    these fields, not null ({field: JSON type}): the OpenAPI document states what a body model's
    optional fields cannot, and the endpoint enforces it."""
    return {
        combinator: [
            {"required": [name], "properties": {name: {"type": kind}}}
            for name, kind in types.items()
        ]
    }
