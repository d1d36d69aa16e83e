"""Evals: creating them (by request, or when a job with `evaluate: true` succeeds), reading
them, cancelling them, and what the evaluator worker (tasks.py) needs: the held-out examples
of a file and the aggregates of the answers.

The examples come from a chat JSONL file: in each line, the last message must be an assistant
message with text content (the expected answer); the messages before it are the prompt. Lines
that are not such an example are skipped and counted (`skipped_lines`): a file made by tunegate's
splits always qualifies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from app.evals import judge as judging
from app.evals import metrics
from app.evals.repository import EvalRepository
from app.evals.schemas import METRICS, EvalCreate
from app.files.service import get_file
from app.inference import service as inference
from app.inference.repository import AliasRepository
from app.kit.errors import BadRequest, Conflict, NotFound
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import Eval, EvalExample, EvalResult, Job
from app.validation.conversions import chat_text
from app.validation.reader import read_lines
from app.validation.stats import MAX_LABEL_CHARS, MAX_LABELS

__all__ = [
    "Example",
    "cancel_eval",
    "create_eval",
    "get_eval",
    "queue_job_eval",
    "read_examples",
    "summarize",
]

EVAL_ID_PREFIX: Final = "eval_"
# Message fields a chat completion request takes (the training-only `weight` is dropped).
_REQUEST_FIELDS: Final = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "function_call"}
)
_FINISHED: Final = frozenset({"succeeded", "failed", "cancelled"})


def _not_found(eval_id: str) -> NotFound:
    return NotFound(f"No eval with id '{eval_id}'.", param="eval_id", code="eval_not_found")


async def _pinned_model(
    session: AsyncSession, configured: set[str], project_id: str, model: str, param: str
) -> str:
    """The model `model` stands for, checked as chat completions would route it for this
    project: itself, or an alias's model now (an eval compares models, not names that may be
    switched while it runs). An alias that splits traffic is refused: name its models."""
    target = model
    if ":" not in model:
        alias = await AliasRepository(session, project_id).get(model)
        if alias is not None:
            if alias.weights and len(alias.weights) > 1:
                raise BadRequest(
                    f"The alias '{model}' splits traffic between {len(alias.weights)} models; "
                    "evaluate them by their own ids.",
                    param=param,
                    code="split_alias",
                )
            target = alias.model
    try:
        await inference.check_target(session, configured, project_id, target)
    except NotFound as exc:
        exc.param = param
        raise
    return target


async def create_eval(
    session: AsyncSession, configured: set[str], project_id: str, body: EvalCreate
) -> Eval:
    targets = {}
    for index, model in enumerate(body.models):
        targets[model] = await _pinned_model(
            session, configured, project_id, model, f"models[{index}]"
        )
    if body.judge is not None:
        judge = body.judge.model
        targets[judge] = await _pinned_model(session, configured, project_id, judge, "judge.model")
    try:
        file = await get_file(session, project_id, body.file)
    except NotFound:
        raise NotFound(f"No such File object: {body.file}", param="file") from None
    # A file whose format was not recognised (a broken line, say) is tried: the evaluator skips
    # what is not an example. Data of another known format needs converting first.
    if file.format not in ("chat", "unknown"):
        raise BadRequest(
            f"File {body.file} is {file.format} data; evals need OpenAI chat JSONL (convert it "
            f"with POST /v1/files/{body.file}/conversions).",
            param="file",
            code="invalid_eval_file",
        )
    row = _queued(body, targets)
    EvalRepository(session, project_id).add(row)
    await session.flush()
    return row


def _queued(body: EvalCreate, targets: dict[str, str], job_id: str | None = None) -> Eval:
    """A new eval of what `body` asks; `targets`: the model each alias stood for."""
    config = body.model_dump(include={"normalize", "judge", "max_examples", "max_tokens"})
    config |= {"metrics": body.metrics or list(METRICS), "temperature": body.temperature}
    # Only aliases are written down: a model id stands for itself.
    config["targets"] = {name: model for name, model in targets.items() if name != model}
    return Eval(
        id=new_id(EVAL_ID_PREFIX),
        name=body.name,
        models=list(body.models),
        file_id=body.file,
        fine_tuning_job_id=job_id,
        config=config,
        status="queued",
        eval_metadata=body.metadata,
        created_at=utcnow(),
    )


async def queue_job_eval(session: AsyncSession, job: Job) -> Eval | None:
    """The eval of a job created with `evaluate: true` that just succeeded: its base model
    against the fine-tuned model on the job's validation file. None when there is nothing to
    compare (no validation file or no model) or it exists already."""
    if not job.evaluate or job.eval_id or not job.validation_file or not job.fine_tuned_model:
        return None
    body = EvalCreate(
        models=[job.model, job.fine_tuned_model],
        file=job.validation_file,
        name=f"{job.id}: base vs fine-tuned",
    )
    row = _queued(body, {}, job.id)
    EvalRepository(session, job.project_id).add(row)
    job.eval_id = row.id
    await session.flush()
    return row


async def get_eval(
    session: AsyncSession, project_id: str, eval_id: str, *, lock: bool = False
) -> Eval:
    row = await EvalRepository(session, project_id).get(eval_id, for_update=lock)
    if row is None:
        raise _not_found(eval_id)
    return row


async def cancel_eval(session: AsyncSession, project_id: str, eval_id: str) -> Eval:
    """A queued eval is cancelled at once; a running one when the evaluator next reports
    progress (within about a second)."""
    row = await get_eval(session, project_id, eval_id, lock=True)
    if row.status in _FINISHED:
        raise Conflict(
            f"The eval is {row.status}; only a queued or running eval can be cancelled.",
            param="eval_id",
            code="eval_finished",
        )
    if row.status == "queued":
        row.status = "cancelled"
        row.finished_at = utcnow()
    else:
        row.cancel_requested = True
    await session.flush()
    return row


async def delete_eval(session: AsyncSession, project_id: str, eval_id: str) -> None:
    row = await get_eval(session, project_id, eval_id, lock=True)
    if row.status not in _FINISHED:
        raise Conflict(
            "The eval is still running; cancel it first.", param="eval_id", code="eval_running"
        )
    if row.fine_tuning_job_id is not None:
        await EvalRepository(session, project_id).unlink_job(row.fine_tuning_job_id, eval_id)
    await session.delete(row)


# -- examples ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    line: int
    prompt: list[dict[str, Any]]
    expected: str


def _example(value: Any, line: int) -> Example | None:
    if not isinstance(value, dict):
        return None
    messages = value.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    expected = chat_text(last.get("content"))
    if expected is None or not all(isinstance(m, dict) for m in messages[:-1]):
        return None
    prompt = [{k: v for k, v in m.items() if k in _REQUEST_FIELDS} for m in messages[:-1]]
    return Example(line, prompt, expected)


def read_examples(path: Path, limit: int, max_line_bytes: int) -> tuple[list[Example], int]:
    """The first `limit` examples of a chat JSONL file, read as the validator reads datasets
    (a byte-order mark dropped, lines numbered as an editor shows them, a line longer than
    `max_line_bytes` never held whole), and how many non-blank lines were skipped (not JSON,
    not an example, too long)."""
    examples: list[Example] = []
    skipped = 0
    with path.open("rb") as handle:
        for chunk in read_lines(handle, max_line_bytes):
            for offset, raw in enumerate(chunk.lines):
                if raw is not None and not raw.strip():
                    continue  # blank
                example = None
                if raw is not None:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        example = _example(orjson.loads(raw), chunk.first_line + offset)
                if example is None:
                    skipped += 1
                    continue
                examples.append(example)
                if len(examples) >= limit:
                    return examples, skipped
    return examples, skipped


def default_max_tokens(expected: Sequence[str]) -> int:
    """Twice the longest expected answer in characters (tokens are fewer), at least 16: an
    answer much longer than the reference cannot be right, and generating it costs time."""
    longest = max((len(text) for text in expected), default=0)
    return min(4096, max(16, 2 * longest))


# -- aggregates ----------------------------------------------------------------------------


def summarize(
    row: Eval, examples: Sequence[EvalExample], results: Sequence[EvalResult], skipped: int
) -> dict[str, Any]:
    """The eval's `results`: aggregates per model, comparisons with the baseline (the first
    model), the judge's rates and a one-line verdict. CPU work: run it in a thread."""
    config = row.config
    normalize = metrics.Normalization(**config.get("normalize", {}))
    wanted = set(config.get("metrics") or METRICS)
    expected = [example.expected for example in examples]
    labels = metrics.detect_labels(expected, normalize)
    json_task = metrics.expects_json(expected)
    by_model: dict[str, dict[int, EvalResult]] = {model: {} for model in row.models}
    for result in results:
        by_model.setdefault(result.model, {})[result.example] = result
    answers = {
        model: [_answer(by_model[model].get(example.example)) for example in examples]
        for model in row.models
    }
    baseline = row.models[0]
    resamples = metrics.Resamples(len(examples))
    comparisons = [
        metrics.compare(
            answers[model], answers[baseline], expected, labels, normalize, json_task, resamples
        )
        for model in row.models[1:]
    ]
    metrics.holm(comparisons)
    primary = metrics.primary_metric(labels, json_task, wanted)
    summary: dict[str, Any] = {
        "examples": len(examples),
        "skipped_lines": skipped,
        "task": "classification" if labels else ("json" if json_task else "free_text"),
        "labels": labels,
        "primary_metric": primary,
        "not_applicable": _not_applicable(wanted, labels, json_task),
        "baseline": baseline,
        "models": {
            model: _wanted(
                metrics.aggregate(
                    answers[model], expected, labels, normalize, json_task, resamples
                ),
                wanted,
            )
            for model in row.models
        },
        "comparisons": [
            {"model": model, "baseline": baseline, "metrics": _wanted(tests, wanted)}
            for model, tests in zip(row.models[1:], comparisons, strict=True)
        ],
        "judge": _judge_summary(row, examples),
    }
    summary["verdict"] = _verdict(summary, primary)
    return summary


