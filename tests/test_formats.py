"""Tests for app.files.formats: format detection and example counting of training-data files."""

from __future__ import annotations

import csv
import io
import pathlib
import random
import tracemalloc

import orjson
import pytest

from app.files import formats
from app.files.formats import DatasetFormat, Detection, detect_format

SEEDS = pathlib.Path(__file__).parent / "fixtures" / "seeds"

CHAT = {
    "messages": [
        {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        {"role": "user", "content": "What's the capital of France?"},
        {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."},
    ]
}
DPO = {
    "input": {
        "messages": [
            {"role": "user", "content": "Hello, can you tell me how cold San Francisco is?"}
        ],
        "tools": [],
        "parallel_tool_calls": True,
    },
    "preferred_output": [
        {"role": "assistant", "content": "Today in San Francisco, it is a chilly 14 degrees C."}
    ],
    "non_preferred_output": [
        {"role": "assistant", "content": "It is not particularly cold in San Francisco today."}
    ],
}
PROMPT_COMPLETION = {"prompt": "Is the sky blue? ->", "completion": " yes\n"}


def jsonl(*objects: object) -> bytes:
    return b"".join(orjson.dumps(obj) + b"\n" for obj in objects)


def write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def detect(tmp_path: pathlib.Path, data: bytes, name: str = "data.jsonl") -> Detection:
    return detect_format(write(tmp_path, name, data), name)


def assert_unknown(detection: Detection, *fragments: str) -> None:
    assert detection.format is DatasetFormat.unknown
    assert detection.examples is None
    assert detection.reason is not None
    for fragment in fragments:
        assert fragment in detection.reason, detection.reason


# --- the seed datasets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected", "examples"),
    [
        ("sentiment_simple_zh.csv", DatasetFormat.csv, 14),
        ("fund_qa_zh.jsonl", DatasetFormat.prompt_completion, 3),
        ("fund_qa_zh_prepared.jsonl", DatasetFormat.prompt_completion, 3),
        ("airport_ru.jsonl", DatasetFormat.chat, 1),
        ("marv_en.jsonl", DatasetFormat.chat, 3),
        ("gemini_contents.jsonl", DatasetFormat.gemini, 1),
        ("gemini_input_output.jsonl", DatasetFormat.vertex_text, 1),
    ],
)
def test_seed_datasets(name: str, expected: DatasetFormat, examples: int) -> None:
    assert detect_format(SEEDS / name, name) == Detection(expected, None, examples)


def test_every_seed_file_is_covered() -> None:
    assert {p.name for p in SEEDS.iterdir()} == {
        "sentiment_simple_zh.csv",
        "fund_qa_zh.jsonl",
        "fund_qa_zh_prepared.jsonl",
        "airport_ru.jsonl",
        "marv_en.jsonl",
        "gemini_contents.jsonl",
        "gemini_input_output.jsonl",
    }


def test_the_name_does_not_decide_the_format(tmp_path: pathlib.Path) -> None:
    data = (SEEDS / "marv_en.jsonl").read_bytes()
    assert detect(tmp_path, data, "marv.csv") == Detection(DatasetFormat.chat, None, 3)
    assert detect(tmp_path, data, "marv") == Detection(DatasetFormat.chat, None, 3)


# --- each JSONL format --------------------------------------------------------------------------


def test_dpo(tmp_path: pathlib.Path) -> None:
    assert detect(tmp_path, jsonl(DPO, DPO)) == Detection(DatasetFormat.dpo, None, 2)


def test_chat_with_tools_and_weights(tmp_path: pathlib.Path) -> None:
    line = {
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "Sunny.", "weight": 0},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        "parallel_tool_calls": False,
    }
    assert detect(tmp_path, jsonl(line)) == Detection(DatasetFormat.chat, None, 1)


def test_gemini_without_system_instruction(tmp_path: pathlib.Path) -> None:
    line = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    assert detect(tmp_path, jsonl(line)) == Detection(DatasetFormat.gemini, None, 1)


# --- text-level edge cases ----------------------------------------------------------------------


def test_utf8_bom(tmp_path: pathlib.Path) -> None:
    bom = b"\xef\xbb\xbf"
    assert detect(tmp_path, bom + jsonl(CHAT, CHAT)) == Detection(DatasetFormat.chat, None, 2)
    csv_data = bom + "prompt,completion\n你好,1\n".encode()
    assert detect(tmp_path, csv_data, "a.csv") == Detection(DatasetFormat.csv, None, 1)


