"""Conversion of training-data files to OpenAI chat JSONL or legacy prompt/completion JSONL.

`convert_file` reads a file in any convertible format that `app.files.formats` detects (CSV with
prompt/completion columns, legacy prompt/completion JSONL, Gemini/Vertex `contents` JSONL,
Vertex `input_text`/`output_text` JSONL, and chat JSONL itself) and writes one example per line:
OpenAI chat (`{"messages": [...]}`) or, for babbage-002/davinci-002, legacy prompt/completion.
Every example goes through the chat shape first, so the options (a default system message,
whitespace stripping, dropping duplicates) mean the same whatever the source.

Files can be gigabytes: input is read one line (or CSV row) at a time and output written one
line at a time, so memory does not grow with the file; only `drop_duplicates` keeps something
per example, a 16-byte hash of each distinct output line. An example that cannot be converted
is skipped and reported with its line number; one bad line never stops a conversion.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import orjson

from app.files.formats import DatasetFormat

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_REPORTED_SKIPS",
    "ConversionError",
    "ConversionOptions",
    "ConversionResult",
    "chat_text",
    "convert_file",
]

# A JSONL line is parsed whole, so its size bounds the memory of a conversion; longer lines are
# skipped. 64 MiB is far beyond any text example a fine-tuning API accepts.
MAX_LINE_BYTES: Final = 64 * 1024 * 1024
# Only the first skipped examples are listed; the count covers all of them.
MAX_REPORTED_SKIPS: Final = 20

_CHUNK_BYTES: Final = 1024 * 1024
# As in app.files.formats: csv's default field limit (128 Ki characters) is too small for long
# examples, and the limit also stops an unclosed quote from swallowing the rest of the file.
_CSV_FIELD_LIMIT: Final = 16 * 1024 * 1024
_UTF8_BOM: Final = codecs.BOM_UTF8
_WHITESPACE: Final = b" \t\n\r\x0b\x0c"
_DUMPS_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE

_SYSTEM_ROLES: Final = frozenset({"system", "developer"})
_CHAT_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_GEMINI_ROLES: Final = {"user": "user", "model": "assistant"}
# How the texts of a chat example's system and user messages are joined into one legacy prompt.
_PROMPT_JOINER: Final = "\n\n"


class ConversionError(ValueError):
    """The file cannot be converted as asked (DPO, unknown format, bad options); says why."""


@dataclass(frozen=True)
class ConversionOptions:
    """What to do to each example on the way.

    `add_separator`, `add_leading_space` and `add_trailing_newline` shape legacy
    prompt/completion data and are used only when `to_format` is "prompt_completion".
    """

    system_message: str | None = None  # added first to examples that have no system message
    strip_whitespace: bool = False  # strip leading and trailing whitespace of every content
    drop_duplicates: bool = False  # drop output lines identical to an earlier one
    add_separator: str | None = None  # appended to prompts that do not already end with it
    add_leading_space: bool = False  # completions start with a space
    add_trailing_newline: bool = False  # completions end with "\n"
    to_format: Literal["chat", "prompt_completion"] = "chat"


@dataclass
class ConversionResult:
    """What a conversion did: examples_in = examples_out + duplicates_dropped + skipped_count."""

    examples_in: int = 0
    examples_out: int = 0
    duplicates_dropped: int = 0
    # The first MAX_REPORTED_SKIPS skipped examples: {"line": n, "reason": "..."}.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    skipped_count: int = 0

    def skip(self, line: int, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_REPORTED_SKIPS:
            self.skipped.append({"line": line, "reason": reason})


class _Skip(Exception):
    """This example cannot be converted; the message says why, for the user."""


def convert_file(
    source: Path,
    source_format: DatasetFormat,
    target: BinaryIO,
    options: ConversionOptions,
) -> ConversionResult:
    """Convert the file at `source`, in `source_format`, into `target`, one example a line.

    Raises ConversionError, before anything is written, when the format cannot be converted or
    the options make no sense; examples that cannot be converted are skipped and reported.
    """
    to_chat = _converter(source_format)
    _check_options(options)
    result = ConversionResult()
    # 16-byte digests rather than the lines: about 90 bytes per distinct example in a set.
    seen: set[bytes] | None = set() if options.drop_duplicates else None
    items = _csv_rows(Path(source)) if source_format == DatasetFormat.csv else _jsonl(Path(source))
    for number, item in items:
        result.examples_in += 1
        try:
            if isinstance(item, _Skip):
                raise item
            line = _output_line(to_chat(item), options)
        except _Skip as skip:
            result.skip(number, str(skip))
            continue
        if seen is not None:
            digest = hashlib.blake2b(line, digest_size=16).digest()
            if digest in seen:
                result.duplicates_dropped += 1
                continue
            seen.add(digest)
        target.write(line)
        result.examples_out += 1
    return result


def _converter(source_format: DatasetFormat | str) -> Callable[[Any], dict[str, Any]]:
    try:
        fmt = DatasetFormat(source_format)
    except ValueError:
        raise ConversionError(f'"{source_format}" is not a dataset format') from None
    if fmt is DatasetFormat.dpo:
        raise ConversionError(
            "DPO data pairs a preferred and a non-preferred answer to each prompt; converting it "
            "would throw one of them away. Use it as it is, with the DPO fine-tuning method."
        )
    if fmt is DatasetFormat.unknown:
        raise ConversionError(
            "the file's format was not recognised (its format_reason says why), so it cannot be "
            "converted; fix the file and upload it again"
        )
    return _TO_CHAT[fmt]


def _check_options(options: ConversionOptions) -> None:
    # Checked here rather than in ConversionOptions so that callers get a ConversionError, the
    # one exception convert_file documents, and not a ValueError from a constructor.
    if options.to_format not in ("chat", "prompt_completion"):
        raise ConversionError(
            f'cannot convert to "{options.to_format}": the targets are "chat" and '
            '"prompt_completion"'
        )
    if options.system_message is not None and not options.system_message.strip():
        raise ConversionError("system_message is blank; leave it out to add no system message")
    if options.add_separator == "":
        raise ConversionError("add_separator is empty; leave it out to add no separator")


# --- reading ------------------------------------------------------------------------------------


def _jsonl(source: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or _Skip) for each non-blank line of a JSONL file."""
    limit = MAX_LINE_BYTES
    with source.open("rb") as f:
        number = 0
        # limit + 1: a line of exactly `limit` bytes plus its newline is still accepted.
        while data := f.readline(limit + 1):
            number += 1
            too_long = len(data) > limit and not data.endswith(b"\n")
            if number == 1 and data.startswith(_UTF8_BOM):
                data = data[len(_UTF8_BOM) :]
            if too_long:
                if _skip_rest_of_line(f) or data.strip(_WHITESPACE):
                    yield number, _Skip(f"the line is longer than {limit // 2**20} MiB")
                continue
            if not data.strip(_WHITESPACE):
                continue
            try:
                yield number, orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                yield number, _Skip(f"not valid JSON: {exc.msg} at column {exc.colno}")