def _answer(result: EvalResult | None) -> metrics.Answer:
    if result is None or result.output is None:
        return metrics.Answer(None, False, 0.0, False, None, None, None)
    return metrics.Answer(
        result.output,
        bool(result.exact_match),
        float(result.f1 or 0.0),
        result.valid_json,
        result.latency_ms,
        result.prompt_tokens,
        result.completion_tokens,
    )


def _not_applicable(wanted: set[str], labels: list[str] | None, json_task: bool) -> dict[str, str]:
    """The metrics asked for that these expected answers leave out, each with the reason."""
    reasons = {}
    if "accuracy" in wanted and labels is None:
        reasons["accuracy"] = (
            "the expected answers are not a few labels (at most "
            f"{MAX_LABELS} distinct answers shorter than {MAX_LABEL_CHARS} characters, each "
            "expected at least twice)"
        )
    if "json_valid" in wanted and not json_task:
        reasons["json_valid"] = "not every expected answer is a JSON object or array"
    return reasons


_METRIC_KEYS: Final = {
    "exact_match": ("exact_match",),
    "accuracy": ("accuracy", "per_label", "confusion_matrix"),
    "f1": ("f1",),
    "json_valid": ("json_valid",),
    "latency": ("latency_ms",),
    "tokens": ("tokens",),
}


