"""The pure validation engine: reports on real and crafted files, exact tokens, robustness, cost.

No database and no app: files are written to tmp_path and `validate_file` is called directly.
Token totals are checked against an independent count done here with quicktok's
`encode_ordinary`, one value at a time, plus OpenAI's cookbook overhead rule.
"""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import quicktok

from app.validation import engine, pipeline
from app.validation.catalog import ModelSpec, encoding_for_model, known_models, resolve_model
from app.validation.cost import epochs_for, price_for
from app.validation.engine import Target, ValidationCancelled, validate_file
from app.validation.hashtable import HashTable
from app.validation.issues import ERROR_CODES, WARNING_CODES
from app.validation.tokens import QuicktokCounter, TokenCounter

SEEDS = Path(__file__).parent / "fixtures" / "seeds"
REPORT_KEYS = {
    "verdict",
    "format",
    "model",
    "method",
    "examples",
    "errors",
    "warnings",
    "stats",
    "tokens",
    "cost",
    "lines",
    "bytes",
}


def model(name: str) -> ModelSpec:
    spec = resolve_model(name)
    assert spec is not None, name
    return spec


MINI = model("gpt-4o-mini")
BABBAGE = model("babbage-002")


def target(name: str = "gpt-4o-mini", **kwargs: Any) -> Target:
    return Target(model(name), **kwargs)


def write(tmp_path: Path, lines: list[Any], name: str = "data.jsonl", end: str = "\n") -> Path:
    """Each item: a dict (dumped as JSON), a str (written as is) or bytes."""
    path = tmp_path / name
    with path.open("wb") as f:
        for item in lines:
            if isinstance(item, bytes):
                data = item
            elif isinstance(item, str):
                data = item.encode()
            else:
                data = json.dumps(item, ensure_ascii=False).encode()
            f.write(data + end.encode())
    return path


