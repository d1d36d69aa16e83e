"""Rules for OpenAI chat examples: `{"messages": [...], "tools": [...]}`, one per line.

Beyond the message checks (`messages.py`), an example needs a non-empty messages list and an
assistant message to train on; it gets warnings when it has no system or no user message.
Its hashes: 16 bytes identifying the example (exact duplicates), and a 64-bit key of the
prompt (everything before the last assistant message, with the tool definitions) mapped to a
hash of that answer (conflicting answers).

An example of plain `{"role", "content"}` messages and nothing else (the usual case) is
identified by its roles and contents alone: two 64-bit hashes of that sequence, built from the
strings' own hashes, which Python computes once per string and keeps (the prompt key needs
them anyway). Serialising the example canonically and hashing that (what any other example
gets, 16 bytes of SHA-256 of its sorted compact JSON) costs as much as parsing it again.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import orjson

from app.validation.messages import ASSISTANT, PLAIN_ROLE_BITS, SYSTEM, USER, check_messages
from app.validation.rules_common import Context, check_tools, digest, json_kind, sorted_json
from app.validation.tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE

__all__ = ["ChatRules", "add_definitions", "warn_missing_roles"]

_SYSTEM_AND_USER: Final = SYSTEM | USER
_NO_SYSTEM: Final = "the example has no system message"
_NO_USER: Final = "the example has no user message"
_TWO_HASHES: Final = struct.Struct("<qq")
# Makes the second hash of a plain example differ from the first (and from a prompt key).
_SECOND_HASH_SALT: Final = "tunegate: example digest"


class ChatRules:
    """Checks chat examples and adds the valid ones to the context's batch."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        # The overhead tokens of a plain message, by its role.
        self._plain_overhead = {
            role: TOKENS_PER_MESSAGE + ctx.role_tokens[role] for role in PLAIN_ROLE_BITS
        }

    def check(self, example: Any, line: int) -> None:
        if type(example) is dict and len(example) == 1:
            messages = example.get("messages")
            if type(messages) is list and self.add_plain(messages, line):
                return
        self.check_fully(example, line)

    def add_plain(self, messages: list[Any], line: int) -> bool:
        """The usual example, checked and added in one pass: plain messages only (see
        `messages.check_messages`), one of them an assistant's. Anything else is False, with
        nothing added: `check_fully` then checks it and reports what is wrong."""
        ctx = self._ctx
        batch = ctx.batch
        texts, keys = batch.texts, batch.keys
        shared, shared_keys = batch.shared_texts, batch.shared_keys
        start, shared_start = len(texts), len(shared)
        index = len(batch.lines)
        key = 2 * index
        overhead = self._plain_overhead
        plain: list[str] = []
        fixed = REPLY_PRIMING_TOKENS
        roles = 0
        last = -1
        for i, message in enumerate(messages):
            if type(message) is dict and len(message) == 2:
                role = message.get("role")
                content = message.get("content")
                if (
                    type(content) is str
                    and content
                    and type(role) is str
                    and (cost := overhead.get(role)) is not None
                ):
                    fixed += cost
                    plain.append(role)
                    plain.append(content)
                    if role == "assistant":
                        texts.append(content)
                        keys.append(key + 1)
                        roles |= ASSISTANT
                        last = i
                    elif role == "user":
                        texts.append(content)
                        keys.append(key)
                        roles |= USER
                    else:  # system prompts repeat: counted once per batch
                        shared.append(content)
                        shared_keys.append(key)
                        roles |= SYSTEM
                    continue
            last = -1
            break
        if last < 0:
            del texts[start:], keys[start:], shared[shared_start:], shared_keys[shared_start:]
            return False
        warn_missing_roles(ctx, roles, line, "messages")
        batch.lines.append(line)
        batch.fixed.append(fixed)
        batch.messages.append(len(messages))
        batch.digests.append(
            _TWO_HASHES.pack(hash(tuple(plain)), hash((_SECOND_HASH_SALT, *plain)))
        )
        answer = plain[2 * last + 1]
        if last:  # with no prompt at all, answers cannot conflict
            batch.conflict_examples.append(index)
            batch.prompt_keys.append(hash(tuple(plain[: 2 * last])))
            batch.answer_keys.append(hash(answer))
            batch.answer_messages.append(last)
        ctx.valid_examples += 1
        labels = ctx.labels
        if labels.active:
            labels.add(answer.strip())
        return True

    def check_fully(self, example: Any, line: int) -> None:
        """Every check of a chat example, each problem reported; adds it when it has none."""
        ctx = self._ctx
        if type(example) is not dict:
            ctx.error("data_type", line, None, f"the line is {json_kind(example)}, not an object")
            return
        messages = example.get("messages")
        if messages is None:
            ctx.error(
                "missing_messages_list", line, "messages", 'the example has no "messages" list'
            )
            return
        if type(messages) is not list:
            ctx.error(
                "data_type", line, "messages", f"messages must be a list, not {json_kind(messages)}"
            )
            return
        if not messages:
            ctx.error("missing_messages_list", line, "messages", "the messages list is empty")
            return
        batch = ctx.batch
        mark = batch.mark()
        index = len(batch.lines)
        extra_keys = len(example) > 1
        definitions_ok = check_tools(ctx, example, "", line) if extra_keys else True
        summary = check_messages(ctx, messages, "messages", line, 2 * index, True)
        if summary is None or not definitions_ok:
            batch.rollback(mark)
            return
        if not summary.roles & ASSISTANT:
            ctx.error(
                "example_missing_assistant_message",
                line,
                "messages",
                "the example has no assistant message, so there is nothing to train on",
            )
            batch.rollback(mark)
            return
        warn_missing_roles(ctx, summary.roles, line, "messages")
        if extra_keys:
            add_definitions(ctx, example, 2 * index)
        last = summary.last_assistant
        batch.lines.append(line)
        batch.fixed.append(summary.fixed_tokens + REPLY_PRIMING_TOKENS)
        batch.messages.append(len(messages))
        plain = summary.plain
        if plain is not None and not extra_keys:
            batch.digests.append(
                _TWO_HASHES.pack(hash(tuple(plain)), hash((_SECOND_HASH_SALT, *plain)))
            )
        else:
            batch.digests.append(digest(sorted_json(example)))
        if last > 0 or extra_keys:  # with no prompt at all, answers cannot conflict
            batch.conflict_examples.append(index)
            if plain is not None and not extra_keys:
                # Python caches each string's hash in the string: this key costs little.
                batch.prompt_keys.append(hash(tuple(plain[: 2 * last])))
                batch.answer_keys.append(hash(plain[2 * last + 1]))
            else:
                prompt_json = sorted_json(messages[:last])
                if extra_keys:
                    prompt_json += sorted_json(
                        {k: v for k, v in example.items() if k != "messages"}
                    )
                batch.prompt_keys.append(hash(prompt_json))
                batch.answer_keys.append(hash(sorted_json(messages[last])))
            batch.answer_messages.append(last)
        ctx.valid_examples += 1
        labels = ctx.labels
        if labels.active:
            if summary.answer is not None:
                labels.add(summary.answer.strip())
            else:
                labels.give_up()


def warn_missing_roles(ctx: Context, roles: int, line: int, path: str) -> None:
    if roles & _SYSTEM_AND_USER == _SYSTEM_AND_USER:  # the usual case: one test
        return
    if not roles & SYSTEM:
        ctx.warn("missing_system_message", line, path, _NO_SYSTEM)
    if not roles & USER:
        ctx.warn("missing_user_message", line, path, _NO_USER)


def add_definitions(ctx: Context, example: dict[str, Any], key: int) -> None:
    """Count tool and function definitions by their compact JSON text (never trained)."""
    batch = ctx.batch
    for field in ("tools", "functions"):
        value = example.get(field)
        if value:
            batch.shared_texts.append(orjson.dumps(value).decode())  # the same in most examples
            batch.shared_keys.append(key)
