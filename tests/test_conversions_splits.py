"""Tests for app.validation.conversions and app.validation.splits: pure, streaming file rewrites."""

from __future__ import annotations

import io
import json
import pathlib
import random
import tracemalloc
from collections import Counter
from typing import Any

import pytest

from app.files.formats import DatasetFormat, detect_format
from app.validation import conversions, splits
from app.validation.conversions import (
    ConversionError,
    ConversionOptions,
    ConversionResult,
    convert_file,
)
from app.validation.splits import SplitOptions, SplitResult, split_file

SEEDS = pathlib.Path(__file__).parent / "fixtures" / "seeds"
CONVERTIBLE_SEEDS = [
    "airport_ru.jsonl",
    "fund_qa_zh.jsonl",
    "fund_qa_zh_prepared.jsonl",
    "gemini_contents.jsonl",
    "gemini_input_output.jsonl",
    "marv_en.jsonl",
    "sentiment_simple_zh.csv",
]
LEGACY = ConversionOptions(
    to_format="prompt_completion",
    add_separator=" ->",
    add_leading_space=True,
    add_trailing_newline=True,
)


def convert(
    path: pathlib.Path, fmt: DatasetFormat | None = None, **options: Any
) -> tuple[list[dict[str, Any]], ConversionResult]:
    """Convert a file (format detected unless given); the output lines parsed with plain json."""
    if fmt is None:
        fmt = detect_format(path, path.name).format
    out = io.BytesIO()
    result = convert_file(path, fmt, out, ConversionOptions(**options))
    data = out.getvalue().decode("utf-8")
    assert data == "" or data.endswith("\n")
    lines = data.splitlines()
    assert len(lines) == result.examples_out
    return [json.loads(line) for line in lines], result