def chat(i: int, *, system: bool = True, answer: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are a terse assistant."}] if system else []
    messages += [
        {"role": "user", "content": f"Question number {i}: what is {i} + {i}?"},
        {"role": "assistant", "content": answer if answer is not None else f"It is {2 * i}."},
    ]
    return {"messages": messages}


def run(path: Path, tgt: Target | None = None, **kwargs: Any) -> dict[str, Any]:
    report = validate_file(path, tgt or target(), **kwargs)
    assert set(report) == REPORT_KEYS
    json.dumps(report, allow_nan=False)  # JSON-serialisable, no NaN
    return report


def issues(report: dict[str, Any], kind: str = "errors") -> dict[str, dict[str, Any]]:
    return {item["code"]: item for item in report[kind]}


def first(report: dict[str, Any], code: str) -> dict[str, Any]:
    found = issues(report, "errors") | issues(report, "warnings")
    assert code in found, (code, report["errors"], report["warnings"])
    occurrences = found[code]["occurrences"]
    return occurrences[0] if occurrences else {}


# Independent token count: quicktok's encode_ordinary per value + the cookbook's rule.
_ENCODINGS: dict[str, Any] = {}


def n_tokens(text: str, encoding: str = "o200k_base") -> int:
    enc = _ENCODINGS.setdefault(encoding, quicktok.get_encoding(encoding))
    return len(enc.encode_ordinary(text))


def expected_chat_tokens(example: dict[str, Any], encoding: str = "o200k_base") -> tuple[int, int]:
    total, trained = 3, 0
    for key in ("tools", "functions"):
        if key in example:
            total += n_tokens(orjson.dumps(example[key]).decode(), encoding)
    for message in example["messages"]:
        total += 3 + n_tokens(message["role"], encoding)
        content = message.get("content")
        texts = [content] if isinstance(content, str) else []
        if isinstance(content, list):
            texts = [part["text"] for part in content if part["type"] == "text"]
        for field in ("tool_calls", "function_call"):
            if message.get(field) is not None:
                texts.append(orjson.dumps(message[field]).decode())
        counted = sum(n_tokens(text, encoding) for text in texts if text)
        total += counted
        if message["role"] == "assistant" and message.get("weight", 1) != 0:
            trained += counted
        if message.get("name"):
            total += n_tokens(message["name"], encoding) + 1
    return total, trained


# --- seeds -------------------------------------------------------------------------------


def test_seed_marv_has_three_examples_which_is_too_few() -> None:
    report = run(SEEDS / "marv_en.jsonl")
    assert (report["format"], report["examples"], report["lines"]) == ("chat", 3, 3)
    assert report["verdict"] == "invalid"
    assert set(issues(report)) == {"too_few_examples"}
    assert report["warnings"] == []
    lines = (SEEDS / "marv_en.jsonl").read_text(encoding="utf-8").splitlines()
    expected = [expected_chat_tokens(json.loads(line)) for line in lines]
    assert report["tokens"]["total"] == sum(total for total, _ in expected)
    assert report["tokens"]["trained"] == sum(trained for _, trained in expected)
    assert report["tokens"]["tokenizer"] == "o200k_base"
    assert report["stats"]["messages_per_example"]["max"] == 3


def test_seed_airport_is_counted_with_cl100k_for_gpt_35() -> None:
    report = run(SEEDS / "airport_ru.jsonl", target("gpt-3.5-turbo"))
    example = json.loads((SEEDS / "airport_ru.jsonl").read_text(encoding="utf-8"))
    assert report["tokens"]["tokenizer"] == "cl100k_base"
    assert report["model"] == "gpt-3.5-turbo-0125"
    assert report["tokens"]["total"] == expected_chat_tokens(example, "cl100k_base")[0]


def test_seed_prompt_completion_gets_prepare_data_warnings_unless_prepared() -> None:
    raw = run(SEEDS / "fund_qa_zh.jsonl", target("babbage-002"))
    assert (raw["format"], raw["examples"]) == ("prompt_completion", 3)
    assert set(issues(raw, "warnings")) == {
        "inconsistent_separator",
        "completion_missing_leading_space",
        "completion_inconsistent_ending",
    }
    leading = first(raw, "completion_missing_leading_space")
    assert (leading["line"], leading["path"]) == (1, "completion")
    assert issues(raw, "warnings")["inconsistent_separator"]["count"] == 3  # no common ending
    examples = [
        json.loads(line)
        for line in (SEEDS / "fund_qa_zh.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert raw["tokens"]["total"] == sum(
        n_tokens(e["prompt"], "cl100k_base") + n_tokens(e["completion"], "cl100k_base")
        for e in examples
    )
    prepared = run(SEEDS / "fund_qa_zh_prepared.jsonl", target("babbage-002"))
    assert prepared["warnings"] == []
    assert set(issues(prepared)) == {"too_few_examples"}


def test_seed_csv_and_gemini_must_be_converted_but_are_counted() -> None:
    csv_report = run(SEEDS / "sentiment_simple_zh.csv")
    assert (csv_report["format"], csv_report["examples"]) == ("csv", 14)
    unsupported = issues(csv_report)["unsupported_format"]
    assert "POST /v1/files/{id}/conversions" in unsupported["message"]
    assert "few_examples" in issues(csv_report, "warnings")
    assert csv_report["cost"]["usd"] is None
    for name, fmt in (
        ("gemini_contents.jsonl", "gemini"),
        ("gemini_input_output.jsonl", "vertex_text"),
    ):
        report = run(SEEDS / name)
        assert (report["format"], report["examples"]) == (fmt, 1)
        assert {"unsupported_format", "too_few_examples"} <= set(issues(report))


def test_valid_files(tmp_path: Path) -> None:
    twelve = run(write(tmp_path, [chat(i) for i in range(12)]))
    assert twelve["verdict"] == "valid_with_warnings"
    assert [w["code"] for w in twelve["warnings"]] == ["few_examples"]
    assert twelve["errors"] == []
    sixty = run(write(tmp_path, [chat(i) for i in range(60)], "sixty.jsonl"))
    assert sixty["verdict"] == "valid"
    assert sixty["warnings"] == [] and sixty["errors"] == []
    assert sixty["stats"]["valid_examples"] == 60


# --- tokens ------------------------------------------------------------------------------


def test_tokens_equal_an_independent_count(tmp_path: Path) -> None:
    rng = random.Random(5)
    words = "the fund 基金 аэропорт การปรับแต่ง 🚀 <|endoftext|> <|im_start|> 42 ,\n\t".split(" ")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    examples = []
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        example = chat(i, system=i % 3 != 0, answer=text + str(i))
        if i % 4 == 0:
            example["messages"][-2]["name"] = f"user_{i}"
        if i % 5 == 0:
            example["tools"] = tools
            example["messages"].append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                        }
                    ],
                }
            )
            example["messages"].append(
                {"role": "tool", "tool_call_id": f"call_{i}", "content": "ok"}
            )
            example["messages"].append({"role": "assistant", "content": "done", "weight": 1})
        if i % 7 == 0:
            example["messages"][-1]["weight"] = 0
        if i % 6 == 0:
            example["messages"][-2]["content"] = [{"type": "text", "text": text}]
        examples.append(example)
    report = run(write(tmp_path, examples))
    assert report["errors"] == []
    expected = [expected_chat_tokens(e) for e in examples]
    totals = [t for t, _ in expected]
    assert report["tokens"]["total"] == sum(totals)
    assert report["tokens"]["trained"] == sum(t for _, t in expected)
    assert report["tokens"]["billable_per_epoch"] == sum(totals)
    per_example = report["stats"]["total_tokens_per_example"]
    assert per_example["min"] == min(totals) and per_example["max"] == max(totals)
    assert per_example["median"] == pytest.approx(float(np.median(totals)), abs=0.01)
    assert per_example["p5"] == pytest.approx(float(np.percentile(totals, 5)), abs=0.01)
    assert per_example["p95"] == pytest.approx(float(np.percentile(totals, 95)), abs=0.01)
    assert per_example["mean"] == pytest.approx(sum(totals) / len(totals), abs=0.01)