def test_crlf_line_ends(tmp_path: pathlib.Path) -> None:
    data = jsonl(CHAT, CHAT, CHAT).replace(b"\n", b"\r\n")
    assert detect(tmp_path, data) == Detection(DatasetFormat.chat, None, 3)
    csv_data = b"prompt,completion\r\na,1\r\nb,0\r\n"
    assert detect(tmp_path, csv_data, "a.csv") == Detection(DatasetFormat.csv, None, 2)


def test_blank_lines_are_ignored(tmp_path: pathlib.Path) -> None:
    line = orjson.dumps(PROMPT_COMPLETION)
    data = b"\n  \n" + line + b"\n\n\r\n \t \n" + line + b"\r\n\n" + line + b"\n   \n\n"
    assert detect(tmp_path, data) == Detection(DatasetFormat.prompt_completion, None, 3)
    csv_data = b"\n\nprompt,completion\n\na,1\n  \n\r\nb,0\n\n"
    assert detect(tmp_path, csv_data, "a.csv") == Detection(DatasetFormat.csv, None, 2)


def test_last_line_without_newline(tmp_path: pathlib.Path) -> None:
    data = jsonl(CHAT) + orjson.dumps(CHAT)
    assert detect(tmp_path, data) == Detection(DatasetFormat.chat, None, 2)
    csv_data = b"prompt,completion\na,1\nb,0"
    assert detect(tmp_path, csv_data, "a.csv") == Detection(DatasetFormat.csv, None, 2)


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path: pathlib.Path, data: bytes) -> None:
    assert detect(tmp_path, data) == Detection(DatasetFormat.unknown, "the file is empty", None)


def test_only_blank_lines(tmp_path: pathlib.Path) -> None:
    assert_unknown(detect(tmp_path, b"\n\r\n  \n\t\n"), "only blank lines")


def test_binary_junk(tmp_path: pathlib.Path) -> None:
    junk = random.Random(1).randbytes(20_000)
    assert_unknown(detect(tmp_path, junk, "data.bin"), "binary")


def test_nul_bytes(tmp_path: pathlib.Path) -> None:
    assert_unknown(detect(tmp_path, jsonl(CHAT) + b'{"a": 1}\x00\n'), "line 2", "NUL", "binary")
    # Beyond the first kilobytes only the sampled lines are looked at.
    data = jsonl(*[CHAT] * 40) + b'{"messages": []}\x00\n'
    assert_unknown(detect(tmp_path, data), "line 41", "NUL", "binary")


def test_invalid_utf8(tmp_path: pathlib.Path) -> None:
    latin1 = '{"prompt": "café", "completion": "x"}\n'.encode("latin-1")
    detection = detect(tmp_path, jsonl(PROMPT_COMPLETION) + latin1)
    assert_unknown(detection, "line 2", "UTF-8", "0xe9")
    assert_unknown(detect(tmp_path, b"prompt,completion\ncaf\xe9,1\n", "a.csv"), "line 2", "UTF-8")


def test_utf16(tmp_path: pathlib.Path) -> None:
    assert_unknown(detect(tmp_path, jsonl(CHAT).decode().encode("utf-16")), "UTF-16")


def test_compressed_upload(tmp_path: pathlib.Path) -> None:
    import gzip

    assert_unknown(detect(tmp_path, gzip.compress(jsonl(CHAT)), "data.jsonl.gz"), "gzip")


# --- JSON-level edge cases ----------------------------------------------------------------------


def test_invalid_json(tmp_path: pathlib.Path) -> None:
    data = jsonl(CHAT, CHAT) + b'{"messages": [}\n' + jsonl(CHAT)
    assert_unknown(detect(tmp_path, data), "line 3 is not valid JSON")


def test_line_numbers_count_blank_lines(tmp_path: pathlib.Path) -> None:
    data = jsonl(CHAT) + b"\n\n" + b"{oops\n"
    assert_unknown(detect(tmp_path, data), "line 4 is not valid JSON")


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"[1, 2]", "a JSON array"),
        (b'"text"', "a JSON string"),
        (b"42", "a JSON number"),
        (b"true", "a JSON boolean"),
        (b"null", "JSON null"),
    ],
)
def test_json_line_that_is_not_an_object(tmp_path: pathlib.Path, line: bytes, kind: str) -> None:
    assert_unknown(detect(tmp_path, jsonl(CHAT) + line + b"\n"), f"line 2 is {kind}, not")
    assert_unknown(detect(tmp_path, line + b"\n"), f"line 1 is {kind}, not")


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(tmp_path: pathlib.Path, value: bytes) -> None:
    data = b'{"prompt": "x", "completion": ' + value + b"}\n"
    assert_unknown(detect(tmp_path, data), "line 1 is not valid JSON")