def write(tmp_path: pathlib.Path, name: str, text: str | bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def jsonl(*values: Any) -> str:
    return "".join(json.dumps(value, ensure_ascii=False) + "\n" for value in values)


def roles(example: dict[str, Any]) -> list[str]:
    return [message["role"] for message in example["messages"]]


def chat(user: str, answer: str, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


# --- conversions: every source format -----------------------------------------------------------


@pytest.mark.parametrize("name", CONVERTIBLE_SEEDS)
def test_every_seed_converts_to_chat(name: str) -> None:
    path = SEEDS / name
    detection = detect_format(path, name)
    examples, result = convert(path, detection.format)
    assert result.examples_in == result.examples_out == detection.examples
    assert result.skipped == [] and result.skipped_count == 0
    for example in examples:
        assert set(example) == {"messages"}
        assert "user" in roles(example) and "assistant" in roles(example)
        for message in example["messages"]:
            assert isinstance(message["content"], str) and message["content"].strip()


@pytest.mark.parametrize("name", CONVERTIBLE_SEEDS)
def test_converted_seeds_are_detected_as_chat(name: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.jsonl"
    with out.open("wb") as f:
        result = convert_file(
            SEEDS / name, detect_format(SEEDS / name, name).format, f, ConversionOptions()
        )
    assert detect_format(out, out.name).format is DatasetFormat.chat
    assert detect_format(out, out.name).examples == result.examples_out


def test_csv_seed() -> None:
    examples, result = convert(SEEDS / "sentiment_simple_zh.csv")
    assert result.examples_in == result.examples_out == 14
    assert examples[0] == chat("這部達文西密碼真棒。", "1")
    assert examples[-1] == chat("這部不可能的任務糟透了。", "0")
    assert Counter(example["messages"][1]["content"] for example in examples) == {"1": 7, "0": 7}


def test_csv_with_bom_quotes_newlines_and_other_columns(tmp_path: pathlib.Path) -> None:
    text = (
        "\ufeffid, Completion ,PROMPT\r\n"
        '1,"Paris","What is the capital\nof France?"\r\n'
        "\r\n"
        '2,"He said ""hi""\r\nthen left",Who?\r\n'
        "3,only two columns\r\n"
        "4,,empty answer\r\n"
        "5,ok,Hello, world\r\n"
        "6,yes,trailing empty fields,,\r\n"
        "7,ok,last row without newline"
    )
    examples, result = convert(write(tmp_path, "data.csv", text), DatasetFormat.csv)
    assert examples == [
        chat("What is the capital\nof France?", "Paris"),
        chat("Who?", 'He said "hi"\r\nthen left'),
        chat("trailing empty fields", "yes"),
        chat("last row without newline", "ok"),
    ]
    assert result.examples_in == 7
    # Line numbers are where the rows start in the file, multi-line rows and blank lines counted.
    assert result.skipped == [
        {"line": 7, "reason": "the row has 2 columns; the header has 3"},
        {"line": 8, "reason": '"completion" is empty'},
        {
            "line": 9,
            "reason": "the row has 4 columns; the header has 3 (a comma in a field that is not "
            "in double quotes?)",
        },
    ]


def test_csv_without_prompt_completion_header(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConversionError, match='needs "prompt" and "completion"'):
        convert(write(tmp_path, "data.csv", "question,answer\na,b\n"), DatasetFormat.csv)
    with pytest.raises(ConversionError, match="no header"):
        convert(write(tmp_path, "empty.csv", "\n\n"), DatasetFormat.csv)


def test_broken_csv_is_reported_not_raised(tmp_path: pathlib.Path) -> None:
    text = 'prompt,completion\na,b\n"unclosed,c\nd,e\n'
    examples, result = convert(write(tmp_path, "data.csv", text), DatasetFormat.csv)
    assert examples == [chat("a", "b")]
    assert result.skipped_count == 1
    assert result.skipped[0]["line"] == 3
    assert "rest of the file was not converted" in result.skipped[0]["reason"]


def test_gemini_roles_parts_and_system_instruction(tmp_path: pathlib.Path) -> None:
    text = jsonl(
        {
            "systemInstruction": {"parts": [{"text": "Be "}, {"text": "brief."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}, {"text": " there"}]},
                {"role": "model", "parts": [{"text": "Hello."}]},
                {"role": "user", "parts": [{"text": "Bye"}]},
                {"role": "model", "parts": [{"text": "Bye."}]},
            ],
        },
        {
            "system_instruction": {"parts": [{"text": "  "}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Q"}]},
                {"role": "model", "parts": [{"text": "A"}]},
            ],
        },
        {
            "contents": [
                {"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": ""}}]},
                {"role": "model", "parts": [{"text": "A cat."}]},
            ]
        },
        {
            "contents": [
                {"role": "user", "parts": [{"text": "Q"}]},
                {"role": "function", "parts": []},
            ]
        },
        {"contents": [{"role": "user", "parts": [{"text": "Q"}]}]},
    )
    examples, result = convert(write(tmp_path, "g.jsonl", text), DatasetFormat.gemini)
    assert examples == [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye."},
            ]
        },
        chat("Q", "A"),  # a blank system instruction is left out
    ]
    assert result.skipped == [
        {"line": 3, "reason": 'contents[0].parts[0] is not text ("inlineData")'},
        {
            "line": 4,
            "reason": 'contents[1] has role "function"; only "user" and "model" can be converted',
        },
        {"line": 5, "reason": "there is no assistant message"},
    ]


def test_vertex_text_and_prompt_completion(tmp_path: pathlib.Path) -> None:
    vertex = write(tmp_path, "v.jsonl", jsonl({"input_text": "in", "output_text": "out"}))
    assert convert(vertex)[0] == [chat("in", "out")]
    legacy = write(tmp_path, "p.jsonl", jsonl({"prompt": "p", "completion": "c"}))
    assert convert(legacy)[0] == [chat("p", "c")]


def test_chat_to_chat_keeps_everything_else(tmp_path: pathlib.Path) -> None:
    example = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": " Look "},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "assistant", "content": " It is 42. ", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "parallel_tool_calls": False,
    }
    path = write(tmp_path, "c.jsonl", jsonl(example))
    assert convert(path)[0] == [example]
    stripped = convert(path, strip_whitespace=True)[0][0]
    assert stripped["messages"][0]["content"][0] == {"type": "text", "text": "Look"}
    assert stripped["messages"][3] == {"role": "assistant", "content": "It is 42.", "weight": 1}
    assert stripped["tools"] == example["tools"]


# --- conversions: options -----------------------------------------------------------------------


def test_system_message_is_added_only_where_missing() -> None:
    examples, _ = convert(SEEDS / "sentiment_simple_zh.csv", system_message="Classify.")
    assert all(roles(example) == ["system", "user", "assistant"] for example in examples)
    assert all(example["messages"][0]["content"] == "Classify." for example in examples)
    examples, _ = convert(SEEDS / "marv_en.jsonl", system_message="Classify.")
    assert [example["messages"][0]["content"] for example in examples] == [
        "Marv is a factual chatbot that is also sarcastic."
    ] * 3
    examples, _ = convert(SEEDS / "gemini_contents.jsonl", system_message="Other.")
    assert examples[0]["messages"][0]["content"] == "You are a helpful and harmless AI assistant."


