"""The validation engine: one streaming pass over a training file, a full report at the end.

`validate_file` reads the file in 256 KiB chunks (`reader`), parses each line with orjson,
decides the file's format from the first line that shows one (the keys `formats.detect_format`
uses), and checks every example with that format's rules (`rules_chat`, `rules_dpo`,
`rules_legacy`). Examples without errors go into batches whose tokens are counted by the
target model's tokenizer in worker threads (`pipeline`), overlapping with parsing; tokens,
statistics and cost cover those examples (an example with an error cannot be trained on as it
is). After the last line, the whole-file checks run and the report is assembled (`report`).

Memory does not grow with the file: one line is never held beyond `max_line_bytes`, the
texts being counted are bounded in number and characters, at most two complete batches wait
to be finished, statistics are histograms, and duplicate detection keeps 16-byte hashes in
capped tables. `progress(bytes_done, lines_done)` is called after each chunk; returning False
raises `ValidationCancelled`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import orjson

from app.files.formats import SIGNAL_KEYS, DatasetFormat
from app.validation.csv_rows import count_csv_rows, is_csv_header
from app.validation.issues import IssueLog
from app.validation.memory import return_large_blocks_to_the_system
from app.validation.messages import ROLES
from app.validation.pipeline import (
    BATCH_EXAMPLES,
    COUNT_CHARS,
    COUNT_TEXTS,
    Accumulator,
    ExampleBatch,
    Pipeline,
)
from app.validation.reader import read_lines, too_long_message
from app.validation.report import (
    build_report,
    check_example_count,
    check_format,
    check_labels,
)
from app.validation.rules_chat import ChatRules
from app.validation.rules_common import Context, json_kind
from app.validation.rules_dpo import DpoRules
from app.validation.rules_legacy import CompletionRules
from app.validation.target import Target
from app.validation.tokens import TokenCounter, counter_for_encoding

__all__ = ["DEFAULT_MAX_LINE_BYTES", "Progress", "Target", "ValidationCancelled", "validate_file"]

DEFAULT_MAX_LINE_BYTES: Final = 8 * 1024 * 1024

_DEEP_FORMATS: Final = (DatasetFormat.chat, DatasetFormat.dpo, DatasetFormat.prompt_completion)
_WHITESPACE: Final = b" \t\r\n\x0b\x0c"

Progress = Callable[[int, int], bool]


class ValidationCancelled(Exception):
    """The progress callback asked to stop."""


class _Rules(Protocol):
    def check(self, example: Any, line: int) -> None: ...


class _CountOnly:
    """Formats that must be converted before training: counted, checked to be objects."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def check(self, example: Any, line: int) -> None:
        if type(example) is not dict:
            self._ctx.error("data_type", line, None, f"the line is {json_kind(example)}")


def validate_file(
    path: Path,
    target: Target,
    *,
    progress: Progress | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    counter: TokenCounter | None = None,
) -> dict[str, Any]:
    """Validate the training file at `path` for `target`; the report as a JSON-ready dict.

    `counter` counts tokens (default: quicktok with the model's encoding). Raises
    `ValidationCancelled` when `progress` returns False, OSError when the file cannot be read.
    """
    return_large_blocks_to_the_system()
    if counter is None:
        counter = counter_for_encoding(target.model.encoding)
    return _Validation(target, counter, max_line_bytes, progress).run(path)