def test_batches_counted_in_many_hand_offs_add_up_and_share_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny hand-offs and batches: an example's batch is counted in several hand-offs, and a
    # duplicate's original was finished in an earlier batch.
    monkeypatch.setattr(engine, "COUNT_CHARS", 500)
    monkeypatch.setattr(engine, "BATCH_EXAMPLES", 7)
    rng = random.Random(8)
    words = "the fund 基金 аэропорт การปรับแต่ง 42 ,".split(" ")
    examples = [
        chat(i, system=i % 4 != 0, answer=" ".join(rng.choice(words) for _ in range(i % 50)))
        for i in range(60)
    ]
    report = run(write(tmp_path, [*examples, examples[3], examples[58]]))
    expected = [expected_chat_tokens(e) for e in [*examples, examples[3], examples[58]]]
    totals = [t for t, _ in expected]
    assert report["tokens"]["total"] == sum(totals)
    assert report["tokens"]["trained"] == sum(t for _, t in expected)
    per_example = report["stats"]["total_tokens_per_example"]
    assert (per_example["min"], per_example["max"]) == (min(totals), max(totals))
    assert per_example["median"] == pytest.approx(float(np.median(totals)), abs=0.01)
    duplicates = issues(report, "warnings")["duplicate_examples"]["occurrences"]
    assert [(o["line"], o["message"]) for o in duplicates] == [
        (61, "an exact duplicate of line 4"),
        (62, "an exact duplicate of line 59"),
    ]


def test_quicktok_counts_many_texts_and_a_long_one_in_several_calls() -> None:
    texts = [f"line {i} 基金 аэропорт " * (i % 9) for i in range(1300)]
    texts.insert(700, "x y z " * 50_000)  # past the length counted on its own
    assert QuicktokCounter("o200k_base").count_batch(texts) == [n_tokens(t) for t in texts]