def _skip_rest_of_line(f: BinaryIO) -> bool:
    """Read past the rest of the current line in bounded reads; tell whether it was non-blank."""
    content = False
    while data := f.readline(_CHUNK_BYTES):
        content = content or bool(data.strip(_WHITESPACE))
        if data.endswith(b"\n"):
            break
    return content


def _csv_rows(source: Path) -> Iterator[tuple[int, Any]]:
    """(line number where the row starts, {"prompt", "completion"} or _Skip) per data row."""
    # The limit is process-wide; raising it never breaks another reader.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    columns: tuple[int, int] | None = None
    width = 0
    with (
        source.open("rb") as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text,
    ):
        # strict: an unclosed quote is an error, not one giant last row.
        reader = csv.reader(text, strict=True)
        last_line = 0  # the physical line the previous row ended on
        try:
            for row in reader:
                start, last_line = last_line + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if columns is None:
                    columns, width = _csv_header(row), len(row)
                elif max(columns) >= len(row):
                    yield start, _Skip(f"the row has {len(row)} columns; the header has {width}")
                elif len(row) > width and any(field.strip() for field in row[width:]):
                    # Most often a comma in an unquoted field, which cut the text in two.
                    yield (
                        start,
                        _Skip(
                            f"the row has {len(row)} columns; the header has {width} (a comma in a "
                            "field that is not in double quotes?)"
                        ),
                    )
                else:
                    yield start, {"prompt": row[columns[0]], "completion": row[columns[1]]}
        except UnicodeDecodeError:
            # A decoding error leaves no way to resynchronise: the rest cannot be trusted.
            yield (
                last_line + 1,
                _Skip(
                    "the CSV file is not valid UTF-8 from here on; the rest of it was not converted"
                ),
            )
        except csv.Error as exc:
            yield (
                last_line + 1,
                _Skip(f"the CSV row is broken ({exc}); the rest of the file was not converted"),
            )
    if columns is None:
        raise ConversionError('the CSV file has no header row with "prompt" and "completion"')