def _wanted(aggregate: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    dropped = {key for name, keys in _METRIC_KEYS.items() if name not in wanted for key in keys}
    return {key: value for key, value in aggregate.items() if key not in dropped}


def _judge_summary(row: Eval, examples: Sequence[EvalExample]) -> dict[str, Any] | None:
    judge = row.config.get("judge")
    if not judge:
        return None
    comparisons = []
    for model in row.models[1:]:
        outcomes: list[judging.Outcome] = [
            (example.judge or {}).get(model, {}).get("outcome", "invalid") for example in examples
        ]
        comparisons.append(
            {"model": model, "baseline": row.models[0], **judging.summarize(outcomes)}
        )
        valid = sum(outcome != "invalid" for outcome in outcomes)
        wins = sum(outcome == "win" for outcome in outcomes)
        low, high = metrics.wilson(wins, valid)
        comparisons[-1]["win_rate_ci"] = [round(low, 6), round(high, 6)] if valid else None
    return {"model": judge["model"], "rubric": judge["rubric"], "comparisons": comparisons}


# Above this share of failed requests a model's comparison says so: failures score as wrong
# answers, so its numbers describe its availability as much as its answers.
ERROR_RATE_WARNING: Final = 0.05


def _verdict(summary: dict[str, Any], primary: str | None) -> str:
    if primary is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in summary["not_applicable"].items())
        return (
            "No verdict: none of the metrics asked for judges these answers"
            + (f" ({reasons})" if reasons else " (latency and tokens only measure them)")
            + ". Ask for f1 or exact_match, which apply to any answer."
        )
    baseline = summary["baseline"]
    aggregates = summary["models"]
    base_value = aggregates[baseline].get(primary, {}).get("value")
    sentences = []
    for comparison in summary["comparisons"]:
        model = comparison["model"]
        difference = comparison["metrics"].get(primary)
        value = aggregates[model].get(primary, {}).get("value")
        if difference is None or value is None or base_value is None:
            continue
        relation = {
            "better": "is better than",
            "worse": "is worse than",
            "no_significant_difference": "is not significantly different from",
        }[difference["verdict"]]
        sentences.append(
            f"{model} {relation} {baseline} on {primary}: {_shown(value)} vs "
            f"{_shown(base_value)} (difference {_signed(difference['difference'])}, 95 % CI "
            f"{_signed(difference['ci_low'])} to {_signed(difference['ci_high'])}, "
            f"p = {difference['p_value_adjusted']:.3g})."
        )
    for model, aggregate in aggregates.items():
        errors, n = aggregate["errors"], aggregate["examples"]
        if n and errors / n > ERROR_RATE_WARNING:
            sentences.append(
                f"Caution: {model} failed to answer {errors} of {n} examples; failures count "
                "as wrong answers."
            )
    return " ".join(sentences)


def _shown(value: float) -> str:
    return f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"