@pytest.mark.parametrize("opening", [b"[\n", b"{\n"])
def test_pretty_printed_json_document(tmp_path: pathlib.Path, opening: bytes) -> None:
    data = opening + b'  "messages": []\n' + (b"]\n" if opening.startswith(b"[") else b"}\n")
    assert_unknown(detect(tmp_path, data, "data.json"), "line 1", "one object per line")


def test_mixed_formats(tmp_path: pathlib.Path) -> None:
    data = jsonl(CHAT) + b"\n\n" + jsonl(DPO)
    detection = detect(tmp_path, data)
    assert detection == Detection(
        DatasetFormat.unknown, "mixed formats: line 1 is chat, line 4 is dpo", None
    )


def test_unknown_keys(tmp_path: pathlib.Path) -> None:
    alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4"}
    assert_unknown(detect(tmp_path, jsonl(alpaca)), "line 1", '"instruction"', "no known format")
    assert_unknown(detect(tmp_path, b"{}\n"), "line 1 is an empty JSON object")


def test_keys_of_two_formats(tmp_path: pathlib.Path) -> None:
    line = {**CHAT, **PROMPT_COMPLETION}
    assert_unknown(detect(tmp_path, jsonl(line)), "more than one format", "chat", "prompt")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ({"messages": "hi"}, 'looks like chat but "messages" is not a list'),
        ({"messages": [{"content": "hi"}]}, 'with a "role"'),
        ({"prompt": "x"}, 'looks like prompt_completion but has no "completion"'),
        ({"prompt": "x", "completion": 1}, '"completion" is not a string'),
        ({"preferred_output": [], "non_preferred_output": []}, 'dpo but has no "input"'),
        ({"contents": "hi"}, "looks like gemini"),
        ({"input_text": "x"}, 'vertex_text but has no "output_text"'),
    ],
)
def test_recognised_keys_with_the_wrong_shape(
    tmp_path: pathlib.Path, line: dict[str, object], fragment: str
) -> None:
    assert_unknown(detect(tmp_path, jsonl(line)), "line 1", fragment)


def test_only_the_first_lines_are_sampled(tmp_path: pathlib.Path) -> None:
    # A detector, not a validator: line 60 is broken but only 50 lines are sampled.
    data = jsonl(*[CHAT] * 59) + b"not json\n" + jsonl(CHAT)
    assert detect(tmp_path, data) == Detection(DatasetFormat.chat, None, 61)


# --- CSV ----------------------------------------------------------------------------------------


def test_csv_detected_by_content_whatever_the_name(tmp_path: pathlib.Path) -> None:
    data = b" Prompt , COMPLETION ,id\na,1,x\nb,0,y\n"
    for name in ("data.csv", "data.jsonl", "data.txt", "data"):
        assert detect(tmp_path, data, name) == Detection(DatasetFormat.csv, None, 2)


def test_csv_quoted_fields_with_newlines(tmp_path: pathlib.Path) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "completion"])
    writer.writerow(["line one\nline two\n\nline four", 'a, b and "c"'])
    writer.writerow(["\n", "x"])
    writer.writerow(["plain", "1"])
    data = buffer.getvalue().encode()
    assert detect(tmp_path, data, "a.csv") == Detection(DatasetFormat.csv, None, 3)


def test_csv_without_prompt_and_completion_columns(tmp_path: pathlib.Path) -> None:
    data = b"text,label\ngreat film,1\n"
    detection = detect(tmp_path, data, "reviews.csv")
    assert_unknown(detection, '"text", "label"', "prompt", "completion")
    # Not named .csv: the user still learns what the first line looked like.
    assert_unknown(detect(tmp_path, data, "reviews.txt"), '"text", "label"')


def test_csv_with_an_unclosed_quote(tmp_path: pathlib.Path) -> None:
    data = b'prompt,completion\na,1\nb,"0\nc,1\n'
    assert_unknown(detect(tmp_path, data, "a.csv"), "CSV data row 2")


def test_not_json_and_not_csv(tmp_path: pathlib.Path) -> None:
    assert_unknown(detect(tmp_path, b"hello world\n", "notes.txt"), "line 1 is not valid JSON")


# --- long lines ---------------------------------------------------------------------------------

LONG = formats.MAX_SAMPLED_LINE_BYTES + 1_000_000