def _csv_header(row: list[str]) -> tuple[int, int]:
    names = [column.strip().lower() for column in row]
    if "prompt" not in names or "completion" not in names:
        raise ConversionError(
            f"the CSV header has columns {', '.join(repr(c) for c in row[:8])}; it needs "
            '"prompt" and "completion" columns'
        )
    return names.index("prompt"), names.index("completion")


# --- each source format to the chat shape -------------------------------------------------------


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Skip("the line is not a JSON object")
    return value


def _from_chat(value: Any) -> dict[str, Any]:
    example = dict(_object(value))
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Skip('"messages" is missing, empty or not a list')
    copied: list[dict[str, Any]] = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _Skip(f'message {number} is not an object with a "role"')
        if message["role"] not in _CHAT_ROLES:
            raise _Skip(f'message {number} has role "{message["role"]}", which chat does not know')
        # Copies: the options change contents, and the caller's value should stay untouched.
        copied.append(dict(message))
    example["messages"] = copied
    return example


def _from_pair(prompt_key: str, completion_key: str) -> Callable[[Any], dict[str, Any]]:
    def convert(value: Any) -> dict[str, Any]:
        value = _object(value)
        texts = []
        for key in (prompt_key, completion_key):
            if key not in value:
                raise _Skip(f'"{key}" is missing')
            text = value[key]
            if not isinstance(text, str):
                raise _Skip(f'"{key}" is not a string')
            if not text.strip():
                raise _Skip(f'"{key}" is empty')
            texts.append(text)
        return {
            "messages": [
                {"role": "user", "content": texts[0]},
                {"role": "assistant", "content": texts[1]},
            ]
        }

    return convert


def _from_gemini(value: Any) -> dict[str, Any]:
    value = _object(value)
    messages: list[dict[str, Any]] = []
    for key in ("systemInstruction", "system_instruction"):
        if key in value:
            system = _gemini_text(value[key], key)
            # A blank instruction says nothing; leaving it out lets system_message apply.
            if system.strip():
                messages.append({"role": "system", "content": system})
            break
    contents = value.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Skip('"contents" is missing, empty or not a list')
    for index, item in enumerate(contents):
        where = f"contents[{index}]"
        role = item.get("role") if isinstance(item, dict) else None
        if role not in _GEMINI_ROLES:
            raise _Skip(f'{where} has role {_show(role)}; only "user" and "model" can be converted')
        text = _gemini_text(item, where)
        if not text.strip():
            raise _Skip(f"{where} ({role}) has no text")
        messages.append({"role": _GEMINI_ROLES[role], "content": text})
    return {"messages": messages}


def _gemini_text(content: Any, where: str) -> str:
    """The text of a Gemini Content: its text parts joined, or _Skip when a part is not text."""
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        raise _Skip(f'{where} has no list of "parts"')
    texts = []
    for index, part in enumerate(parts):
        text = part.get("text") if isinstance(part, dict) else None
        if not isinstance(text, str):
            # Images, files and function calls have no chat equivalent here; dropping them
            # silently would change what the example teaches.
            kind = ", ".join(f'"{k}"' for k in part) if isinstance(part, dict) else "not an object"
            raise _Skip(f"{where}.parts[{index}] is not text ({kind or 'empty'})")
        texts.append(text)
    return "".join(texts)


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    return f'"{value}"' if isinstance(value, str) else orjson.dumps(value).decode()


