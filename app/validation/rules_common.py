"""What the format rules share: their context, hashing, JSON type names, tool definitions.

A rule checks one parsed example, records its problems in the issue log with the example's
line and the field's path, and, when the example has no error, adds it to the current batch
(texts to count, overhead tokens, hashes). An example with an error is not counted: its
tokens and hashes would describe data that cannot be trained on as it is.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import orjson

from app.validation.issues import IssueLog
from app.validation.pipeline import ExampleBatch
from app.validation.stats import Labels

__all__ = ["Context", "check_tools", "digest", "json_kind", "sorted_json"]

_SORT: Final = orjson.OPT_SORT_KEYS


class Context:
    """The state rules write to: issues, the batch being filled, per-example statistics."""

    def __init__(self, issues: IssueLog, role_tokens: dict[str, int]) -> None:
        self.issues = issues
        self.role_tokens = role_tokens
        self.batch = ExampleBatch()
        self.labels = Labels()
        self.valid_examples = 0
        self.image_parts = 0

        # Bound once: rules report problems with a single call.
        self.error = issues.add
        self.warn = issues.add  # the code decides the severity; two names read better


def digest(data: bytes) -> bytes:
    """16 bytes of SHA-256 (hardware-accelerated here, faster than blake2b or md5)."""
    return hashlib.sha256(data).digest()[:16]


def sorted_json(value: Any) -> bytes:
    """The canonical form of a JSON value for hashing: compact, keys sorted."""
    return orjson.dumps(value, option=_SORT)


def json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def check_tools(ctx: Context, example: dict[str, Any], prefix: str, line: int) -> bool:
    """Check `tools`, `functions` and `parallel_tool_calls` of an example (or a DPO input)."""
    ok = True
    tools = example.get("tools")
    if tools is not None:
        ok = _check_definitions(ctx, tools, f"{prefix}tools", line, wrapped=True) and ok
    functions = example.get("functions")
    if functions is not None:
        ok = _check_definitions(ctx, functions, f"{prefix}functions", line, wrapped=False) and ok
    parallel = example.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        ctx.error(
            "data_type",
            line,
            f"{prefix}parallel_tool_calls",
            f"parallel_tool_calls must be a boolean, not {json_kind(parallel)}",
        )
        ok = False
    return ok


def _check_definitions(ctx: Context, value: Any, path: str, line: int, *, wrapped: bool) -> bool:
    """`tools` ([{"type": "function", "function": {...}}]) or legacy `functions` ([{...}])."""
    if not isinstance(value, list):
        ctx.error("invalid_tools", line, path, f"must be a list, not {json_kind(value)}")
        return False
    ok = True
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if wrapped:
            if not isinstance(item, dict) or item.get("type") != "function":
                ctx.error(
                    "invalid_tools", line, where, 'each tool must be {"type": "function", ...}'
                )
                ok = False
                continue
            item, where = item.get("function"), f"{where}.function"
        if problem := _function_problem(item):
            ctx.error("invalid_tools", line, where, problem)
            ok = False
    return ok


def _function_problem(function: Any) -> str | None:
    if not isinstance(function, dict):
        return f"a function definition must be an object, not {json_kind(function)}"
    name = function.get("name")
    if not isinstance(name, str) or not name:
        return 'a function definition needs a non-empty string "name"'
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        return f'"description" of function "{name[:40]}" must be a string'
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        return f'"parameters" of function "{name[:40]}" must be a JSON schema object'
    return None
