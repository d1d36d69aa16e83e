"""Checks of a chat `messages` list, shared by chat examples and DPO inputs.

The common message, `{"role": ..., "content": "..."}` with a plain role, takes a fast path of a
few dictionary lookups; anything else gets every check, each problem reported at its field
path (`messages[3].tool_calls[0].function.arguments`). Texts to count go straight into the
batch (system prompts and names into its shared texts, which are counted once per batch); the
caller rolls them back if the example turns out to have an error.

Tokens follow OpenAI's cookbook: per message `TOKENS_PER_MESSAGE` + role + content (+ name +
`TOKENS_PER_NAME`); tool calls and function calls count as their compact JSON text. Trained
tokens are the content and tool calls of assistant messages whose weight is not 0.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

import orjson

from app.validation.issues import clip
from app.validation.rules_common import Context, json_kind
from app.validation.tokens import TOKENS_PER_MESSAGE, TOKENS_PER_NAME

__all__ = [
    "ASSISTANT",
    "PLAIN_ROLE_BITS",
    "ROLES",
    "SYSTEM",
    "USER",
    "MessagesSummary",
    "check_messages",
]

ROLES: Final = ("system", "developer", "user", "assistant", "tool", "function")
_ROLE_SET: Final = frozenset(ROLES)
_MESSAGE_KEYS: Final = frozenset(
    ("role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call")
)
_ALLOWED_KEYS_TEXT: Final = ", ".join(sorted(_MESSAGE_KEYS))

# Bits of MessagesSummary.roles.
SYSTEM: Final = 1
USER: Final = 2
ASSISTANT: Final = 4
# The roles a plain message (the fast paths here and in `rules_chat.ChatRules.add_plain`) may
# have, with their bits; a developer message is a system message.
PLAIN_ROLE_BITS: Final = {
    "system": SYSTEM,
    "developer": SYSTEM,
    "user": USER,
    "assistant": ASSISTANT,
}


class MessagesSummary(NamedTuple):
    """What an example's rule needs to know about its messages, when they have no error."""

    fixed_tokens: int  # overhead and roles: tokens known without the tokenizer
    roles: int  # SYSTEM | USER | ASSISTANT bits of the roles present
    last_assistant: int  # index of the last assistant message, -1 if none
    answer: str | None  # its content when that is a plain string, else None
    # Role and content of each message, in order, when every message is a plain
    # {"role", "content"} pair (the common case): enough to identify the prompt without
    # serialising it. None when any message has more to it.
    plain: list[str] | None


def check_messages(
    ctx: Context, messages: list[Any], prefix: str, line: int, key: int, trainable: bool
) -> MessagesSummary | None:
    """Check every message; None when any has an error (all errors are reported).

    `key` is 2 * the example's index in the batch; assistant texts get `key + 1` (trained)
    when `trainable`.
    """
    batch = ctx.batch
    texts, keys = batch.texts, batch.keys
    role_tokens = ctx.role_tokens
    trained_key = key + 1 if trainable else key
    fixed = roles = 0
    last = -1
    answer: str | None = None
    ok = True
    plain: list[str] | None = []
    for i, message in enumerate(messages):
        if type(message) is dict and len(message) == 2:
            role = message.get("role")
            content = message.get("content")
            if type(content) is str and content and type(role) is str and role in PLAIN_ROLE_BITS:
                fixed += TOKENS_PER_MESSAGE + role_tokens[role]
                if plain is not None:
                    plain.append(role)
                    plain.append(content)
                if role == "assistant":
                    texts.append(content)
                    keys.append(trained_key)
                    last, answer = i, content
                elif role == "user":
                    texts.append(content)
                    keys.append(key)
                else:  # system prompts repeat: counted once per batch
                    batch.shared_texts.append(content)
                    batch.shared_keys.append(key)
                roles |= PLAIN_ROLE_BITS[role]
                continue
        plain = None
        checked = _check_message(ctx, message, f"{prefix}[{i}]", line, key, trained_key)
        if checked is None:
            ok = False
            continue
        role, message_fixed, message_answer = checked
        fixed += message_fixed
        roles |= PLAIN_ROLE_BITS.get(role, 0)
        if role == "assistant":
            last, answer = i, message_answer
    if not ok:
        return None
    return MessagesSummary(fixed, roles, last, answer, plain)


