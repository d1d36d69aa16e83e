"""Benchmark: the validation engine against the OpenAI cookbook's data-prep notebook.

    .venv/bin/python bench/validate.py [--mb 100] [--file existing.jsonl] [--keep]

Generates a chat JSONL of `--mb` MB with ../shared/bench/make_chat_dataset.py, then runs, each
in a fresh subprocess so that peak RSS is measured per run (from the child's rusage):

  (a) the baseline: what the cookbook's "Chat_finetuning_data_prep" notebook does, with the
      tokenizer it uses, tiktoken: `json.loads` every line into a list, its seven format
      checks, then for every example the tokens of every message value
      (`encoding.encode(value)` per value, + 3 per message, + 1 per name, + 3 per example),
      as the notebook does the assistant tokens (encoding the assistant contents a second
      time), and the distributions it prints;
  (b) the same notebook with quicktok, an exact o200k tokenizer several times faster than
      tiktoken, in its place: a stronger reference, shown for transparency (the target is
      judged against the notebook as it is, (a));
  (c) `app.validation.engine.validate_file` for gpt-4o-mini;
  (d) the ceiling: quicktok's batch encoder alone on all cores over the message values (but
      roles), extracted beforehand (untimed), in calls of 512 texts. Exact counting with
      quicktok cannot go much faster than this here.

tiktoken would download o200k_base's vocabulary file on first use. This machine has no
network, so the benchmark writes that file beforehand into a temporary TIKTOKEN_CACHE_DIR,
rebuilt from quicktok's bundled copy of the same vocabulary (base64 token, rank, one a line).
tiktoken takes a cached file only when its SHA-256 is the one it expects for o200k_base;
otherwise it deletes it and downloads, which the child refuses to do (it fails instead). So
the baseline runs tiktoken's own, unmodified o200k_base.

Every run loads its tokenizer before the clock starts (a service keeps it loaded; the load
time is printed apart). The benchmark prints the throughputs, the speed-up against (a) and
(b), peak RSS and the token totals, which must be equal in (a), (b) and (c) (exit status 1
otherwise), then the results as one JSON line. This machine's speed drifts by a third from one
minute to the next, so every side runs `--rounds` times (default 3), a round being one run of
each side in turn; the speed-up is the median of the rounds' speed-ups, times are medians, peak
RSS the highest seen. Targets: >= 10x the throughput of (a), peak
RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT.parent / "shared" / "bench" / "make_chat_dataset.py"
RSS_TARGET_MB = 150
SPEEDUP_TARGET = 10
# Where tiktoken fetches o200k_base; its cache file is named by the SHA-1 of this URL.
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
TOTALS = ("total_tokens", "trained_tokens", "billable_per_epoch")
# Texts per call in the ceiling run: the engine's call size, quicktok's fastest here (calls of
# thousands of texts take about 25 % longer: their token ids no longer fit in the CPU's cache).
CEILING_CALL_TEXTS = 512


def write_tiktoken_vocabulary(cache_dir: Path) -> None:
    """o200k_base.tiktoken as tiktoken caches it, rebuilt from quicktok's vocabulary."""
    import quicktok

    encoding = quicktok.get_encoding("o200k_base")
    lines = []
    for rank in range(encoding.n_vocab):
        if encoding.is_special_token(rank):  # tiktoken adds those itself
            continue
        try:
            token = encoding.decode_single_token_bytes(rank)
        except KeyError:  # a rank no token has
            continue
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    name = hashlib.sha1(O200K_URL.encode()).hexdigest()
    (cache_dir / name).write_bytes(b"\n".join(lines) + b"\n")


def load_tiktoken() -> Any:
    import tiktoken
    import tiktoken.load

    def refuse_download(url: str) -> bytes:
        raise SystemExit(
            f"tiktoken did not accept the rebuilt vocabulary (SHA-256 mismatch) and would "
            f"download {url}"
        )

    tiktoken.load.read_file = refuse_download  # reached only when the cached file is rejected
    return tiktoken.get_encoding("o200k_base")


