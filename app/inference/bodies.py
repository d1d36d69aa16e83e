"""The completion proxy's check of a request body: JSON (precise 400/415 otherwise), an
object, OpenAI's required fields of the right types (422 with `param`), everything else left to
pass through to the provider as sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from app.kit.errors import InvalidPayload, UnsupportedMediaType
from app.kit.http import is_json_content_type, parse_json_body

__all__ = ["MAX_MESSAGES", "check_messages", "check_prompt", "checked_body"]

MAX_MESSAGES: Final = 100_000
_TOKEN_ID_MAX: Final = 2**31 - 1


def check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("messages", "Field required" if messages is None else "must be an array")
    if not messages:
        raise _invalid("messages", "must have at least 1 item")
    if len(messages) > MAX_MESSAGES:
        raise _invalid("messages", f"must have at most {MAX_MESSAGES} items")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}]", "must be an object")


def check_prompt(body: dict[str, Any]) -> None:
    if "prompt" not in body:
        raise _invalid("prompt", "Field required")
    prompt = body["prompt"]
    if prompt is None or isinstance(prompt, str):
        return
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt) or all(_is_token(p) for p in prompt):
            return
        if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt):
            return
    raise _invalid("prompt", "must be a string, an array of strings, of tokens or of token arrays")


def _is_token(value: object) -> bool:
    return type(value) is int and 0 <= value <= _TOKEN_ID_MAX


def _invalid(param: str, reason: str) -> InvalidPayload:
    return InvalidPayload(f"Invalid value for '{param}': {reason}.", param=param)


def checked_body(
    raw: bytes, content_type: str | None, check: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """The request body as a dict with OpenAI's common fields right and `check` (the
    endpoint's own fields) passed, or a 4xx."""
    if not raw:
        raise InvalidPayload("The request body is missing or is not a JSON object.")
    if not is_json_content_type(content_type):
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {content_type or '(none)'!r}: "
            "send the body as JSON with 'Content-Type: application/json'."
        )
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise InvalidPayload("The request body is missing or is not a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not 1 <= len(model) <= 256:
        raise _invalid("model", "Field required" if model is None else "must be a model id")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", "must be an object")
    check(body)
    return body