_TO_CHAT: Final[dict[DatasetFormat, Callable[[Any], dict[str, Any]]]] = {
    DatasetFormat.chat: _from_chat,
    DatasetFormat.prompt_completion: _from_pair("prompt", "completion"),
    DatasetFormat.csv: _from_pair("prompt", "completion"),
    DatasetFormat.vertex_text: _from_pair("input_text", "output_text"),
    DatasetFormat.gemini: _from_gemini,
}


# --- options and output -------------------------------------------------------------------------


def _output_line(example: dict[str, Any], options: ConversionOptions) -> bytes:
    """Apply the options to a chat-shaped example and serialise it in the target format."""
    messages: list[dict[str, Any]] = example["messages"]
    if options.strip_whitespace:
        for message in messages:
            if "content" in message:  # a message without one (tool calls only) stays without
                message["content"] = _strip(message["content"])
    # Checked before the system message is added, so message numbers match the input.
    _check_chat(messages)
    if options.system_message is not None and not any(
        message["role"] in _SYSTEM_ROLES for message in messages
    ):
        system = options.system_message
        messages.insert(
            0, {"role": "system", "content": system.strip() if options.strip_whitespace else system}
        )
    if options.to_format == "prompt_completion":
        example = _prompt_completion(messages, options)
    try:
        return orjson.dumps(example, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits in extra fields
        raise _Skip(f"the example cannot be written as JSON: {exc}") from None


def _strip(content: Any) -> Any:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        return [
            {**part, "text": part["text"].strip()} if _is_text_part(part) else part
            for part in content
        ]
    return content


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def chat_text(content: Any) -> str | None:
    """The text of a chat message's content: a string, or a list of text parts joined; None if
    not all text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "".join(part["text"] for part in content)
    return None


def _is_blank(content: Any) -> bool:
    if content is None:
        return True
    text = chat_text(content)
    # A list with an image or other non-text part says something even without text.
    return text is not None and not text.strip()


def _check_chat(messages: list[dict[str, Any]]) -> None:
    """What the validator needs of every example: a user and an assistant message, none empty."""
    roles = set()
    for number, message in enumerate(messages, 1):
        role, content = message["role"], message.get("content")
        roles.add(role)
        if content is not None and not isinstance(content, str | list):
            raise _Skip(f"message {number} ({role}) has content that is not text or parts")
        if role == "assistant":
            calls = message.get("tool_calls") or message.get("function_call")
            if _is_blank(content) and not calls:
                raise _Skip(f"message {number} (assistant) is empty")
        elif role in ("system", "developer", "user") and _is_blank(content):
            raise _Skip(f"message {number} ({role}) is empty")
    if "user" not in roles:
        raise _Skip("there is no user message")
    if "assistant" not in roles:
        raise _Skip("there is no assistant message")


def _prompt_completion(
    messages: list[dict[str, Any]], options: ConversionOptions
) -> dict[str, Any]:
    """The legacy shape of a single-turn chat example: prompt = the text before the answer."""
    users = sum(message["role"] == "user" for message in messages)
    answers = sum(message["role"] == "assistant" for message in messages)
    if users != 1 or answers != 1:
        raise _Skip(
            f"a multi-turn example ({users} user and {answers} assistant messages) does not fit "
            "one prompt and one completion"
        )
    if messages[-1]["role"] != "assistant":
        raise _Skip("the last message is not the assistant's answer")
    texts = []
    for message in messages:
        text = chat_text(message.get("content"))
        calls = message.get("tool_calls") or message.get("function_call")
        if text is None or calls or message["role"] in ("tool", "function"):
            raise _Skip(f"the {message['role']} message is not plain text")
        texts.append(text)
    prompt, completion = _PROMPT_JOINER.join(texts[:-1]), texts[-1]
    if options.add_separator is not None and not prompt.endswith(options.add_separator):
        prompt += options.add_separator
    if options.add_leading_space and not completion.startswith(" "):
        completion = " " + completion
    if options.add_trailing_newline and not completion.endswith("\n"):
        completion += "\n"
    return {"prompt": prompt, "completion": completion}