def notebook(path: Path, tokenizer: str) -> dict[str, Any]:
    import numpy as np

    started = time.perf_counter()
    if tokenizer == "tiktoken":
        encoding = load_tiktoken()
    else:
        import quicktok

        encoding = quicktok.get_encoding("o200k_base")
    loaded = time.perf_counter()

    with open(path, encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]

    format_errors: dict[str, int] = defaultdict(int)
    for ex in dataset:
        if not isinstance(ex, dict):
            format_errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] += 1
            if any(
                k not in ("role", "content", "name", "function_call", "weight") for k in message
            ):
                format_errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                format_errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] += 1

    def num_tokens_from_messages(
        messages: list[dict[str, Any]], tokens_per_message: int = 3, tokens_per_name: int = 1
    ) -> int:
        num_tokens = 0
        for message in messages:
            num_tokens += tokens_per_message
            for key, value in message.items():
                num_tokens += len(encoding.encode(value))
                if key == "name":
                    num_tokens += tokens_per_name
        num_tokens += 3
        return num_tokens

    def num_assistant_tokens_from_messages(messages: list[dict[str, Any]]) -> int:
        num_tokens = 0
        for message in messages:
            if message["role"] == "assistant":
                num_tokens += len(encoding.encode(message["content"]))
        return num_tokens

    def distribution(values: list[int]) -> list[float]:
        # What the notebook's print_distribution shows (it prints; this returns).
        return [
            min(values),
            max(values),
            float(np.mean(values)),
            float(np.median(values)),
            float(np.quantile(values, 0.1)),
            float(np.quantile(values, 0.9)),
        ]

    n_missing_system = n_missing_user = 0
    n_messages, convo_lens, assistant_message_lens = [], [], []
    for ex in dataset:
        messages = ex["messages"]
        if not any(message["role"] == "system" for message in messages):
            n_missing_system += 1
        if not any(message["role"] == "user" for message in messages):
            n_missing_user += 1
        n_messages.append(len(messages))
        convo_lens.append(num_tokens_from_messages(messages))
        assistant_message_lens.append(num_assistant_tokens_from_messages(messages))
    distributions = [distribution(v) for v in (n_messages, convo_lens, assistant_message_lens)]
    n_too_long = sum(length > 65_536 for length in convo_lens)
    billing = sum(min(65_536, length) for length in convo_lens)
    finished = time.perf_counter()
    return {
        "seconds": finished - loaded,
        "load_seconds": loaded - started,
        "examples": len(dataset),
        "errors": sum(format_errors.values()),
        "missing_system": n_missing_system,
        "too_long": n_too_long,
        "total_tokens": sum(convo_lens),
        "trained_tokens": sum(assistant_message_lens),
        "billable_per_epoch": billing,
        "distributions": distributions,
    }


def engine(path: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from app.validation.catalog import resolve_model
    from app.validation.engine import Target, validate_file
    from app.validation.tokens import counter_for_encoding

    model = resolve_model("gpt-4o-mini")
    assert model is not None
    started = time.perf_counter()
    counter_for_encoding(model.encoding)
    loaded = time.perf_counter()
    report = validate_file(path, Target(model))
    finished = time.perf_counter()
    return {
        "seconds": finished - loaded,
        "load_seconds": loaded - started,
        "examples": report["examples"],
        "errors": sum(e["count"] for e in report["errors"]),
        "missing_system": next(
            (w["count"] for w in report["warnings"] if w["code"] == "missing_system_message"), 0
        ),
        "verdict": report["verdict"],
        "total_tokens": report["tokens"]["total"],
        "trained_tokens": report["tokens"]["trained"],
        "billable_per_epoch": report["tokens"]["billable_per_epoch"],
    }


def tokenizer_alone(path: Path) -> dict[str, Any]:
    """The ceiling: quicktok's batch encoder on all cores over every message value but the
    roles, the values already extracted (not timed). No exact validator beats this here."""
    import orjson
    import quicktok

    encoding = quicktok.get_encoding("o200k_base")
    with open(path, "rb") as f:
        texts = [
            value
            for line in f
            if line.strip()
            for message in orjson.loads(line)["messages"]
            for key, value in message.items()
            if key != "role" and isinstance(value, str)  # a role's count is a constant
        ]
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), CEILING_CALL_TEXTS):
        _, offsets = encoding.encode_batch(texts[start : start + CEILING_CALL_TEXTS], 0, False)
        tokens += int(offsets[-1])
    return {"seconds": time.perf_counter() - started, "value_tokens": tokens}


CHILDREN = {
    "notebook-tiktoken": lambda path: notebook(path, "tiktoken"),
    "notebook-quicktok": lambda path: notebook(path, "quicktok"),
    "engine": engine,
    "tokenizer": tokenizer_alone,
}


def run_child(kind: str, path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its result plus its own peak RSS (wait4 rusage)."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the {kind} run failed with exit status {child.returncode}")
    result: dict[str, Any] = json.loads(output)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


