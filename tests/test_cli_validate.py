"""`tunegate files validate PATH`: the quickest check of a dataset, no server needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.server import server_env, tunegate_command

SEEDS = Path(__file__).parent / "fixtures" / "seeds"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tunegate_command(), "files", "validate", *args],
        env=server_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_valid_file_prints_a_readable_report(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"{i}+{i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(60)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run(tmp_path, str(path), "--model", "gpt-4o-mini")
    assert result.returncode == 0, result.stderr
    assert "valid_with_warnings" in result.stdout  # no system message in these examples
    assert "missing_system_message" in result.stdout
    assert "Tokens:" in result.stdout and "Epochs: 3" in result.stdout


def test_invalid_file_exits_1_and_json_pinpoints_lines(tmp_path: Path) -> None:
    result = run(tmp_path, str(SEEDS / "marv_en.jsonl"), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["verdict"] == "invalid" and report["examples"] == 3
    assert {e["code"] for e in report["errors"]} == {"too_few_examples"}


def test_unknown_model_is_a_clean_error(tmp_path: Path) -> None:
    result = run(tmp_path, str(SEEDS / "marv_en.jsonl"), "--model", "gpt-99")
    assert result.returncode == 2
    assert "gpt-99" in result.stderr and "Traceback" not in result.stderr


def test_text_that_looks_like_markup_is_printed_as_written(tmp_path: Path) -> None:
    # Roles, keys, file names and model names come from users: "[/]" is not a closing tag, and
    # "[bold]" is not a style to apply.
    path = tmp_path / "[bold]data[x].jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    odd = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "[/]", "content": "y"},
            {"role": "assistant", "content": "z", "[bold]k[/bold]": 1},
        ]
    }
    path.write_text("".join(json.dumps(line) + "\n" for line in [good] * 10 + [odd]))
    result = run(tmp_path, str(path), "--model", "gpt-4o-mini")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    text = " ".join(result.stdout.split())  # the table may wrap a long message
    assert "[bold]data[x].jsonl" in text
    assert "'[/]'" in text and "[bold]k[/bold]" in text

    result = run(tmp_path, str(path), "--model", "[/]gpt")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "[/]gpt" in result.stderr
