"""Checks a training or validation file the way OpenAI does before it trains.

Supervised jobs need chat JSONL (`{"messages": [...]}` with an assistant message in every
example; `prompt`/`completion` lines for babbage-002 and davinci-002), DPO jobs need preference
lines (`input`, `preferred_output`, `non_preferred_output`), and a training file needs at least
ten examples. Token counts are a deterministic approximation (words and punctuation), close
enough for usage numbers and `trained_tokens`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MIN_TRAINING_EXAMPLES = 10
COMPLETION_MODELS = frozenset({"babbage-002", "davinci-002"})
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
TOKENS_PER_MESSAGE = 4
TOKENS_PER_EXAMPLE = 3

TOKEN = re.compile(r"\w+|[^\w\s]")
"""What the emulator counts as one token: a word or a punctuation mark."""


class InvalidTrainingFile(Exception):
    """The file cannot be trained on; the message says why, in OpenAI's words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class TrainingData:
    """What a valid file contains, as far as the emulator cares."""

    examples: int
    tokens: int
    """Tokens in one pass over the file."""
    answers: dict[str, str] = field(default_factory=dict)
    """Last prompt → trained answer: what a model tuned on this file will repeat."""


def count_tokens(text: str) -> int:
    return len(TOKEN.findall(text))


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def messages_tokens(messages: list[Any]) -> int:
    total = TOKENS_PER_EXAMPLE
    for message in messages:
        if isinstance(message, dict):
            total += TOKENS_PER_MESSAGE + count_tokens(message_text(message.get("content")))
    return total


def check_training_file(
    content: bytes, *, method: str, model: str, min_examples: int = MIN_TRAINING_EXAMPLES
) -> TrainingData:
    """Parse and check a whole file; raise InvalidTrainingFile with OpenAI's kind of message."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTrainingFile("Expected file to be UTF-8 encoded.") from None
    examples: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidTrainingFile(
                "Expected file to have JSONL format, where every line is a valid JSON "
                f"dictionary. Line {number} is not a dictionary."
            )
        examples.append(parsed)

    answers: dict[str, str] = {}
    tokens = 0
    for number, example in enumerate(examples, start=1):
        if method == "dpo":
            prompt, answer, used = _check_preference(number, example)
        elif model in COMPLETION_MODELS:
            prompt, answer, used = _check_prompt_completion(number, example)
        else:
            prompt, answer, used = _check_chat(number, example, method=method)
        tokens += used
        if prompt is not None and answer is not None:
            answers.setdefault(prompt, answer)

    if len(examples) < min_examples:
        raise InvalidTrainingFile(
            f"Training file has {len(examples)} example(s), but must have at least "
            f"{min_examples} examples."
        )
    return TrainingData(examples=len(examples), tokens=tokens, answers=answers)


def _check_messages(number: int, messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidTrainingFile(
            f"Invalid file format. Example {number}: '{where}' must be a non-empty list of "
            "messages."
        )
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise InvalidTrainingFile(
                f"Invalid file format. Example {number}, message {index}: expected an object."
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidTrainingFile(
                f"Invalid file format. Example {number}, message {index}: Unrecognized role: "
                f"{role!r}."
            )
        if "content" not in message and "tool_calls" not in message:
            raise InvalidTrainingFile(
                f"Invalid file format. Example {number}, message {index}: Missing 'content'."
            )
    return messages


def last_prompt(messages: list[dict[str, Any]]) -> str | None:
    """The text of the last user message, None without one."""
    prompts = [m for m in messages if m.get("role") == "user"]
    return message_text(prompts[-1].get("content")) if prompts else None


def _check_chat(
    number: int, example: dict[str, Any], *, method: str
) -> tuple[str | None, str | None, int]:
    if "messages" not in example:
        raise InvalidTrainingFile(
            f"Invalid file format. Example {number}: Missing required key 'messages'. "
            'Expected chat format: {"messages": [{"role": ..., "content": ...}]}.'
        )
    messages = _check_messages(number, example["messages"], "messages")
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if method == "supervised" and not assistants:
        raise InvalidTrainingFile(
            f"Invalid file format. Example {number}: Missing an assistant message. Each "
            "example must contain at least one message with role 'assistant'."
        )
    last_user = None
    for message in messages[: messages.index(assistants[-1])] if assistants else messages:
        if message.get("role") == "user":
            last_user = message_text(message.get("content"))
    answer = message_text(assistants[-1].get("content")) if assistants else None
    return last_user, answer, messages_tokens(messages)


def _check_prompt_completion(
    number: int, example: dict[str, Any]
) -> tuple[str | None, str | None, int]:
    prompt, completion = example.get("prompt"), example.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InvalidTrainingFile(
            "Expected file to have JSONL format with prompt/completion keys. Missing "
            f"`prompt` or `completion` key on line {number}."
        )
    return prompt, completion, count_tokens(prompt) + count_tokens(completion) + 1


def _check_preference(number: int, example: dict[str, Any]) -> tuple[str | None, str | None, int]:
    missing = [
        key for key in ("input", "preferred_output", "non_preferred_output") if key not in example
    ]
    if missing:
        raise InvalidTrainingFile(
            f"Invalid file format. Example {number}: Missing required key(s) "
            f"{', '.join(repr(k) for k in missing)} for the DPO method."
        )
    source = example["input"]
    if not isinstance(source, dict):
        raise InvalidTrainingFile(
            f"Invalid file format. Example {number}: 'input' must be an object."
        )
    messages = _check_messages(number, source.get("messages"), "input.messages")
    tokens = messages_tokens(messages)
    outputs: list[str] = []
    for key in ("preferred_output", "non_preferred_output"):
        output = _check_messages(number, example[key], key)
        if output[-1].get("role") != "assistant":
            raise InvalidTrainingFile(
                f"Invalid file format. Example {number}: '{key}' must end with an assistant "
                "message."
            )
        outputs.append(message_text(output[-1].get("content")))
        tokens += messages_tokens(output)
    return last_prompt(messages), outputs[0], tokens