def test_special_token_text_is_plain_text_and_dpo_counts_input_and_both_outputs(
    tmp_path: Path,
) -> None:
    records = [
        {
            "input": {"messages": [{"role": "user", "content": f"<|endoftext|> hi {i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"good {i}"}],
            "non_preferred_output": [{"role": "assistant", "content": f"bad <|fim_prefix|> {i}"}],
        }
        for i in range(12)
    ]
    report = run(write(tmp_path, records), target(method="dpo"))
    assert report["format"] == "dpo" and report["errors"] == []
    total = trained = 0
    for r in records:
        prompt = r["input"]["messages"][0]["content"]
        good = r["preferred_output"][0]["content"]
        bad = r["non_preferred_output"][0]["content"]
        outputs = n_tokens(good) + n_tokens(bad)
        total += 3 + (3 + n_tokens("user") + n_tokens(prompt)) + 2 * (3 + n_tokens("assistant"))
        total += outputs
        trained += outputs
    assert report["tokens"]["total"] == total
    assert report["tokens"]["trained"] == trained
    assert report["method"] == "dpo"


def test_a_counter_can_be_plugged_in(tmp_path: Path) -> None:
    class Characters:
        name = "characters"

        def count_batch(self, texts: list[str]) -> list[int]:
            return [len(text) for text in texts]

    counter: TokenCounter = Characters()
    assert isinstance(QuicktokCounter("o200k_base"), TokenCounter)
    report = run(write(tmp_path, [chat(1)] * 1), counter=counter)
    messages = chat(1)["messages"]
    expected = 3 + sum(3 + len(m["role"]) + len(m["content"]) for m in messages)
    assert report["tokens"] == {
        "total": expected,
        "trained": len(messages[-1]["content"]),
        "billable_per_epoch": expected,
        "tokenizer": "characters",
    }


# --- every error, pinpointed -------------------------------------------------------------


def test_a_file_with_every_error_pinpoints_each(tmp_path: Path) -> None:
    ok = chat(0)
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "hello"}
    rows: list[Any] = [
        ok,  # 1
        b'{"messages": "\xff\xfe"}',  # 2 invalid_utf8
        '{"messages": [',  # 3 invalid_json
        "",  # 4 blank: skipped but counted
        "[1, 2]",  # 5 data_type (not an object)
        {"messages": []},  # 6 missing_messages_list
        {"messages": [{"content": "hi"}, answer]},  # 7 message_missing_key
        {"messages": [{**user, "foo": 1}, answer]},  # 8 message_unrecognized_key
        {"messages": [{"role": "robot", "content": "x"}, answer]},  # 9 unrecognized_role
        {"messages": [{"role": "user", "content": None}, answer]},  # 10 missing_content
        {"messages": [user]},  # 11 example_missing_assistant_message
        {"messages": [user, {**answer, "weight": 2}]},  # 12 invalid_weight
        {"messages": [user, {"role": "assistant", "tool_calls": "call it"}]},  # 13
        {"tools": [{"type": "function", "function": {}}], "messages": [user, answer]},  # 14
        {"prompt": "a ->", "completion": " b\n"},  # 15 mixed_formats
        {"messages": [user, {"role": "assistant", "content": 42}]},  # 16 data_type (content)
        "x" * 300,  # 17 line_too_long (limit 256 bytes below)
        {"messages": [{**user, "weight": 1}, answer]},  # 18 invalid_weight (not assistant)
    ]
    report = run(write(tmp_path, rows), max_line_bytes=256)
    assert report["verdict"] == "invalid"
    assert report["lines"] == 18 and report["examples"] == 17
    expected = {
        "invalid_utf8": (2, None),
        "invalid_json": (3, None),
        "data_type": (5, None),
        "missing_messages_list": (6, "messages"),
        "message_missing_key": (7, "messages[0].role"),
        "message_unrecognized_key": (8, "messages[0].foo"),
        "unrecognized_role": (9, "messages[0].role"),
        "missing_content": (10, "messages[0].content"),
        "example_missing_assistant_message": (11, "messages"),
        "invalid_weight": (12, "messages[1].weight"),
        "invalid_tool_calls": (13, "messages[1].tool_calls"),
        "invalid_tools": (14, "tools[0].function"),
        "mixed_formats": (15, None),
        "line_too_long": (17, None),
    }
    for code, (line, path) in expected.items():
        occurrence = first(report, code)
        assert (occurrence["line"], occurrence["path"]) == (line, path), code
        assert occurrence["message"]
    found = issues(report)
    assert found["data_type"]["count"] == 2
    assert found["data_type"]["occurrences"][1]["path"] == "messages[1].content"
    assert found["invalid_weight"]["occurrences"][1] == {
        "line": 18,
        "path": "messages[0].weight",
        "message": "weight is only allowed on assistant messages, not on a user message",
    }
    assert set(found) == set(expected)
    # Only the valid example is counted.
    assert report["stats"]["valid_examples"] == 1
    assert report["tokens"]["total"] == expected_chat_tokens(ok)[0]


def test_more_message_errors_are_pinpointed(tmp_path: Path) -> None:
    user = {"role": "user", "content": "hi"}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    rows = [chat(i) for i in range(10)] + [
        {"messages": [user, {"role": "assistant", "tool_calls": [call]}]},
        {
            "messages": [
                user,
                {"role": "tool", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"messages": [user, {"role": "assistant", "content": "a", "weight": True}]},
    ]
    report = run(write(tmp_path, rows))
    assert (
        first(report, "invalid_tool_calls")["path"]
        == "messages[1].tool_calls[0].function.arguments"
    )
    assert (
        first(report, "message_missing_key")["line"],
        first(report, "message_missing_key")["path"],
    ) == (
        12,
        "messages[1].tool_call_id",
    )
    assert first(report, "invalid_weight")["line"] == 13


def test_dpo_errors(tmp_path: Path) -> None:
    good = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    }
    rows: list[Any] = [good] * 10 + [
        {k: v for k, v in good.items() if k != "preferred_output"},
        {**good, "non_preferred_output": [{"role": "user", "content": "b"}]},
        {**good, "input": {"messages": [{"role": "robot", "content": "q"}]}},
    ]
    report = run(write(tmp_path, rows), target(method="dpo"))
    found = issues(report)
    assert [(o["line"], o["path"]) for o in found["invalid_dpo"]["occurrences"]] == [
        (11, "preferred_output"),
        (12, "non_preferred_output[0].role"),
    ]
    assert (
        first(report, "unrecognized_role")["line"],
        first(report, "unrecognized_role")["path"],
    ) == (
        13,
        "input.messages[0].role",
    )
    assert "duplicate_examples" in issues(report, "warnings")


@pytest.mark.parametrize(
    ("rows", "tgt", "needle"),
    [
        ("chat", "babbage-002", "chat data is accepted only by chat models"),
        ("legacy", "gpt-4o-mini", "accepted only by the completion models"),
        ("dpo", "gpt-4o-mini", 'trains only with the "dpo" method'),
        ("chat", "gpt-4o-mini/dpo", "needs DPO data"),
        ("chat", "gpt-3.5-turbo/dpo", "does not support the dpo method"),
    ],
)
def test_unsupported_format(tmp_path: Path, rows: str, tgt: str, needle: str) -> None:
    data: dict[str, list[Any]] = {
        "chat": [chat(i) for i in range(10)],
        "legacy": [{"prompt": f"q{i} ->", "completion": f" a{i}\n"} for i in range(10)],
        "dpo": [
            {
                "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            }
            for i in range(10)
        ],
    }
    name, _, method = tgt.partition("/")
    report = run(write(tmp_path, data[rows]), target(name, method=method or "supervised"))
    unsupported = issues(report)["unsupported_format"]
    assert needle in unsupported["message"]
    assert unsupported["occurrences"][0]["line"] == 1
    assert report["verdict"] == "invalid"


def test_too_few_examples_and_an_empty_file(tmp_path: Path) -> None:
    report = run(write(tmp_path, [chat(i) for i in range(9)]))
    assert "only 9 example" in issues(report)["too_few_examples"]["message"]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    report = run(empty)
    assert (report["examples"], report["lines"], report["bytes"]) == (0, 0, 0)
    assert report["format"] == "unknown" and set(issues(report)) == {"too_few_examples"}
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\r\n\t\n")
    report = run(blank)
    assert (report["examples"], report["lines"]) == (0, 4)
    assert set(issues(report)) == {"too_few_examples"}


def test_broken_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\nq,a\n"a,b\n' + "x\n" * 100, encoding="utf-8")
    report = run(path, max_line_bytes=64)  # the open quote swallows rows past the limit
    assert report["format"] == "csv"
    assert report["examples"] == 1
    assert "never closed" in first(report, "invalid_csv")["message"]
    path.write_text('prompt,completion\nq,a\n"a,b\n', encoding="utf-8")
    assert "invalid_csv" in issues(run(path))


# --- every warning -----------------------------------------------------------------------


def test_over_context_limit(tmp_path: Path) -> None:
    small = replace(MINI, context_limit=100)
    rows = [chat(i) for i in range(10)] + [chat(10, answer="word " * 200)]
    report = run(write(tmp_path, rows), Target(small))
    totals = [expected_chat_tokens(r)[0] for r in rows]
    assert max(totals[:10]) <= 100 < totals[10]
    over = issues(report, "warnings")["over_context_limit"]
    assert over["count"] == 1
    assert over["occurrences"][0]["line"] == 11
    assert (
        f"{totals[10]} tokens, over the 100-token context limit"
        in over["occurrences"][0]["message"]
    )
    assert report["tokens"]["billable_per_epoch"] == sum(totals[:10]) + 100
    assert report["tokens"]["total"] == sum(totals)


def test_example_warnings_are_pinpointed(tmp_path: Path) -> None:
    rows: list[Any] = [chat(i) for i in range(12)]
    rows[3] = chat(3, system=False)  # missing_system_message
    rows[4] = {
        "messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    }
    rows[5] = chat(6)
    # The same example as line 6, with its keys in another order and no spaces: a duplicate.
    reordered = [{"content": m["content"], "role": m["role"]} for m in chat(6)["messages"]]
    rows[6] = json.dumps({"messages": reordered}, separators=(",", ":"))
    rows[7] = chat(1, answer="something else")  # conflicting answers with line 2
    rows[8] = chat(8, answer="")  # empty_assistant_message
    report = run(write(tmp_path, rows))
    warnings = issues(report, "warnings")
    assert report["verdict"] == "valid_with_warnings"
    assert (
        first(report, "missing_system_message")["line"],
        first(report, "missing_system_message")["path"],
    ) == (4, "messages")
    assert first(report, "missing_user_message")["line"] == 5
    assert first(report, "duplicate_examples") == {
        "line": 7,
        "path": None,
        "message": "an exact duplicate of line 6",
    }
    assert first(report, "conflicting_answers") == {
        "line": 8,
        "path": "messages[2]",
        "message": "the same prompt as line 2, with a different answer",
    }
    assert (
        first(report, "empty_assistant_message")["line"],
        first(report, "empty_assistant_message")["path"],
    ) == (
        9,
        "messages[2].content",
    )
    assert warnings["few_examples"]["count"] == 1


def test_label_imbalance_and_answer_distribution(tmp_path: Path) -> None:
    rows = [chat(i, answer="positive") for i in range(18)] + [
        chat(i, answer="negative") for i in range(18, 20)
    ]
    report = run(write(tmp_path, rows))
    assert report["stats"]["answers"] == {"positive": 18, "negative": 2}
    assert "label_imbalance" in issues(report, "warnings")
    balanced = [chat(i, answer="yes" if i % 2 else "no") for i in range(20)]
    report = run(write(tmp_path, balanced, "balanced.jsonl"))
    assert report["stats"]["answers"] == {"no": 10, "yes": 10}
    assert "label_imbalance" not in issues(report, "warnings")
    free_text = run(write(tmp_path, [chat(i) for i in range(30)], "free.jsonl"))
    assert free_text["stats"]["answers"] is None


def test_prompt_completion_separator_and_ending_warnings(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i} ->", "completion": f" answer {i}\n"} for i in range(12)]
    rows[4] = {"prompt": "question 4", "completion": " answer 4\n"}
    rows[6] = {"prompt": "question 6 ->", "completion": "answer 6\n"}
    rows[8] = {"prompt": "question 8 ->", "completion": " answer 8"}
    report = run(write(tmp_path, rows), target("babbage-002"))
    assert first(report, "inconsistent_separator") == {
        "line": 5,
        "path": "prompt",
        "message": "the prompt ends with '4'",
    }
    assert "' ->'" in issues(report, "warnings")["inconsistent_separator"]["message"]
    assert first(report, "completion_missing_leading_space")["line"] == 7
    assert first(report, "completion_inconsistent_ending")["line"] == 9
    assert issues(report, "warnings")["completion_inconsistent_ending"]["count"] == 1


def test_every_code_is_exercised() -> None:
    """The tests above trigger every code the engine knows."""
    source = Path(__file__).read_text(encoding="utf-8")
    missing = [code for code in (*ERROR_CODES, *WARNING_CODES) if f'"{code}"' not in source]
    assert missing == []


# --- robustness --------------------------------------------------------------------------


def test_a_50_mb_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for i in range(6):
            f.write(json.dumps(chat(i)).encode() + b"\n")
        f.write(b'{"messages": [{"role": "user", "content": "')
        block = b"a" * (1024 * 1024)
        for _ in range(50):
            f.write(block)
        f.write(b'"}]}\n')
        for i in range(6, 12):
            f.write(json.dumps(chat(i)).encode() + b"\n")
    tracemalloc.start()
    try:
        report = run(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (8 + 4) * 1024 * 1024  # the 8 MiB line limit and a chunk, never the 50 MB
    assert first(report, "line_too_long")["line"] == 7
    assert (report["examples"], report["lines"], report["stats"]["valid_examples"]) == (13, 13, 12)


@pytest.mark.parametrize(
    "line",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"messages": NaN}',
        '{"messages": [{"role": "user", "content": Infinity}]}',
    ],
)
def test_deep_nesting_and_nan_are_invalid_json(tmp_path: Path, line: str) -> None:
    report = run(write(tmp_path, [chat(i) for i in range(10)] + [line]))
    assert first(report, "invalid_json")["line"] == 11


def test_bom_crlf_blank_lines_and_duplicate_keys(tmp_path: Path) -> None:
    rows = [json.dumps(chat(i)) for i in range(10)]
    rows[2] = '{"messages": [], ' + rows[2][1:]  # duplicate key: the last one wins
    body = "\r\n".join(rows[:5]) + "\r\n\r\n   \r\n" + "\r\n".join(rows[5:]) + "\r\n{oops}\r\n"
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    report = run(path)
    assert report["examples"] == 11 and report["lines"] == 13
    assert set(issues(report)) == {"invalid_json"}
    assert first(report, "invalid_json")["line"] == 13
    assert report["stats"]["valid_examples"] == 10


def test_a_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(1).randbytes(3 * 1024 * 1024))
    report = run(path, max_line_bytes=64 * 1024)
    assert report["verdict"] == "invalid"
    assert report["bytes"] == 3 * 1024 * 1024
    assert "invalid_utf8" in issues(report)
    allowed = {"invalid_utf8", "invalid_json", "line_too_long", "data_type", "too_few_examples"}
    assert set(issues(report)) <= allowed


# --- progress and cancellation -----------------------------------------------------------


def test_progress_is_reported_and_can_cancel(tmp_path: Path) -> None:
    rows = [chat(i, answer="x" * 2000) for i in range(1500)]  # about 3 MB
    path = write(tmp_path, rows)
    calls: list[tuple[int, int]] = []

    def progress(bytes_done: int, lines_done: int) -> bool:
        calls.append((bytes_done, lines_done))
        return True

    report = run(path, progress=progress)
    assert len(calls) >= 3
    assert calls == sorted(calls)
    assert calls[-1] == (path.stat().st_size, 1500) == (report["bytes"], report["lines"])
    seen: list[int] = []

    def cancel(bytes_done: int, lines_done: int) -> bool:
        seen.append(bytes_done)
        return len(seen) < 2

    with pytest.raises(ValidationCancelled):
        validate_file(path, target(), progress=cancel)
    assert len(seen) == 2


# --- catalog, epochs, cost ---------------------------------------------------------------


def test_catalog_resolution() -> None:
    assert model("gpt-4o-mini").id == "gpt-4o-mini-2024-07-18"
    assert model("gpt-4.1").id == "gpt-4.1-2025-04-14"
    assert model("gpt-3.5-turbo").context_limit == 16_385
    assert model("ft:gpt-4o-mini-2024-07-18:acme:support:abc123").id == "gpt-4o-mini-2024-07-18"
    assert model("ft:davinci-002:acme::xyz").kind == "completion"
    assert resolve_model("gpt-5-imaginary") is None
    assert encoding_for_model("o3-mini") == "o200k_base"
    assert encoding_for_model("babbage-002") == "cl100k_base"
    assert {spec.id for spec in known_models()} >= {"gpt-4.1-nano-2025-04-14", "davinci-002"}
    assert all(
        spec.price_date == "2025-06-01" for spec in known_models() if spec.provider == "openai"
    )
    assert "dpo" in model("gpt-4.1-mini").methods and "dpo" not in model("babbage-002").methods


@pytest.mark.parametrize(
    ("examples", "given", "epochs", "source"),
    [
        (3, None, 25, "default_heuristic"),  # ceil(100 / 3) = 34, clamped to 25
        (12, None, 9, "default_heuristic"),  # ceil(100 / 12)
        (34, None, 3, "default_heuristic"),  # 102 >= 100
        (33, None, 4, "default_heuristic"),  # ceil(100 / 33)
        (10_000, None, 2, "default_heuristic"),  # floor(25000 / 10000)
        (30_000, None, 1, "default_heuristic"),  # floor gives 0, clamped to 1
        (12, 5, 5, "given"),
    ],
)
def test_epochs_heuristic(examples: int, given: int | None, epochs: int, source: str) -> None:
    assert epochs_for(examples, given) == (epochs, source)


def test_cost_arithmetic(tmp_path: Path) -> None:
    rows = [chat(i) for i in range(12)]
    path = write(tmp_path, rows)
    report = run(path)
    per_epoch = sum(expected_chat_tokens(r)[0] for r in rows)
    assert report["cost"] == {
        "n_epochs": 9,
        "n_epochs_source": "default_heuristic",
        "billable_tokens": per_epoch * 9,
        "usd": round(per_epoch * 9 * 3.00 / 1e6, 6),
        "usd_per_1m": 3.00,
        "price_date": "2025-06-01",
    }
    given = run(path, target("gpt-4.1", n_epochs=2, price_override_usd_per_1m=10.0))
    assert given["cost"]["n_epochs_source"] == "given"
    assert given["cost"]["usd"] == pytest.approx(per_epoch * 2 * 10.0 / 1e6)
    assert given["cost"]["price_date"] is None
    assert price_for(target("gpt-4.1")) == (25.0, "2025-06-01")
    assert math.isclose(price_for(target("babbage-002"))[0] or 0, 0.40)


# --- memory bounds -----------------------------------------------------------------------


def test_duplicate_detection_is_capped_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "MAX_HASH_ENTRIES", 20)
    rows = [chat(i) for i in range(40)] + [chat(1), chat(35)]
    report = run(write(tmp_path, rows))
    check = report["stats"]["duplicate_check"]
    assert check["complete"] is False and check["max_distinct_examples"] == 20
    assert "only the first 20" in check["note"]
    # line 42 repeats an example seen after the cap: not detected; line 41 is.
    assert [o["line"] for o in issues(report, "warnings")["duplicate_examples"]["occurrences"]] == [
        41
    ]


def test_hash_table_matches_a_set_until_its_cap() -> None:
    rng = np.random.default_rng(3)
    pool = rng.integers(1, 2**63, size=(5000, 2), dtype=np.uint64)
    table = HashTable(100_000, wide=True, value_dtype=np.uint32)
    seen: dict[tuple[int, int], int] = {}
    for batch in range(15):
        picks = rng.integers(0, 5000, size=700)
        keys = pool[picks]
        values = np.full(700, batch + 1, dtype=np.uint32)
        found, stored = table.insert(keys[:, 0].copy(), keys[:, 1].copy(), values)
        for i, key in enumerate(map(tuple, keys.tolist())):
            assert bool(found[i]) == (key in seen)
            if key in seen:
                assert int(stored[i]) == seen[key]
            else:
                seen[key] = batch + 1
    assert table.size == len(seen) and not table.capped


def test_hash_table_finds_every_key_after_growing_past_its_last_slot() -> None:
    # Keys whose home slots are the last ones: when the table grows, they are re-placed from
    # its end around to its start, where later lookups must still find them.
    rng = np.random.default_rng(5)
    table = HashTable(100_000, wide=True, value_dtype=np.uint32)
    seen: dict[tuple[int, int], int] = {}
    for batch in range(12):
        keys = rng.integers(1, 2**63, size=(600, 2), dtype=np.uint64)
        keys[:300, 0] |= np.uint64(0xFFFF)
        if seen:
            keys[-100:] = np.array(list(seen)[-100:], dtype=np.uint64)
        values = np.full(600, batch + 1, dtype=np.uint32)
        found, stored = table.insert(keys[:, 0].copy(), keys[:, 1].copy(), values)
        for i, key in enumerate(map(tuple, keys.tolist())):
            assert bool(found[i]) == (key in seen)
            if found[i]:
                assert int(stored[i]) == seen[key]
            else:
                seen[key] = batch + 1
    assert table.size == len(seen) > 4096  # grew past its initial size at least once
