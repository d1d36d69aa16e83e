"""The checks that need the whole file, and the report they end up in.

After the last line: too few examples, a format the target does not take, label imbalance;
then the report dict (JSON-serialisable, the shape the API stores and returns).
"""

from __future__ import annotations

from typing import Any, Final

from app.files.formats import DatasetFormat
from app.validation.cost import cost_report
from app.validation.issues import IssueLog, clip
from app.validation.stats import Labels
from app.validation.target import Target

__all__ = [
    "FEW_EXAMPLES",
    "MIN_EXAMPLES",
    "build_report",
    "check_example_count",
    "check_format",
    "check_labels",
    "format_problem",
    "verdict",
]

MIN_EXAMPLES: Final = 10
FEW_EXAMPLES: Final = 50
_MIN_LABELLED: Final = 10
_IMBALANCE_RATIO: Final = 5
_DOMINANT_SHARE: Final = 0.8
CONVERT_HINT: Final = "convert it with POST /v1/files/{id}/conversions"
_NEEDS_CONVERSION: Final = (DatasetFormat.csv, DatasetFormat.gemini, DatasetFormat.vertex_text)


def check_example_count(issues: IssueLog, examples: int) -> None:
    if examples < MIN_EXAMPLES:
        what = "no examples" if not examples else f"only {examples} example(s)"
        issues.add_many(
            "too_few_examples",
            1,
            f"The file has {what}; fine-tuning needs at least {MIN_EXAMPLES} "
            f"({FEW_EXAMPLES} to 100 well-chosen examples usually give clear improvements).",
        )
    elif examples < FEW_EXAMPLES:
        issues.add_many(
            "few_examples",
            1,
            f"The file has {examples} examples; {FEW_EXAMPLES} to 100 are recommended, and "
            "quality usually improves with each doubling.",
        )


def check_format(
    issues: IssueLog, fmt: DatasetFormat | None, first_line: int | None, target: Target
) -> None:
    """`unsupported_format` when the data's format, the model and the method do not match."""
    problem = format_problem(fmt, target)
    if problem is not None:
        occurrences = []
        if first_line is not None:
            occurrences.append({"line": first_line, "path": None, "message": problem})
        issues.add_many("unsupported_format", 1, problem, occurrences)


def format_problem(fmt: DatasetFormat | None, target: Target) -> str | None:
    model = target.model
    if target.method not in model.methods:
        return (
            f"{model.id} does not support the {target.method} method "
            f"(it supports: {', '.join(model.methods)})"
        )
    if fmt is None or fmt is DatasetFormat.unknown:
        return None
    if fmt in _NEEDS_CONVERSION:
        return (
            f"{fmt.value} data cannot be used to fine-tune {model.id} ({model.provider}) as it "
            f"is; {CONVERT_HINT} to OpenAI chat JSONL first"
        )
    if fmt is DatasetFormat.dpo and target.method != "dpo":
        return (
            "DPO data (input, preferred_output, non_preferred_output) trains only with the "
            '"dpo" method; choose method "dpo" or use chat data for supervised fine-tuning'
        )
    if target.method == "dpo" and fmt is not DatasetFormat.dpo:
        return (
            f'the "dpo" method needs DPO data (input, preferred_output, non_preferred_output), '
            f"not {fmt.value} data"
        )
    if fmt is DatasetFormat.chat and model.kind != "chat":
        return (
            f"chat data is accepted only by chat models; {model.id} is a completion model that "
            'takes prompt_completion data ({"prompt": ..., "completion": ...})'
        )
    if fmt is DatasetFormat.prompt_completion and model.kind != "completion":
        return (
            "prompt_completion data is accepted only by the completion models babbage-002 and "
            f"davinci-002, not by {model.id}; {CONVERT_HINT} to chat JSONL for a chat model"
        )
    return None


def check_labels(issues: IssueLog, labels: Labels) -> dict[str, int] | None:
    """Warn when classification answers are strongly imbalanced; the answer distribution."""
    distribution = labels.distribution()
    if distribution is None:
        return None
    n = labels.n
    if n < _MIN_LABELLED:
        return distribution
    ranked = list(distribution.items())
    top_label, top = ranked[0]
    low_label, low = ranked[-1]
    if len(ranked) == 1:
        message = (
            f"Every one of the {n} answers is {clip(top_label)!r}: the model would learn to "
            "always answer that."
        )
    elif top > _IMBALANCE_RATIO * low or top > _DOMINANT_SHARE * n:
        message = (
            f"The answers are {len(ranked)} labels and strongly imbalanced: {clip(top_label)!r} "
            f"has {top} of {n} examples ({100 * top / n:.0f} %), {clip(low_label)!r} only {low}. "
            "Balance the classes, or the model will favour the frequent ones."
        )
    else:
        return distribution
    issues.add_many("label_imbalance", 1, message)
    return distribution


def verdict(issues: IssueLog) -> str:
    if issues.errors():
        return "invalid"
    if issues.warnings():
        return "valid_with_warnings"
    return "valid"


def build_report(
    *,
    issues: IssueLog,
    target: Target,
    fmt: DatasetFormat | None,
    examples: int,
    lines: int,
    size: int,
    stats: dict[str, Any],
    tokens: dict[str, Any],
    priced: bool,
) -> dict[str, Any]:
    return {
        "verdict": verdict(issues),
        "format": (fmt or DatasetFormat.unknown).value,
        "model": target.model.id,
        "method": target.method,
        "examples": examples,
        "errors": issues.errors(),
        "warnings": issues.warnings(),
        "stats": stats,
        "tokens": tokens,
        "cost": cost_report(target, examples, tokens["billable_per_epoch"], priced=priced),
        "lines": lines,
        "bytes": size,
    }
