"""Rules for DPO preference records (`method: dpo`).

A record is `{"input": {"messages": [...], "tools": ...}, "preferred_output": [message],
"non_preferred_output": [message]}`: each output is a list of exactly one assistant message.
The input's messages get the chat message checks (their paths start with `input.messages`);
the record's own structure problems are `invalid_dpo`. Tokens: the input with the chat
overhead, plus both outputs (each with the per-message overhead); the outputs' contents are
the trained tokens.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from app.validation.messages import check_messages
from app.validation.rules_chat import add_definitions, warn_missing_roles
from app.validation.rules_common import Context, check_tools, digest, json_kind, sorted_json
from app.validation.tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE

__all__ = ["DpoRules"]

OUTPUTS: Final = ("preferred_output", "non_preferred_output")
_OUTPUT_KEYS: Final = frozenset(("role", "content", "tool_calls"))


class DpoRules:
    """Checks DPO records and adds the valid ones to the context's batch."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def check(self, record: Any, line: int) -> None:
        ctx = self._ctx
        if type(record) is not dict:
            ctx.error("data_type", line, None, f"the line is {json_kind(record)}, not an object")
            return
        batch = ctx.batch
        mark = batch.mark()
        index = len(batch.lines)
        key = 2 * index
        messages = self._input_messages(record, line)
        outputs = [self._output(record, name, line) for name in OUTPUTS]
        if messages is None:
            batch.rollback(mark)
            return
        source: dict[str, Any] = record["input"]
        definitions_ok = check_tools(ctx, source, "input.", line)
        summary = check_messages(ctx, messages, "input.messages", line, key, False)
        if summary is None or not definitions_ok or None in outputs:
            batch.rollback(mark)
            return
        warn_missing_roles(ctx, summary.roles, line, "input.messages")
        add_definitions(ctx, source, key)
        fixed = summary.fixed_tokens + REPLY_PRIMING_TOKENS
        for texts in outputs:
            assert texts is not None
            fixed += TOKENS_PER_MESSAGE + ctx.role_tokens["assistant"]
            for text in texts:
                batch.texts.append(text)
                batch.keys.append(key + 1)
        batch.lines.append(line)
        batch.fixed.append(fixed)
        batch.digests.append(digest(sorted_json(record)))
        batch.messages.append(len(messages))
        ctx.valid_examples += 1

    def _input_messages(self, record: dict[str, Any], line: int) -> list[Any] | None:
        source = record.get("input")
        if source is None:
            problem, path = 'a DPO record needs an "input" object with "messages"', "input"
        elif not isinstance(source, dict):
            problem, path = f'"input" must be an object, not {json_kind(source)}', "input"
        else:
            messages = source.get("messages")
            path = "input.messages"
            if isinstance(messages, list) and messages:
                return messages
            problem = (
                '"input" needs a non-empty "messages" list'
                if messages is None or isinstance(messages, list)
                else f'"input.messages" must be a list, not {json_kind(messages)}'
            )
        self._ctx.error("invalid_dpo", line, path, problem)
        return None

    def _output(self, record: dict[str, Any], name: str, line: int) -> list[str] | None:
        """The output's texts to count (content, tool calls), or None when it is malformed."""
        ctx = self._ctx
        value = record.get(name)
        if not isinstance(value, list) or len(value) != 1:
            shown = "missing" if value is None else json_kind(value)
            if isinstance(value, list):
                shown = f"a list of {len(value)} messages"
            ctx.error(
                "invalid_dpo",
                line,
                name,
                f"{name} must be a list of exactly one assistant message, not {shown}",
            )
            return None
        message = value[0]
        path = f"{name}[0]"
        if not isinstance(message, dict):
            ctx.error(
                "invalid_dpo", line, path, f"must be a message object, not {json_kind(message)}"
            )
            return None
        if extra := sorted(message.keys() - _OUTPUT_KEYS):
            ctx.error("invalid_dpo", line, f"{path}.{extra[0][:40]}", "unrecognized key in output")
            return None
        if message.get("role") != "assistant":
            ctx.error("invalid_dpo", line, f"{path}.role", 'the output\'s role must be "assistant"')
            return None
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and (not isinstance(tool_calls, list) or not tool_calls):
            ctx.error(
                "invalid_dpo", line, f"{path}.tool_calls", "tool_calls must be a non-empty list"
            )
            return None
        if not (isinstance(content, str) and content) and not (content is None and tool_calls):
            ctx.error(
                "invalid_dpo",
                line,
                f"{path}.content",
                "the output needs a non-empty string content",
            )
            return None
        texts = [content] if content else []
        if tool_calls:
            texts.append(orjson.dumps(tool_calls).decode())
        return texts
