"""Request field types with JSON's semantics rather than Python's conversions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator


def _json_numeric(kind: str) -> BeforeValidator:
    """Refuses what Python would convert to a number but JSON does not count as one: `true`,
    `"5"`. (JSON Schema counts 5.0 as an integer; pydantic checks it has no fraction.)"""

    def check(value: Any) -> Any:
        if isinstance(value, bool | str | bytes):
            raise ValueError(f"must be {kind}")
        return value

    return BeforeValidator(check)


JSON_INTEGER = _json_numeric("an integer")
JSON_NUMBER = _json_numeric("a number")
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