def _check_message(
    ctx: Context, message: Any, path: str, line: int, key: int, trained_key: int
) -> tuple[str, int, str | None] | None:
    """Every check of one message: (role, fixed tokens, plain answer) or None on error."""
    if not isinstance(message, dict):
        ctx.error("data_type", line, path, f"a message must be an object, not {json_kind(message)}")
        return None
    ok = True
    extra = message.keys() - _MESSAGE_KEYS
    if extra:
        names = sorted(extra)
        ctx.error(
            "message_unrecognized_key",
            line,
            f"{path}.{clip(names[0])}",
            f"unrecognized key(s) {', '.join(repr(clip(n)) for n in names[:5])}; "
            f"a message may have: {_ALLOWED_KEYS_TEXT}",
        )
        ok = False
    role = _check_role(ctx, message, path, line)
    ok = ok and role is not None
    is_assistant = role == "assistant"
    tool_calls = message.get("tool_calls")
    function_call = message.get("function_call")
    has_calls = tool_calls is not None or function_call is not None
    trained = True
    if "weight" in message:
        weight = message["weight"]
        if role is not None and not is_assistant:
            ctx.error(
                "invalid_weight",
                line,
                f"{path}.weight",
                f"weight is only allowed on assistant messages, not on a {role} message",
            )
            ok = False
        elif (
            isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1)
        ):
            shown = clip(orjson.dumps(weight).decode()) if weight is not None else "null"
            ctx.error(
                "invalid_weight", line, f"{path}.weight", f"weight must be 0 or 1, not {shown}"
            )
            ok = False
        else:
            trained = weight == 1
    text_key = trained_key if is_assistant and trained else key
    answer: str | None = None
    fixed = TOKENS_PER_MESSAGE
    if role is not None:
        fixed += ctx.role_tokens[role]
    content_ok, answer = _check_content(ctx, message, role, has_calls, path, line, text_key)
    ok = content_ok and ok
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str) or not name:
            ctx.error("data_type", line, f"{path}.name", "name must be a non-empty string")
            ok = False
        else:
            _add_text(ctx, name, key, shared=True)
            fixed += TOKENS_PER_NAME
    elif role == "function":
        ctx.error("message_missing_key", line, f"{path}.name", "a function message needs a name")
        ok = False
    if role == "tool":
        tool_call_id = message.get("tool_call_id")
        if tool_call_id is None:
            ctx.error(
                "message_missing_key",
                line,
                f"{path}.tool_call_id",
                "a tool message needs the tool_call_id of the call it answers",
            )
            ok = False
        elif not isinstance(tool_call_id, str):
            ctx.error("data_type", line, f"{path}.tool_call_id", "tool_call_id must be a string")
            ok = False
    for field, value in (("tool_calls", tool_calls), ("function_call", function_call)):
        if value is None:
            continue
        if role is not None and not is_assistant:
            ctx.error(
                "invalid_tool_calls",
                line,
                f"{path}.{field}",
                f"only assistant messages can have {field}, not a {role} message",
            )
            ok = False
        elif problem := (_tool_calls_problem if field == "tool_calls" else _call_problem)(value):
            ctx.error("invalid_tool_calls", line, f"{path}.{field}{problem[0]}", problem[1])
            ok = False
        else:
            _add_text(ctx, orjson.dumps(value).decode(), text_key)
            answer = None  # a tool call is not a plain label
    if not ok or role is None:
        return None
    return role, fixed, answer