def long_chat_line() -> bytes:
    huge = {"messages": [{"role": "user", "content": "x" * LONG}, {"role": "assistant"}]}
    return orjson.dumps(huge) + b"\n"


def test_long_line_is_classified_from_its_start(tmp_path: pathlib.Path) -> None:
    data = jsonl(CHAT) + long_chat_line() + jsonl(CHAT) + long_chat_line()
    assert detect(tmp_path, data) == Detection(DatasetFormat.chat, None, 4)


def test_long_line_that_disagrees_with_the_others(tmp_path: pathlib.Path) -> None:
    data = long_chat_line() + jsonl(PROMPT_COMPLETION)
    detection = detect(tmp_path, data)
    assert detection.reason == "mixed formats: line 1 is chat, line 2 is prompt_completion"


def test_long_line_whose_start_tells_nothing(tmp_path: pathlib.Path) -> None:
    # "input" alone does not tell DPO from other formats; nor do keys nested deeper than the top.
    untold = orjson.dumps({"input": {"messages": [{"role": "user", "content": "x" * LONG}]}})
    assert_unknown(detect(tmp_path, untold + b"\n"), "line 1 is longer than 4 MiB")
    # ... but the other sampled lines can tell.
    data = jsonl(DPO) + untold + b"\n" + jsonl(DPO)
    assert detect(tmp_path, data) == Detection(DatasetFormat.dpo, None, 3)


def test_long_line_with_a_nested_signal_key_and_tricky_strings(tmp_path: pathlib.Path) -> None:
    # Brackets, quotes and a "prompt": key inside strings or nested objects must not count.
    line = {
        "meta": {"prompt": "nested", "note": 'say "prompt": [ { and \\ "'},
        "id": '"prompt": {',
        "contents": [{"role": "user", "parts": [{"text": "x" * LONG}]}],
    }
    data = orjson.dumps(line) + b"\n"
    assert detect(tmp_path, data) == Detection(DatasetFormat.gemini, None, 1)


def test_long_line_not_an_object(tmp_path: pathlib.Path) -> None:
    array = b"[" + b"1," * (LONG // 2) + b"1]\n"
    assert_unknown(detect(tmp_path, array), "line 1 is longer than 4 MiB", "JSON object")
    data = jsonl(CHAT) + array
    assert_unknown(detect(tmp_path, data), "line 2 is longer than 4 MiB and is not a JSON object")


def test_long_line_memory_stays_flat(tmp_path: pathlib.Path) -> None:
    # A 40 MB line is sampled (first 4 MiB) and skipped in bounded reads, never held whole.
    content = "x" * 40_000_000
    path = write(tmp_path, "long.jsonl", orjson.dumps({"messages": [{"content": content}]}))
    del content
    tracemalloc.start()
    try:
        detection = detect_format(path, path.name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert detection == Detection(DatasetFormat.chat, None, 1)
    assert peak < 16 * 1024 * 1024


# --- counting -----------------------------------------------------------------------------------


def reference_count(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


def test_counting_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks put every boundary case (blank line split across chunks, CRLF split, runs of
    # newlines, whitespace-only lines) into a few random files.
    rng = random.Random(42)
    pieces = [b"{}", b'{"a": 1}', b"\n", b"\n", b"\r\n", b" ", b"\t", b"x", b"\n\n\n"]
    for chunk_bytes in (1, 2, 3, 5, 8, 64):
        monkeypatch.setattr(formats, "_CHUNK_BYTES", chunk_bytes)
        for _ in range(200):
            data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
            counted = formats._count_nonblank_lines(io.BytesIO(data))
            assert counted == reference_count(data), data


def test_counting_continues_after_the_sample(tmp_path: pathlib.Path) -> None:
    lines = [orjson.dumps(CHAT)] * 500
    rng = random.Random(7)
    data = b"".join(
        line + rng.choice([b"\n", b"\r\n", b"\n\n", b"\n \n", b"\r\n\r\n"]) for line in lines
    )
    assert detect(tmp_path, data) == Detection(DatasetFormat.chat, None, 500)


def test_large_file_is_counted_in_flat_memory(tmp_path: pathlib.Path) -> None:
    line = orjson.dumps(CHAT) + b"\n"
    block = line * 20_000 + b"\n"  # a blank line per block keeps the slow path honest
    repeats = 200_000_000 // len(block)
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for _ in range(repeats):
            f.write(block)
    tracemalloc.start()
    try:
        detection = detect_format(path, path.name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert detection == Detection(DatasetFormat.chat, None, 20_000 * repeats)
    assert peak < 16 * 1024 * 1024