def test_strip_whitespace_and_drop_duplicates(tmp_path: pathlib.Path) -> None:
    text = jsonl(
        {"prompt": "  a ", "completion": " 1\n"},
        {"prompt": "a", "completion": "1"},
        {"prompt": "b", "completion": "2"},
        {"prompt": "  a ", "completion": " 1\n"},
    )
    path = write(tmp_path, "p.jsonl", text)
    examples, result = convert(path)
    assert (result.examples_out, result.duplicates_dropped) == (4, 0)
    examples, result = convert(path, drop_duplicates=True)
    assert (result.examples_out, result.duplicates_dropped) == (3, 1)
    examples, result = convert(path, drop_duplicates=True, strip_whitespace=True)
    assert examples == [chat("a", "1"), chat("b", "2")]
    assert (result.examples_in, result.examples_out, result.duplicates_dropped) == (4, 2, 2)
    examples, _ = convert(path, strip_whitespace=True, system_message="  Sys \n")
    assert examples[0] == chat("a", "1", system="Sys")


def test_strip_whitespace_can_make_an_example_empty(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "c.jsonl", jsonl(chat("q", " "), chat("q", "a")))
    examples, result = convert(path, strip_whitespace=True)
    assert examples == [chat("q", "a")]
    assert result.skipped == [{"line": 1, "reason": "message 2 (assistant) is empty"}]


def test_legacy_options_reproduce_the_prepared_seed() -> None:
    out = io.BytesIO()
    result = convert_file(SEEDS / "fund_qa_zh.jsonl", DatasetFormat.prompt_completion, out, LEGACY)
    assert result.examples_out == 3
    produced = [json.loads(line) for line in out.getvalue().splitlines()]
    expected = [json.loads(line) for line in (SEEDS / "fund_qa_zh_prepared.jsonl").open("rb")]
    assert produced == expected
    # Already prepared data is left as it is: the options add only what is missing.
    again = io.BytesIO()
    convert_file(
        SEEDS / "fund_qa_zh_prepared.jsonl", DatasetFormat.prompt_completion, again, LEGACY
    )
    assert [json.loads(line) for line in again.getvalue().splitlines()] == expected


def test_legacy_options_do_not_touch_chat_output() -> None:
    examples, _ = convert(SEEDS / "fund_qa_zh.jsonl", add_separator=" ->", add_leading_space=True)
    assert not examples[0]["messages"][0]["content"].endswith("->")


def test_chat_to_prompt_completion(tmp_path: pathlib.Path) -> None:
    text = jsonl(
        chat("What's up?", "The sky.", system="Be sarcastic."),
        {"messages": [*chat("a", "b")["messages"], *chat("c", "d")["messages"]]},
        chat("q", "a"),
    )
    out = io.BytesIO()
    path = write(tmp_path, "c.jsonl", text)
    result = convert_file(path, DatasetFormat.chat, out, LEGACY)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"prompt": "Be sarcastic.\n\nWhat's up? ->", "completion": " The sky.\n"},
        {"prompt": "q ->", "completion": " a\n"},
    ]
    assert result.skipped_count == 1
    assert result.skipped[0]["line"] == 2
    assert "multi-turn" in result.skipped[0]["reason"]
    # Without the legacy options the texts are kept as they are.
    examples, _ = convert(SEEDS / "gemini_input_output.jsonl", to_format="prompt_completion")
    assert examples == [{"prompt": "這是輸入文本。", "completion": "這是期望的輸出文本。"}]


# --- conversions: bad input ---------------------------------------------------------------------


