"""Rules for legacy prompt/completion examples (babbage-002, davinci-002), and the checks that
OpenAI's old `fine_tunes.prepare_data` tool made: every prompt should end with the same
separator, every completion start with a whitespace and end with the same stop sequence.

Both "ends alike" checks are streaming: texts are grouped by their last character (at most
`MAX_GROUPS` groups, each with its first few lines), so when the endings differ the report
names the majority ending and the first lines that do not have it.
"""

from __future__ import annotations

from typing import Any, Final

from app.validation.issues import MAX_OCCURRENCES, IssueLog, clip
from app.validation.rules_common import Context, digest, json_kind, sorted_json

__all__ = ["CompletionRules", "EndingTracker"]

MAX_GROUPS: Final = 64
_SUFFIX_CHARS: Final = 32


def _common_suffix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return a[len(a) - n :]


class _Group:
    __slots__ = ("count", "lines", "suffix")

    def __init__(self, text: str) -> None:
        self.count = 0
        self.suffix = text[-_SUFFIX_CHARS:]
        self.lines: list[int] = []


class EndingTracker:
    """Tracks whether all texts end with a common suffix."""

    def __init__(self, code: str, field: str, advice: str) -> None:
        self._code = code
        self._field = field
        self._advice = advice
        self._groups: dict[str, _Group] = {}
        self._overflow_lines: list[int] = []
        self._overflow = 0
        self._n = 0

    def add(self, text: str, line: int) -> None:
        self._n += 1
        last = text[-1:]
        group = self._groups.get(last)
        if group is None:
            if len(self._groups) >= MAX_GROUPS:
                self._overflow += 1
                if len(self._overflow_lines) < MAX_OCCURRENCES:
                    self._overflow_lines.append(line)
                return
            group = self._groups[last] = _Group(text)
        group.count += 1
        if len(group.lines) < MAX_OCCURRENCES:
            group.lines.append(line)
        if not text.endswith(group.suffix):
            group.suffix = _common_suffix(group.suffix, text)

    def report(self, issues: IssueLog) -> None:
        """Add the warning when the texts do not all end alike."""
        if len(self._groups) + (self._overflow > 0) <= 1:
            return
        field, n = self._field, self._n
        majority = max(self._groups.values(), key=lambda g: g.count)
        if majority.count * 2 > n:
            others = [g for g in self._groups.values() if g is not majority]
            count = n - majority.count
            message = (
                f"{count} of {n} {field}s do not end with {clip(majority.suffix)!r}, like the "
                f"other {majority.count} do; {self._advice}"
            )
        else:  # no ending is shared by most: every text is an offender
            others = list(self._groups.values())
            count = n
            message = f"the {n} {field}s do not end with a common suffix; {self._advice}"
        occurrences = sorted(
            [(line, group.suffix[-1:]) for group in others for line in group.lines]
            + [(line, "?") for line in self._overflow_lines]
        )
        issues.add_many(
            self._code,
            count,
            message,
            [
                {
                    "line": line,
                    "path": field,
                    "message": f"the {field} ends with {last!r}"
                    if last
                    else f"the {field} is empty",
                }
                for line, last in occurrences[:MAX_OCCURRENCES]
            ],
        )


class CompletionRules:
    """Checks prompt/completion examples and adds the valid ones to the context's batch."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._separator = EndingTracker(
            "inconsistent_separator",
            "prompt",
            'end every prompt with the same separator (such as "\\n\\n###\\n\\n") that '
            "appears nowhere else in the prompts",
        )
        self._ending = EndingTracker(
            "completion_inconsistent_ending",
            "completion",
            'end every completion with the same stop sequence (such as "\\n" or " END")',
        )

    def check(self, example: Any, line: int) -> None:
        ctx = self._ctx
        if type(example) is not dict:
            ctx.error("data_type", line, None, f"the line is {json_kind(example)}, not an object")
            return
        ok = True
        for field in ("prompt", "completion"):
            if field not in example:
                ctx.error(
                    "message_missing_key",
                    line,
                    field,
                    f'a prompt/completion example needs "{field}"',
                )
                ok = False
            elif type(example[field]) is not str:
                ctx.error(
                    "data_type",
                    line,
                    field,
                    f"{field} must be a string, not {json_kind(example[field])}",
                )
                ok = False
        if not ok:
            return
        prompt: str = example["prompt"]
        completion: str = example["completion"]
        if not completion:
            ctx.warn("empty_assistant_message", line, "completion", "the completion is empty")
        elif not completion[0].isspace():
            ctx.warn(
                "completion_missing_leading_space",
                line,
                "completion",
                'the completion does not start with a whitespace (" "), which tokenizes better',
            )
        self._separator.add(prompt, line)
        self._ending.add(completion, line)
        batch = ctx.batch
        index = len(batch.lines)
        for text, key in ((prompt, 2 * index), (completion, 2 * index + 1)):
            if text:
                batch.texts.append(text)
                batch.keys.append(key)
        batch.lines.append(line)
        batch.fixed.append(0)
        batch.digests.append(digest(sorted_json(example)))
        if prompt:
            batch.conflict_examples.append(index)
            batch.prompt_keys.append(hash(prompt))
            batch.answer_keys.append(hash(completion))
            batch.answer_messages.append(-1)
        ctx.valid_examples += 1
        ctx.labels.add(completion.strip())

    def finish(self) -> None:
        self._separator.report(self._ctx.issues)
        self._ending.report(self._ctx.issues)