class _Validation:
    def __init__(
        self,
        target: Target,
        counter: TokenCounter,
        max_line_bytes: int,
        progress: Progress | None,
    ) -> None:
        self._target = target
        self._counter = counter
        self._max_line_bytes = max_line_bytes
        self._progress = progress
        self._issues = IssueLog()
        role_tokens = dict(zip(ROLES, counter.count_batch(list(ROLES)), strict=True))
        self._ctx = Context(self._issues, role_tokens)
        model = target.model
        self._accumulator = Accumulator(model.context_limit, model.id)
        self._format: DatasetFormat | None = None
        self._format_line: int | None = None
        self._examples = 0
        self._lines = 0
        self._bytes = 0
        self._chat = ChatRules(self._ctx)
        self._legacy = CompletionRules(self._ctx)
        self._rules: dict[DatasetFormat, _Rules] = {
            DatasetFormat.chat: self._chat,
            DatasetFormat.dpo: DpoRules(self._ctx),
            DatasetFormat.prompt_completion: self._legacy,
            DatasetFormat.gemini: _CountOnly(self._ctx),
            DatasetFormat.vertex_text: _CountOnly(self._ctx),
        }

    def run(self, path: Path) -> dict[str, Any]:
        pipeline = Pipeline(self._counter, self._accumulator, self._issues)
        try:
            with path.open("rb") as f:
                csv_file = self._read_jsonl(f, pipeline)
            if csv_file:
                self._read_csv(path)
            if len(self._ctx.batch):
                pipeline.submit(self._ctx.batch)
                self._ctx.batch = ExampleBatch()
            pipeline.finish()
        except BaseException:
            pipeline.close()
            raise
        return self._report()

    def _read_jsonl(self, f: BinaryIO, pipeline: Pipeline) -> bool:
        """Read and check every line; True (at once) when the file turns out to be a CSV."""
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        ctx = self._ctx
        add_plain, check_fully = self._chat.add_plain, self._chat.check_fully
        chat_format = DatasetFormat.chat
        count_chars, count_texts, batch_examples = COUNT_CHARS, COUNT_TEXTS, BATCH_EXAMPLES
        for chunk in read_lines(f, self._max_line_bytes):
            number = chunk.first_line
            lines = chunk.lines
            for index in range(len(lines)):
                raw = lines[index]
                lines[index] = None  # a line can be 8 MiB: let it go once parsed
                if raw is None:
                    self._examples += 1
                    self._issues.add(
                        "line_too_long",
                        number,
                        None,
                        too_long_message(self._max_line_bytes),
                    )
                elif raw and not raw.isspace():
                    self._examples += 1
                    if self._format is None and self._examples == 1 and _csv_start(raw):
                        self._examples = 0
                        return True
                    try:
                        example = loads(raw)
                    except decode_error as exc:
                        self._bad_json(raw, number, exc)
                    else:
                        size = len(raw)
                        del raw
                        if (
                            self._format is chat_format
                            and type(example) is dict
                            and len(example) == 1
                            and type(messages := example.get("messages")) is list
                        ):
                            if not add_plain(messages, number):
                                check_fully(example, number)
                        else:
                            self._dispatch(example, number)
                        example = messages = None  # an 8 MiB line's strings: let them go
                        batch = ctx.batch
                        batch.chars += size
                        if batch.chars >= count_chars or len(batch.texts) >= count_texts:
                            if len(batch) < batch_examples:
                                pipeline.count(batch)
                            else:
                                pipeline.submit(batch)
                                ctx.batch = ExampleBatch()
                number += 1
            self._lines = number - 1
            self._bytes = chunk.bytes_done
            self._report_progress(chunk.bytes_done, self._lines)
        return False

    def _dispatch(self, example: Any, line: int) -> None:
        if type(example) is dict:
            kinds = {kind for key in example if (kind := SIGNAL_KEYS.get(key)) is not None}
            if len(kinds) > 1:
                names = ", ".join(sorted(kind.value for kind in kinds))
                self._issues.add(
                    "mixed_formats", line, None, f"the line has keys of several formats ({names})"
                )
                return
            if kinds:
                kind = kinds.pop()
                if self._format is None:
                    self._format, self._format_line = kind, line
                elif kind is not self._format:
                    self._issues.add(
                        "mixed_formats",
                        line,
                        None,
                        f"the line is {kind.value} data, but the file is {self._format.value} "
                        f"(line {self._format_line})",
                    )
                    return
        # Until a line shows the format, lines are checked as chat, the primary format.
        self._rules[self._format or DatasetFormat.chat].check(example, line)

    def _bad_json(self, raw: bytes | bytearray, line: int, exc: orjson.JSONDecodeError) -> None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            self._issues.add(
                "invalid_utf8",
                line,
                None,
                f"byte 0x{raw[bad.start]:02x} at position {bad.start + 1} is not valid UTF-8: "
                "save the file as UTF-8",
            )
            return
        message = f"{exc.msg} at column {exc.colno}"
        if line == 1 and raw.strip(_WHITESPACE) in (b"{", b"["):
            message += "; the file looks like one JSON document, but JSONL needs one per line"
        self._issues.add("invalid_json", line, None, message)

    def _read_csv(self, path: Path) -> None:
        self._format, self._format_line = DatasetFormat.csv, 1
        with path.open("rb") as f:
            outcome = count_csv_rows(f, self._issues, self._max_line_bytes, self._report_progress)
        self._examples, self._lines, self._bytes = outcome.rows, outcome.lines, outcome.bytes

    def _report_progress(self, bytes_done: int, lines_done: int) -> None:
        if self._progress is not None and self._progress(bytes_done, lines_done) is False:
            raise ValidationCancelled(f"cancelled after {lines_done} lines")

    def _report(self) -> dict[str, Any]:
        issues, ctx, accumulator = self._issues, self._ctx, self._accumulator
        fmt = self._format
        check_example_count(issues, self._examples)
        check_format(issues, fmt, self._format_line, self._target)
        if fmt is DatasetFormat.prompt_completion:
            self._legacy.finish()
        answers = check_labels(issues, ctx.labels)
        deep = fmt is None or fmt in _DEEP_FORMATS
        capped = accumulator.duplicates.capped or accumulator.prompts.capped
        remembered = accumulator.duplicates.max_entries
        stats = {
            "examples": self._examples,
            "valid_examples": ctx.valid_examples,
            "messages_per_example": accumulator.messages.summary(),
            "total_tokens_per_example": accumulator.total_tokens.summary(),
            "assistant_tokens_per_example": accumulator.trained_tokens.summary(),
            "answers": answers,
            "image_parts": ctx.image_parts,
            "duplicate_check": {
                "complete": not capped,
                "max_distinct_examples": remembered,
                "note": (
                    f"only the first {remembered} distinct examples and prompts were "
                    "remembered: duplicates of later ones, and conflicting answers to them, "
                    "were not detected"
                    if capped
                    else None
                ),
            },
        }
        tokens = {
            "total": accumulator.total_tokens.total,
            "trained": accumulator.trained_tokens.total,
            "billable_per_epoch": accumulator.billable_per_epoch,
            "tokenizer": self._counter.name,
        }
        return build_report(
            issues=issues,
            target=self._target,
            fmt=fmt,
            examples=self._examples,
            lines=self._lines,
            size=self._bytes,
            stats=stats,
            tokens=tokens,
            priced=deep,
        )


def _csv_start(first: bytes | bytearray) -> bool:
    """Whether the file's first non-blank line is a CSV header rather than JSON."""
    return not first.lstrip(_WHITESPACE).startswith(b"{") and is_csv_header(first)