def test_bad_lines_are_skipped_with_their_line_numbers(tmp_path: pathlib.Path) -> None:
    text = (
        "\ufeff"
        + jsonl({"prompt": "good", "completion": "1"})
        + "\n   \n"  # blank lines: neither examples nor skipped
        + '{"prompt": "broken\n'
        + "[1, 2]\n"
        + jsonl(
            {"prompt": "no completion"},
            {"prompt": "", "completion": "empty prompt"},
            {"prompt": "number", "completion": 1},
            {"prompt": "good too", "completion": "0"},
        )
    )
    examples, result = convert(write(tmp_path, "p.jsonl", text), DatasetFormat.prompt_completion)
    assert examples == [chat("good", "1"), chat("good too", "0")]
    assert (result.examples_in, result.examples_out, result.skipped_count) == (7, 2, 5)
    assert [(skip["line"], skip["reason"]) for skip in result.skipped] == [
        (4, "not valid JSON: unexpected control character in string at column 19"),
        (5, "the line is not a JSON object"),
        (6, '"completion" is missing'),
        (7, '"prompt" is empty'),
        (8, '"completion" is not a string'),
    ]


def test_wrong_shapes_in_chat_files_are_skipped(tmp_path: pathlib.Path) -> None:
    text = jsonl(
        {"messages": "hi"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "model", "content": "x"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {
            "messages": [
                {"role": "user", "content": {"text": "q"}},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"prompt": "wrong format", "completion": "x"},
    )
    examples, result = convert(write(tmp_path, "c.jsonl", text), DatasetFormat.chat)
    assert examples == []
    assert [skip["line"] for skip in result.skipped] == [1, 2, 3, 4, 5, 6]
    assert result.skipped[3]["reason"] == "there is no assistant message"


def test_only_the_first_skips_are_listed(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "p.jsonl", "not json\n" * 50)
    examples, result = convert(path, DatasetFormat.prompt_completion)
    assert examples == []
    assert result.skipped_count == 50
    assert [skip["line"] for skip in result.skipped] == list(range(1, 21))


def test_over_long_lines_are_skipped(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversions, "MAX_LINE_BYTES", 64)
    monkeypatch.setattr(conversions, "_CHUNK_BYTES", 16)
    long_line = json.dumps({"prompt": "x" * 200, "completion": "y"})
    fits = json.dumps({"prompt": "x" * 30, "completion": "y"})
    path = write(tmp_path, "p.jsonl", f"{long_line}\n{fits}\n{' ' * 100}\n{long_line}")
    examples, result = convert(path, DatasetFormat.prompt_completion)
    assert examples == [chat("x" * 30, "y")]
    assert [skip["line"] for skip in result.skipped] == [1, 4]
    assert all(skip["reason"].startswith("the line is longer than") for skip in result.skipped)


def test_binary_garbage_never_crashes(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "x.jsonl", b'{"prompt": "\xff", "completion": "a"}\n\x00\x01\n{}\n')
    examples, result = convert(path, DatasetFormat.prompt_completion)
    assert examples == [] and result.skipped_count == 3


@pytest.mark.parametrize("fmt", [DatasetFormat.dpo, DatasetFormat.unknown, "parquet"])
def test_unconvertible_formats_raise(fmt: Any, tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "x.jsonl", jsonl(chat("q", "a")))
    out = io.BytesIO()
    with pytest.raises(ConversionError):
        convert_file(path, fmt, out, ConversionOptions())
    assert out.getvalue() == b""


def test_dpo_message_says_why(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConversionError, match="DPO"):
        convert_file(SEEDS / "marv_en.jsonl", DatasetFormat.dpo, io.BytesIO(), ConversionOptions())


@pytest.mark.parametrize(
    "options",
    [
        ConversionOptions(system_message=" "),
        ConversionOptions(to_format="prompt_completion", add_separator=""),
        ConversionOptions(to_format="csv"),  # type: ignore[arg-type]
    ],
)
def test_senseless_options_raise(options: ConversionOptions) -> None:
    with pytest.raises(ConversionError):
        convert_file(SEEDS / "marv_en.jsonl", DatasetFormat.chat, io.BytesIO(), options)


# --- splits -------------------------------------------------------------------------------------


def split(path: pathlib.Path, fraction: float, **options: Any) -> tuple[bytes, bytes, SplitResult]:
    train, validation = io.BytesIO(), io.BytesIO()
    result = split_file(path, train, validation, SplitOptions(fraction, **options))
    return train.getvalue(), validation.getvalue(), result


def numbered(n: int) -> str:
    return jsonl(*(chat(f"question {i}", f"answer {i}") for i in range(n)))


def sentiment(ones: int, zeros: int) -> str:
    """A 1/0 sentiment set, the labels interleaved as in real data."""
    labels = ["1"] * ones + ["0"] * zeros
    random.Random(0).shuffle(labels)
    rows = [("這部電影真棒。" if label == "1" else "這部電影糟透了。", label) for label in labels]
    return jsonl(*(chat(f"{text} #{i}", label) for i, (text, label) in enumerate(rows)))


def test_split_is_deterministic_for_a_seed(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "d.jsonl", numbered(200))
    first = split(path, 0.2, seed=7)
    assert split(path, 0.2, seed=7) == first
    assert split(path, 0.2, seed=8)[1] != first[1]
    assert split(path, 0.2)[1] == split(path, 0.2, seed=0)[1]


@pytest.mark.parametrize("stratify", [False, True])
def test_split_is_a_partition_in_order(tmp_path: pathlib.Path, stratify: bool) -> None:
    text = numbered(101)
    train, validation, result = split(
        write(tmp_path, "d.jsonl", text), 0.3, stratify_by_label=stratify
    )
    lines = text.encode().splitlines(keepends=True)
    train_lines = train.splitlines(keepends=True)
    validation_lines = validation.splitlines(keepends=True)
    assert Counter(train_lines) + Counter(validation_lines) == Counter(lines)
    assert not set(train_lines) & set(validation_lines)
    for part in (train_lines, validation_lines):
        positions = [lines.index(line) for line in part]
        assert positions == sorted(positions)
    assert (result.train_examples, result.validation_examples) == (
        len(train_lines),
        len(validation_lines),
    )


@pytest.mark.parametrize(
    ("examples", "fraction", "expected"),
    [
        (100, 0.1, 10),
        (100, 0.05, 5),
        (100, 0.5, 50),
        (7, 0.3, 2),  # round(2.1)
        (10, 0.25, 2),  # round(2.5): Python's round, half to even
        (2, 0.05, 1),  # at least 1
        (3, 0.5, 2),  # round(1.5) = 2 = examples - 1
        (2, 0.5, 1),
        (19, 0.05, 1),
    ],
)
def test_split_sizes(tmp_path: pathlib.Path, examples: int, fraction: float, expected: int) -> None:
    train, validation, result = split(write(tmp_path, "d.jsonl", numbered(examples)), fraction)
    assert (result.train_examples, result.validation_examples) == (examples - expected, expected)
    assert len(validation.splitlines()) == expected
    assert len(train.splitlines()) == examples - expected
    assert result.labels is None


def test_split_drops_blank_lines_and_ends_every_line(tmp_path: pathlib.Path) -> None:
    text = "\ufeff" + '{"a": 1}\r\n\n  \n\t{"a": 2}\n \n{"a": 3}\n{"a": 4}'
    train, validation, result = split(write(tmp_path, "d.jsonl", text), 0.5)
    assert result.train_examples + result.validation_examples == 4
    lines = sorted(train.splitlines(keepends=True) + validation.splitlines(keepends=True))
    assert lines == [b'\t{"a": 2}\n', b'{"a": 1}\r\n', b'{"a": 3}\n', b'{"a": 4}\n']
    assert train.endswith(b"\n") and validation.endswith(b"\n")


def test_split_copies_long_lines_in_pieces(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(splits, "_PIECE_BYTES", 7)
    text = "   " + numbered(30) + "\n   \n" + '  {"x": "' + "y" * 50 + '"}'
    path = write(tmp_path, "d.jsonl", text)
    for stratify in (False, True):
        train, validation, result = split(path, 0.2, stratify_by_label=stratify)
        expected = [line for line in text.encode().splitlines() if line.strip()]
        assert Counter(train.splitlines() + validation.splitlines()) == Counter(expected)
        assert result.train_examples + result.validation_examples == 31


def test_stratified_split_keeps_label_proportions(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "s.jsonl", sentiment(28, 12))
    for seed in range(5):
        train, validation, result = split(path, 0.25, seed=seed, stratify_by_label=True)
        assert result.labels == {
            "1": {"train": 21, "validation": 7},
            "0": {"train": 9, "validation": 3},
        }
        assert (result.train_examples, result.validation_examples) == (30, 10)
        for part, counts in ((train, {"1": 21, "0": 9}), (validation, {"1": 7, "0": 3})):
            labels = Counter(
                json.loads(line)["messages"][-1]["content"] for line in part.splitlines()
            )
            assert labels == counts


def test_stratified_split_puts_every_label_in_both_files(tmp_path: pathlib.Path) -> None:
    # 30 "1" and 10 "0": unstratified, a 10% validation set often has no "0" at all.
    path = write(tmp_path, "s.jsonl", sentiment(30, 10))
    for seed in range(20):
        train, validation, result = split(path, 0.1, seed=seed, stratify_by_label=True)
        assert result.labels == {
            "1": {"train": 27, "validation": 3},
            "0": {"train": 9, "validation": 1},
        }
        for part in (train, validation):
            labels = {json.loads(line)["messages"][-1]["content"] for line in part.splitlines()}
            assert labels == {"1", "0"}


def test_stratified_split_keeps_one_of_each_label_for_training(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "s.jsonl", sentiment(9, 1) + jsonl(chat("q", "0"), chat("r", "2")))
    _, _, result = split(path, 0.5, stratify_by_label=True)
    # 6 of the 12 to validation: 4.5, 1 and 0.5 wanted; the half goes to "1", which has more
    # than one example to give, not to "2", whose one example would then never be trained on.
    assert result.labels == {
        "1": {"train": 4, "validation": 5},
        "0": {"train": 1, "validation": 1},
        "2": {"train": 1, "validation": 0},
    }
    # A label whose count rounds to nothing gives none; validation still gets one example.
    path = write(tmp_path, "t.jsonl", jsonl(chat("a", "x"), chat("b", "y"), chat("c", "x")))
    _, _, result = split(path, 0.05, stratify_by_label=True)
    assert result.labels == {"x": {"train": 1, "validation": 1}, "y": {"train": 1, "validation": 0}}


def test_stratifying_mostly_different_answers_keeps_the_fraction(tmp_path: pathlib.Path) -> None:
    # 60 answers, all different: every label has one example; 12 of them go to validation, the
    # seed deciding which, instead of the single one a per-label rounding would give.
    path = write(tmp_path, "s.jsonl", jsonl(*(chat(f"q{i}", f"answer {i}") for i in range(60))))
    chosen = set()
    for seed in range(3):
        _, validation, result = split(path, 0.2, seed=seed, stratify_by_label=True)
        assert (result.train_examples, result.validation_examples) == (48, 12)
        assert result.labels is not None and len(result.labels) == 60
        assert sum(sides["validation"] for sides in result.labels.values()) == 12
        chosen.add(validation)
    assert len(chosen) == 3


@pytest.mark.parametrize("stratify", [False, True])
def test_copies_of_an_example_go_to_the_same_file(tmp_path: pathlib.Path, stratify: bool) -> None:
    examples = [chat(f"review {i}", str(i % 2)) for i in range(40)]
    # Exact copies, and one with its keys in another order and other spacing.
    copies = [examples[3], examples[3], examples[7]]
    reordered = json.dumps(
        {"messages": [dict(reversed(m.items())) for m in examples[9]["messages"]]},
        indent=None,
        separators=(" ,", " : "),
    )
    path = write(tmp_path, "d.jsonl", jsonl(*examples, *copies) + reordered + "\n")
    for seed in range(10):
        train, validation, result = split(path, 0.25, seed=seed, stratify_by_label=stratify)
        assert result.train_examples + result.validation_examples == 44
        canonical = [
            {json.dumps(json.loads(line), sort_keys=True) for line in part.splitlines()}
            for part in (train, validation)
        ]
        assert not canonical[0] & canonical[1], seed
        # Distinct examples are what is sampled: 10 of the 40.
        assert len(canonical[1]) == 10


@pytest.mark.parametrize("stratify", [False, True])
def test_an_example_nested_deeper_than_orjson_writes_is_split_too(
    tmp_path: pathlib.Path, stratify: bool
) -> None:
    deep = '{"messages": ' + "[" * 300 + "]" * 300 + "}\n"  # parses; orjson writes <= 254 levels
    path = write(tmp_path, "d.jsonl", numbered(9) + deep + deep)
    train, validation, result = split(path, 0.2, stratify_by_label=stratify)
    assert result.train_examples + result.validation_examples == 11
    # Its two copies are compared by their bytes, and go to the same file.
    assert sorted((train.count(deep.encode()), validation.count(deep.encode()))) == [0, 2]


def test_stratified_labels_of_every_jsonl_format(tmp_path: pathlib.Path) -> None:
    text = (
        jsonl(
            {"prompt": "a", "completion": " pos\n"},
            {"prompt": "b", "completion": "pos"},
            {"input_text": "c", "output_text": "neg"},
            {
                "contents": [
                    {"role": "user", "parts": [{"text": "d"}]},
                    {"role": "model", "parts": [{"text": "ne"}, {"text": "g"}]},
                ]
            },
            {
                "input": {"messages": [{"role": "user", "content": "e"}]},
                "preferred_output": [{"role": "assistant", "content": "pos"}],
                "non_preferred_output": [{"role": "assistant", "content": "neg"}],
            },
            {
                "messages": [
                    {"role": "user", "content": "f"},
                    {"role": "assistant", "content": [{"type": "text", "text": "neg"}]},
                ]
            },
            {"messages": [{"role": "user", "content": "g"}]},
        )
        + "not json\n"
    )
    _, _, result = split(write(tmp_path, "m.jsonl", text), 0.5, stratify_by_label=True)
    assert result.labels is not None
    assert {label: sum(counts.values()) for label, counts in result.labels.items()} == {
        "pos": 3,
        "neg": 3,
        splits.UNLABELLED: 2,
    }


def test_stratifying_free_text_is_refused(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(splits, "MAX_LABELS", 10)
    with pytest.raises(ValueError, match="more than 10 different answers"):
        split(write(tmp_path, "d.jsonl", numbered(11)), 0.2, stratify_by_label=True)
    assert split(write(tmp_path, "e.jsonl", numbered(10)), 0.2, stratify_by_label=True)[2].labels


@pytest.mark.parametrize("fraction", [0.0, 0.04, 0.51, 1.0, -0.1, float("nan")])
def test_split_fraction_bounds(tmp_path: pathlib.Path, fraction: float) -> None:
    train, validation = io.BytesIO(), io.BytesIO()
    with pytest.raises(ValueError, match=r"validation_fraction must be between 0\.05 and 0\.5"):
        split_file(
            write(tmp_path, "d.jsonl", numbered(10)), train, validation, SplitOptions(fraction)
        )
    assert train.getvalue() == validation.getvalue() == b""


@pytest.mark.parametrize("text", ["", "\n\n", numbered(1), "\n" + numbered(1) + "   \n"])
@pytest.mark.parametrize("stratify", [False, True])
def test_split_needs_two_examples(tmp_path: pathlib.Path, text: str, stratify: bool) -> None:
    with pytest.raises(ValueError, match="a split needs at least 2"):
        split(write(tmp_path, "d.jsonl", text), 0.5, stratify_by_label=stratify)


@pytest.mark.parametrize("stratify", [False, True])
def test_split_refuses_csv(stratify: bool) -> None:
    with pytest.raises(ValueError, match="not JSON Lines"):
        split(SEEDS / "sentiment_simple_zh.csv", 0.2, stratify_by_label=stratify)


# --- memory -------------------------------------------------------------------------------------


def big_prompt_completion_file(
    tmp_path: pathlib.Path, size: int = 100 * 1024 * 1024
) -> pathlib.Path:
    """About `size` bytes of distinct legacy examples with 1/0 labels."""
    padding = "lorem ipsum dolor sit amet " * 80
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        written, i = 0, 0
        while written < size:
            chunk = "".join(
                f'{{"prompt": "review {n}: {padding}", "completion": "{n % 2}"}}\n'
                for n in range(i, i + 10_000)
            )
            f.write(chunk)
            written += len(chunk)
            i += 10_000
    return path


def test_big_files_convert_and_split_in_flat_memory(tmp_path: pathlib.Path) -> None:
    path = big_prompt_completion_file(tmp_path)
    tracemalloc.start()
    try:
        with (tmp_path / "out.jsonl").open("wb") as out:
            result = convert_file(
                path,
                DatasetFormat.prompt_completion,
                out,
                ConversionOptions(system_message="Rate it.", drop_duplicates=True),
            )
        _, convert_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with (
            (tmp_path / "train.jsonl").open("wb") as train,
            (tmp_path / "val.jsonl").open("wb") as validation,
        ):
            split_result = split_file(
                path, train, validation, SplitOptions(0.1, seed=3, stratify_by_label=True)
            )
        _, split_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.examples_out == result.examples_in > 40_000
    assert split_result.train_examples + split_result.validation_examples == result.examples_in
    assert convert_peak < 32 * 1024 * 1024, convert_peak
    assert split_peak < 32 * 1024 * 1024, split_peak