def round_ratio(sides: dict[str, dict[str, Any]], baseline: str) -> float:
    """validate_file's speed-up against a baseline side within one round."""
    return float(sides[baseline]["seconds"] / sides["ours"]["seconds"])


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side over the rounds: median times, the highest peak RSS, the first run's counts."""
    merged = {**runs[0], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    for key in ("seconds", "load_seconds"):
        if key in merged:
            merged[key] = statistics.median(r[key] for r in runs)
    return merged


def generate(out: Path, mb: float) -> None:
    if not GENERATOR.exists():
        raise SystemExit(
            f"The dataset generator is missing: {GENERATOR} (the shared checkout ../shared). "
            "Pass an existing chat JSONL with --file instead."
        )
    subprocess.run([sys.executable, str(GENERATOR), str(out), "--mb", str(mb)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--file", type=Path, help="use this chat JSONL instead of generating")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run every side this many times; the medians are compared (default 3: this "
        "machine's speed varies by a third from one run to the next)",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, name = args.child
        print(json.dumps(CHILDREN[kind](Path(name))))
        return

    workdir = Path(tempfile.mkdtemp(prefix="tunegate-bench-"))
    path = args.file or workdir / f"chat_{args.mb:g}mb.jsonl"
    try:
        if args.file is None:
            generate(path, args.mb)
        size_mb = path.stat().st_size / 1e6
        print(f"dataset: {path} ({size_mb:.1f} MB)")
        vocabulary = workdir / "tiktoken"
        vocabulary.mkdir()
        write_tiktoken_vocabulary(vocabulary)
        tiktoken_env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(vocabulary)}
        rounds: list[dict[str, dict[str, Any]]] = []
        for number in range(1, args.rounds + 1):
            # The sides of a round run one after the other, so a round's ratio compares runs
            # minutes apart at most; each round starts every side afresh.
            rounds.append(
                {
                    "a": run_child("notebook-tiktoken", path, tiktoken_env),
                    "b": run_child("notebook-quicktok", path),
                    "ours": run_child("engine", path),
                    "ceiling": run_child("tokenizer", path),
                }
            )
            if number == 1:
                print(
                    "tiktoken: o200k_base's vocabulary was rebuilt offline from quicktok's "
                    "bundled copy; tiktoken checked its SHA-256 against its own and loaded it"
                )
            print(
                f"round {number}: speed-up {round_ratio(rounds[-1], 'a'):.1f}x "
                f"(validate_file {rounds[-1]['ours']['seconds']:.2f} s, notebook "
                f"{rounds[-1]['a']['seconds']:.2f} s)"
            )
        base, strong, ours, ceiling = (
            median_run([r[side] for r in rounds]) for side in ("a", "b", "ours", "ceiling")
        )
    finally:
        if args.file is None and args.keep:
            shutil.rmtree(workdir / "tiktoken", ignore_errors=True)
            print(f"kept the dataset: {path}")
        else:
            shutil.rmtree(workdir)

    speed = {name: size_mb / run["seconds"] for name, run in (("a", base), ("b", strong))}
    our_speed = size_mb / ours["seconds"]
    ratios = [round_ratio(r, "a") for r in rounds]
    ratio = statistics.median(ratios)
    ratio_strong = statistics.median(round_ratio(r, "b") for r in rounds)
    print(f"medians of {len(rounds)} round(s):")
    print(f"{'':20}{'notebook':>12}{'notebook':>12}{'validate_file':>16}")
    print(f"{'':20}{'(tiktoken)':>12}{'(quicktok)':>12}{'':>16}")
    runs = (base, strong, ours)
    rows = [
        ("time (s)", [f"{r['seconds']:.2f}" for r in runs]),
        ("tokenizer load (s)", [f"{r['load_seconds']:.2f}" for r in runs]),
        ("throughput (MB/s)", [f"{size_mb / r['seconds']:.1f}" for r in runs]),
        ("peak RSS (MB)", [f"{r['peak_rss_mb']:.0f}" for r in runs]),
        ("examples", [r["examples"] for r in runs]),
        ("total tokens", [r["total_tokens"] for r in runs]),
        ("assistant tokens", [r["trained_tokens"] for r in runs]),
        ("billable / epoch", [r["billable_per_epoch"] for r in runs]),
    ]
    for label, (a, b, c) in rows:
        print(f"{label:20}{a!s:>12}{b!s:>12}{c!s:>16}")
    same = all(
        r["a"][key] == r["b"][key] == r["ours"][key] == base[key] for r in rounds for key in TOTALS
    )
    print(f"token totals equal: {'yes' if same else 'NO'}")
    print(
        f"speed-up against the notebook (tiktoken), the median of the rounds' "
        f"({', '.join(f'{r:.1f}x' for r in ratios)}): {ratio:.1f}x (target >= {SPEEDUP_TARGET}x: "
        f"{'met' if ratio >= SPEEDUP_TARGET else 'not met'}); peak RSS "
        f"{ours['peak_rss_mb']:.0f} MB (target < {RSS_TARGET_MB} MB: "
        f"{'met' if ours['peak_rss_mb'] < RSS_TARGET_MB else 'not met'})"
    )
    print(
        f"speed-up against the notebook with quicktok instead of tiktoken: {ratio_strong:.1f}x "
        "(for transparency; not the target's baseline)"
    )
    ceiling_speed = size_mb / ceiling["seconds"]
    print(
        f"ceiling: quicktok alone on all cores over the pre-extracted values takes "
        f"{ceiling['seconds']:.2f} s ({ceiling_speed:.1f} MB/s, "
        f"{ceiling_speed / speed['a']:.1f}x the notebook); validate_file reaches "
        f"{100 * our_speed / ceiling_speed:.0f} % of it while also parsing and checking"
    )
    summary = {
        "mb": round(size_mb, 1),
        "notebook_tiktoken_mb_s": round(speed["a"], 2),
        "notebook_quicktok_mb_s": round(speed["b"], 2),
        "validate_file_mb_s": round(our_speed, 2),
        "speedup": round(ratio, 2),
        "speedup_rounds": [round(r, 2) for r in ratios],
        "speedup_vs_quicktok_notebook": round(ratio_strong, 2),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "ceiling_mb_s": round(ceiling_speed, 2),
        "token_totals_equal": same,
    }
    print(json.dumps(summary))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