def _check_role(ctx: Context, message: dict[str, Any], path: str, line: int) -> str | None:
    if "role" not in message:
        ctx.error("message_missing_key", line, f"{path}.role", "a message needs a role")
        return None
    role = message["role"]
    if not isinstance(role, str):
        ctx.error(
            "data_type", line, f"{path}.role", f"role must be a string, not {json_kind(role)}"
        )
        return None
    if role not in _ROLE_SET:
        ctx.error(
            "unrecognized_role",
            line,
            f"{path}.role",
            f"unrecognized role {clip(role)!r}; expected one of {', '.join(ROLES)}",
        )
        return None
    return role


def _check_content(
    ctx: Context,
    message: dict[str, Any],
    role: str | None,
    has_calls: bool,
    path: str,
    line: int,
    text_key: int,
) -> tuple[bool, str | None]:
    """(ok, the content when it is a plain string)."""
    where = f"{path}.content"
    calls_instead = role == "assistant" and has_calls
    if "content" not in message:
        if calls_instead:
            return True, None
        ctx.error("message_missing_key", line, where, "a message needs content")
        return False, None
    content = message["content"]
    if content is None:
        if calls_instead:
            return True, None
        ctx.error("missing_content", line, where, "content is null")
        return False, None
    if isinstance(content, str):
        if content:
            _add_text(ctx, content, text_key, shared=role in ("system", "developer"))
        elif role == "assistant":
            if not calls_instead:
                ctx.warn("empty_assistant_message", line, where, "the assistant's answer is empty")
        elif role in ("system", "developer", "user"):
            ctx.error("missing_content", line, where, f"the {role} message's content is empty")
            return False, None
        return True, content
    if isinstance(content, list):
        return _check_parts(ctx, content, role, where, line, text_key), None
    ctx.error(
        "data_type",
        line,
        where,
        f"content must be a string or a list of content parts, not {json_kind(content)}",
    )
    return False, None


def _check_parts(
    ctx: Context, parts: list[Any], role: str | None, where: str, line: int, text_key: int
) -> bool:
    if not parts:
        ctx.error("missing_content", line, where, "content is an empty list")
        return False
    ok = True
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            _add_text(ctx, part["text"], text_key)
        elif kind == "image_url" and role == "user" and _image_url_ok(part.get("image_url")):
            ctx.image_parts += 1  # images are billed by OpenAI's own rule; not counted here
        else:
            ctx.error(
                "data_type",
                line,
                f"{where}[{j}]",
                'a content part must be {"type": "text", "text": "..."} or, in user messages, '
                '{"type": "image_url", "image_url": {"url": "..."}}',
            )
            ok = False
    return ok


def _image_url_ok(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("url"), str) and bool(value["url"])


def _add_text(ctx: Context, text: str, key: int, *, shared: bool = False) -> None:
    batch = ctx.batch
    if shared:
        batch.shared_texts.append(text)
        batch.shared_keys.append(key)
    else:
        batch.texts.append(text)
        batch.keys.append(key)


def _tool_calls_problem(tool_calls: Any) -> tuple[str, str] | None:
    """(sub-path, message) of the first problem in a tool_calls list."""
    if not isinstance(tool_calls, list) or not tool_calls:
        return "", f"tool_calls must be a non-empty list, not {json_kind(tool_calls)}"
    for j, call in enumerate(tool_calls):
        if not isinstance(call, dict):
            return f"[{j}]", "a tool call must be an object"
        if not isinstance(call.get("id"), str) or not call["id"]:
            return f"[{j}].id", "a tool call needs a string id"
        if call.get("type") != "function":
            return f"[{j}].type", 'a tool call\'s type must be "function"'
        if problem := _call_problem(call.get("function")):
            return f"[{j}].function{problem[0]}", problem[1]
    return None


def _call_problem(call: Any) -> tuple[str, str] | None:
    """A function call: {"name": "...", "arguments": "<JSON text>"}."""
    if not isinstance(call, dict):
        return "", f"a function call must be an object, not {json_kind(call)}"
    if not isinstance(call.get("name"), str) or not call["name"]:
        return ".name", "a function call needs a non-empty string name"
    arguments = call.get("arguments")
    if not isinstance(arguments, str):
        return ".arguments", "arguments must be a string holding JSON"
    try:
        orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return ".arguments", "arguments is not valid JSON"
    return None
