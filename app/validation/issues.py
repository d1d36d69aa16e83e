"""Error and warning codes, and the log that collects their occurrences.

Every problem has a stable code (clients switch on it), a severity (errors make a file
`invalid`, warnings do not), a count, and its first `MAX_OCCURRENCES` occurrences with the line
number, the field path (`messages[2].content`) and a human message. Only those few
occurrences are kept, so a file with millions of bad lines costs no more memory than one
with five.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["ERROR_CODES", "MAX_OCCURRENCES", "WARNING_CODES", "IssueLog", "clip", "describe"]

MAX_OCCURRENCES: Final = 5

# code -> what it means, shown as the code's summary message (with the count in front).
ERROR_CODES: Final[dict[str, str]] = {
    "invalid_utf8": "lines that are not valid UTF-8",
    "invalid_json": "lines that are not valid JSON",
    "line_too_long": "lines longer than the line-length limit (skipped unread)",
    "data_type": "values of the wrong JSON type",
    "missing_messages_list": 'examples without a non-empty "messages" list',
    "message_missing_key": "messages or examples missing a required key",
    "message_unrecognized_key": "messages with keys the format does not allow",
    "unrecognized_role": "messages with a role that is not recognised",
    "missing_content": "messages without content",
    "example_missing_assistant_message": "examples without an assistant message to train on",
    "invalid_weight": 'invalid "weight" values (only 0 or 1, only on assistant messages)',
    "invalid_tool_calls": 'malformed "tool_calls" or "function_call"',
    "invalid_tools": 'malformed "tools" or "functions" definitions',
    "invalid_dpo": "malformed DPO records",
    "invalid_csv": "CSV rows that cannot be read",
    "mixed_formats": "lines in a different format from the rest of the file",
    "too_few_examples": "too few examples: fine-tuning needs at least 10",
    "unsupported_format": "data the target model or method does not accept",
}
WARNING_CODES: Final[dict[str, str]] = {
    "over_context_limit": "examples over the model's context limit (they would be truncated)",
    "few_examples": "fewer than 50 examples; 50 to 100 are recommended",
    "missing_system_message": "examples without a system message",
    "missing_user_message": "examples without a user message",
    "duplicate_examples": "exact duplicates of an earlier example",
    "conflicting_answers": "examples with the same prompt as an earlier one but another answer",
    "empty_assistant_message": "empty assistant answers",
    "label_imbalance": "strongly imbalanced labels in classification data",
    "inconsistent_separator": "prompts that do not end with the common separator",
    "completion_missing_leading_space": "completions that do not start with a whitespace",
    "completion_inconsistent_ending": "completions that do not end with the common ending",
}


def describe(code: str) -> str:
    return ERROR_CODES.get(code) or WARNING_CODES[code]


def clip(text: str, limit: int = 40) -> str:
    """A short, quoted-safe excerpt of user data for a message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Entry:
    count: int = 0
    message: str | None = None
    occurrences: list[dict[str, Any]] = field(default_factory=list)


class IssueLog:
    """Collects problems as the file streams by; `errors()`/`warnings()` give the report's lists.

    Occurrences are recorded in line order per code, since the engine reads lines in order.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.error_count = 0

    def add(self, code: str, line: int | None, path: str | None, message: str) -> None:
        """One occurrence of `code` at `line` (None: the whole file), field `path`."""
        entry = self._entries.get(code)
        if entry is None:
            entry = self._entries[code] = _Entry()
        entry.count += 1
        if code in ERROR_CODES:
            self.error_count += 1
        if len(entry.occurrences) < MAX_OCCURRENCES:
            entry.occurrences.append({"line": line, "path": path, "message": message})

    def add_many(
        self, code: str, count: int, message: str, occurrences: list[dict[str, Any]] | None = None
    ) -> None:
        """A problem counted elsewhere (for the whole file), with its own summary message."""
        entry = self._entries.setdefault(code, _Entry())
        entry.count += count
        entry.message = message
        if code in ERROR_CODES:
            self.error_count += count
        for occurrence in occurrences or ():
            if len(entry.occurrences) < MAX_OCCURRENCES:
                entry.occurrences.append(occurrence)

    def count(self, code: str) -> int:
        entry = self._entries.get(code)
        return 0 if entry is None else entry.count

    def errors(self) -> list[dict[str, Any]]:
        return self._render(ERROR_CODES)

    def warnings(self) -> list[dict[str, Any]]:
        return self._render(WARNING_CODES)

    def _render(self, codes: dict[str, str]) -> list[dict[str, Any]]:
        # In the order of the code tables: the most fundamental problems first.
        return [
            {
                "code": code,
                "count": entry.count,
                "message": entry.message or f"{entry.count} {description}",
                "occurrences": list(entry.occurrences),
            }
            for code, description in codes.items()
            if (entry := self._entries.get(code)) is not None and entry.count
        ]
