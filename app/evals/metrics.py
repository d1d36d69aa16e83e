"""Scoring answers against expected ones, and aggregates with bootstrap confidence intervals.

Per answer: exact match (after the eval's normalisation: trimmed by default, case-folded on
request), token-level F1 (SQuAD's: lower case, punctuation and articles dropped, words split on
white space; each CJK, Thai or other unspaced character is a word of its own, so Chinese
answers are not one giant token), and, when the expected answers are JSON, whether the answer
parses as JSON.

Per model: every rate with a 95 % percentile-bootstrap interval (examples resampled with
replacement, `BOOTSTRAP_RESAMPLES` times, from a fixed seed, so one eval always reports the same
interval); per pair of models, the difference on the same examples with a paired bootstrap
interval, so "better" means an interval that excludes 0. When the expected answers are a small
set of labels (classification, e.g. sentiment 1/0) also: accuracy per label and a confusion
matrix (expected label x answered label, anything else answered counting as `(other)`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

__all__ = [
    "OTHER_LABEL",
    "Normalization",
    "Scored",
    "aggregate",
    "compare",
    "detect_labels",
    "expects_json",
    "score",
    "token_f1",
]

BOOTSTRAP_RESAMPLES: Final = 2000
CONFIDENCE: Final = 0.95
SEED: Final = 20261206
OTHER_LABEL: Final = "(other)"
# Classification: at most this many distinct expected answers, each at most this long, and
# each seen at least twice on average (else they are free text that happens to be short).
MAX_LABELS: Final = 20
MAX_LABEL_CHARS: Final = 64

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Normalization:
    trim: bool = True
    ignore_case: bool = False

    def __call__(self, text: str) -> str:
        if self.trim:
            text = text.strip()
        if self.ignore_case:
            text = text.casefold()
        return text


@dataclass(frozen=True)
class Scored:
    exact_match: bool
    f1: float
    valid_json: bool | None


def expects_json(expected: Sequence[str]) -> bool:
    """True when every expected answer is a JSON object or array (a JSON-answer task)."""
    return bool(expected) and all(_json_container(text) for text in expected)


def _json_container(text: str) -> bool:
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return False
    try:
        orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return False
    return True


def detect_labels(expected: Sequence[str], normalize: Normalization) -> list[str] | None:
    """The label set when the expected answers are a few labels (sorted), else None."""
    labels = Counter(normalize(text) for text in expected)
    if not labels or len(labels) > MAX_LABELS or len(expected) < 2 * len(labels):
        return None
    if any(not label or len(label) > MAX_LABEL_CHARS or "\n" in label for label in labels):
        return None
    return sorted(labels)


def score(output: str, expected: str, normalize: Normalization, json_task: bool) -> Scored:
    return Scored(
        exact_match=normalize(output) == normalize(expected),
        f1=token_f1(output, expected),
        valid_json=_json_container(output) if json_task else None,
    )


def _words(text: str) -> list[str]:
    # Punctuation of every script (Unicode categories P*), fullwidth Chinese marks included.
    text = "".join(
        " " if unicodedata.category(ch).startswith("P") else ch for ch in text.casefold()
    )
    text = _ARTICLES.sub(" ", text)
    words: list[str] = []
    for run in _WORD.findall(text):
        if _unspaced(run):
            words.extend(run)  # one word per character
        else:
            words.append(run)
    return words


def _unspaced(run: str) -> bool:
    """Scripts written without spaces between words (Han, Kana, Thai, Lao, Khmer, Myanmar)."""
    first = run[0]
    if first.isascii():
        return False
    name = unicodedata.name(first, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR"))


def token_f1(output: str, expected: str) -> float:
    """SQuAD's token-level F1 of an answer against the expected one."""
    answer, truth = _words(output), _words(expected)
    if not answer or not truth:
        return float(answer == truth)
    common = sum((Counter(answer) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer), common / len(truth)
    return 2 * precision * recall / (precision + recall)


# -- aggregates --------------------------------------------------------------------------------

Floats = npt.NDArray[np.float64]


def _resamples(n: int) -> npt.NDArray[np.intp]:
    """The same resampled index sets for every metric and model of an eval (paired)."""
    rng = np.random.default_rng(SEED)
    return rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def _interval(values: Floats, resamples: npt.NDArray[np.intp]) -> dict[str, float]:
    """Mean of `values` with its percentile-bootstrap interval."""
    means = values[resamples].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {
        "value": _round(float(values.mean())),
        "ci_low": _round(float(low)),
        "ci_high": _round(float(high)),
    }


def _round(value: float) -> float:
    return round(value, 6)


def _distribution(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": _round(float(array.mean())),
        "p50": _round(float(np.percentile(array, 50))),
        "p95": _round(float(np.percentile(array, 95))),
    }


@dataclass(frozen=True)
class Answer:
    """One model's scored answer to one example (None fields: the request failed)."""

    output: str | None
    exact_match: bool
    f1: float
    valid_json: bool | None
    latency_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None


def _rates(answers: Sequence[Answer], json_task: bool) -> dict[str, Floats]:
    """Per example 1/0 (or F1) arrays of each rate metric; a failed request scores 0."""
    rates = {
        "exact_match": np.asarray([a.exact_match for a in answers], dtype=np.float64),
        "f1": np.asarray([a.f1 for a in answers], dtype=np.float64),
    }
    if json_task:
        rates["json_valid"] = np.asarray([bool(a.valid_json) for a in answers], dtype=np.float64)
    return rates


def predicted_label(output: str | None, labels: Sequence[str], normalize: Normalization) -> str:
    if output is None:
        return OTHER_LABEL
    answer = normalize(output)
    return answer if answer in labels else OTHER_LABEL


def aggregate(
    answers: Sequence[Answer],
    expected: Sequence[str],
    labels: list[str] | None,
    normalize: Normalization,
    json_task: bool,
) -> dict[str, Any]:
    """One model's aggregates over every example (answers[i] answers expected[i])."""
    n = len(answers)
    resamples = _resamples(n)
    result: dict[str, Any] = {
        "examples": n,
        "errors": sum(a.output is None for a in answers),
    }
    for name, values in _rates(answers, json_task).items():
        result[name] = _interval(values, resamples)
    if labels is not None:
        expected_labels = [normalize(text) for text in expected]
        predicted = [predicted_label(a.output, labels, normalize) for a in answers]
        correct = np.asarray([p == e for p, e in zip(predicted, expected_labels, strict=True)])
        result["accuracy"] = _interval(correct.astype(np.float64), resamples)
        result["per_label"] = {
            label: _label_accuracy(correct, expected_labels, label) for label in labels
        }
        columns = [*labels, OTHER_LABEL]
        matrix = [[0] * len(columns) for _ in labels]
        for truth, guess in zip(expected_labels, predicted, strict=True):
            matrix[labels.index(truth)][columns.index(guess)] += 1
        result["confusion_matrix"] = {"labels": labels, "columns": columns, "matrix": matrix}
    result["latency_ms"] = _distribution(
        [a.latency_ms for a in answers if a.latency_ms is not None]
    )
    result["tokens"] = {
        "prompt": _distribution([a.prompt_tokens for a in answers if a.prompt_tokens is not None]),
        "completion": _distribution(
            [a.completion_tokens for a in answers if a.completion_tokens is not None]
        ),
    }
    return result


def _label_accuracy(
    correct: npt.NDArray[np.bool_], expected_labels: list[str], label: str
) -> dict[str, Any]:
    mask = np.asarray([e == label for e in expected_labels])
    n = int(mask.sum())
    right = int(correct[mask].sum())
    return {"examples": n, "correct": right, "accuracy": _round(right / n) if n else None}


def compare(
    model: Sequence[Answer],
    baseline: Sequence[Answer],
    expected: Sequence[str],
    labels: list[str] | None,
    normalize: Normalization,
    json_task: bool,
) -> dict[str, dict[str, Any]]:
    """Per metric: model minus baseline on the same examples, with a paired bootstrap interval
    and a verdict (`better`, `worse`, or `no_significant_difference`)."""
    resamples = _resamples(len(expected))
    ours, theirs = _rates(model, json_task), _rates(baseline, json_task)
    if labels is not None:
        truth = [normalize(text) for text in expected]
        for rates, answers in ((ours, model), (theirs, baseline)):
            guesses = [predicted_label(a.output, labels, normalize) for a in answers]
            rates["accuracy"] = np.asarray(
                [g == t for g, t in zip(guesses, truth, strict=True)], dtype=np.float64
            )
    differences: dict[str, dict[str, Any]] = {}
    for name in ours:
        interval = _interval(ours[name] - theirs[name], resamples)
        verdict = "no_significant_difference"
        if interval["ci_low"] > 0:
            verdict = "better"
        elif interval["ci_high"] < 0:
            verdict = "worse"
        differences[name] = {"difference": interval["value"], **_ci(interval), "verdict": verdict}
    return differences


def _ci(interval: dict[str, float]) -> dict[str, float]:
    return {"ci_low": interval["ci_low"], "ci_high": interval["ci_high"]}


def primary_metric(labels: list[str] | None, json_task: bool) -> str:
    """What "better" is judged by: accuracy for labels, JSON validity for JSON, else F1."""
    if labels is not None:
        return "accuracy"
    return "json_valid" if json_task else "f1"
