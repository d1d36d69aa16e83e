"""Request field types with JSON's semantics rather than Python's conversions."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _json_integer(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer (pydantic checks it has no fraction), but neither
    # `true` nor `"5"` is one, though Python would convert both.
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be an integer")
    return value


JSON_INTEGER = BeforeValidator(_json_integer)
# Put range constraints *before* JSON_INTEGER (Annotated[int, Interval(...), JSON_INTEGER]) so
# they stay in the JSON schema.
JSONInt = Annotated[int, JSON_INTEGER]
