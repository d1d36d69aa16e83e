"""Scoring answers against expected ones, and aggregates with bootstrap confidence intervals.

Per answer: exact match (after the eval's normalisation: trimmed by default, case-folded on
request), token-level F1 (SQuAD's: lower case, punctuation and articles dropped, words split on
white space; each CJK, Thai or other unspaced character is a word of its own, so Chinese
answers are not one giant token), and, when the expected answers are JSON, whether the answer
parses as JSON.

Per model: every rate with a 95 % interval: Wilson's score interval for right/wrong rates
(exact match, accuracy, JSON validity: a percentile bootstrap collapses to a point when every
answer is right) and the percentile bootstrap for F1 (examples resampled with replacement,
`BOOTSTRAP_RESAMPLES` times, from a fixed seed, so one eval always reports the same interval).
Per model compared with the baseline, on the same examples: the difference with its paired
bootstrap interval, and a paired sign-flip permutation test (on right/wrong answers, the
exact McNemar test) whose p-values are adjusted across the models compared (Holm); "better"
means significant at 5 % after that adjustment, not a point estimate that happens to be
higher. When the expected answers are a small
set of labels (classification, e.g. sentiment 1/0) also: accuracy per label and a confusion
matrix (expected label x answered label, anything else answered counting as `(other)`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

from app.validation.stats import MAX_LABEL_CHARS, MAX_LABELS

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
# Classification: as validation reports it (`stats.Labels`), at most MAX_LABELS distinct
# expected answers, each shorter than MAX_LABEL_CHARS; here also each seen at least twice on
# average (else they are free text that happens to be short).

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
    if any(not label or len(label) >= MAX_LABEL_CHARS or "\n" in label for label in labels):
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
        word = ""
        for ch in run:
            if _unspaced(ch):  # one word per character, wherever it stands in the run
                if word:
                    words.append(word)
                    word = ""
                words.append(ch)
            else:
                word += ch
        if word:
            words.append(word)
    return words


def _unspaced(ch: str) -> bool:
    """Scripts written without spaces between words (Han, Kana, Thai, Lao, Khmer, Myanmar)."""
    if ch.isascii():
        return False
    name = unicodedata.name(ch, "")
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
_Z: Final = 1.959963984540054  # the normal quantile of a two-sided 95 % interval


# Resampled index sets are drawn this many at a time: memory stays at a few MB per 10,000
# examples however many resamples there are.
_RESAMPLE_CHUNK: Final = 200


class Resamples:
    """The bootstrap resamples of one eval's examples. Every call draws the same index sets
    (one seed), so a model's and the baseline's resamples are paired, metric by metric."""

    def __init__(self, n: int) -> None:
        self.n = n

    def interval(self, values: Floats) -> tuple[float, float]:
        rng = np.random.default_rng(SEED)
        means = np.concatenate(
            [
                values[rng.integers(0, self.n, size=(_RESAMPLE_CHUNK, self.n))].mean(axis=1)
                for _ in range(BOOTSTRAP_RESAMPLES // _RESAMPLE_CHUNK)
            ]
        )
        tail = (1 - CONFIDENCE) / 2 * 100
        low, high = np.percentile(means, [tail, 100 - tail])
        return float(low), float(high)


def _round(value: float) -> float:
    return round(value, 6)


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson's score interval of a proportion: unlike the bootstrap's, it does not shrink to
    a point when every answer is right (20 of 20 -> [0.84, 1])."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + _Z**2 / (2 * n)
    spread = _Z * np.sqrt(p * (1 - p) / n + _Z**2 / (4 * n * n))
    divisor = 1 + _Z**2 / n
    return max(0.0, (centre - spread) / divisor), min(1.0, (centre + spread) / divisor)


def _estimate(values: Floats, resamples: Resamples, binary: bool) -> dict[str, Any]:
    """A mean with its 95 % interval: Wilson's for right/wrong rates, the percentile
    bootstrap's for graded scores (F1)."""
    if binary:
        low, high = wilson(int(values.sum()), len(values))
        method = "wilson"
    else:
        low, high = resamples.interval(values)
        method = "bootstrap"
    return {
        "value": _round(float(values.mean())),
        "ci_low": _round(low),
        "ci_high": _round(high),
        "ci_method": method,
    }


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
    """One model's scored answer to one example (`output` None: the request failed, which
    scores as a wrong answer)."""

    output: str | None
    exact_match: bool
    f1: float
    valid_json: bool | None
    latency_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None


_BINARY: Final = frozenset({"exact_match", "accuracy", "json_valid"})


def _rates(
    answers: Sequence[Answer],
    expected: Sequence[str],
    labels: list[str] | None,
    normalize: Normalization,
    json_task: bool,
) -> dict[str, Floats]:
    """Per example 1/0 (or F1) arrays of each rate metric; a failed request scores 0."""
    rates = {
        "exact_match": np.asarray([a.exact_match for a in answers], dtype=np.float64),
        "f1": np.asarray([a.f1 for a in answers], dtype=np.float64),
    }
    if json_task:
        rates["json_valid"] = np.asarray([bool(a.valid_json) for a in answers], dtype=np.float64)
    if labels is not None:
        truth = [normalize(text) for text in expected]
        guesses = [predicted_label(a.output, labels, normalize) for a in answers]
        rates["accuracy"] = np.asarray(
            [g == t for g, t in zip(guesses, truth, strict=True)], dtype=np.float64
        )
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
    resamples: Resamples,
) -> dict[str, Any]:
    """One model's aggregates over every example (answers[i] answers expected[i])."""
    result: dict[str, Any] = {
        "examples": len(answers),
        "errors": sum(a.output is None for a in answers),
    }
    for name, values in _rates(answers, expected, labels, normalize, json_task).items():
        result[name] = _estimate(values, resamples, name in _BINARY)
    if labels is not None:
        expected_labels = [normalize(text) for text in expected]
        predicted = [predicted_label(a.output, labels, normalize) for a in answers]
        result["per_label"] = {
            label: _label_accuracy(predicted, expected_labels, label) for label in labels
        }
        columns = [*labels, OTHER_LABEL]
        matrix = [[0] * len(columns) for _ in labels]
        for truth, guess in zip(expected_labels, predicted, strict=True):
            matrix[labels.index(truth)][columns.index(guess)] += 1
        result["confusion_matrix"] = {"labels": labels, "columns": columns, "matrix": matrix}
    answered = [a for a in answers if a.output is not None]
    result["latency_ms"] = _distribution(
        [a.latency_ms for a in answered if a.latency_ms is not None]
    )
    result["tokens"] = {
        "prompt": _distribution([a.prompt_tokens for a in answered if a.prompt_tokens is not None]),
        "completion": _distribution(
            [a.completion_tokens for a in answered if a.completion_tokens is not None]
        ),
    }
    return result


def _label_accuracy(predicted: list[str], expected_labels: list[str], label: str) -> dict[str, Any]:
    n = sum(e == label for e in expected_labels)
    right = sum(p == e == label for p, e in zip(predicted, expected_labels, strict=True))
    low, high = wilson(right, n)
    return {
        "examples": n,
        "correct": right,
        "accuracy": _round(right / n) if n else None,
        "ci_low": _round(low) if n else None,
        "ci_high": _round(high) if n else None,
    }


# Paired sign-flip permutation test: random flips of the per-example differences' signs.
PERMUTATIONS: Final = 10_000
SIGNIFICANCE: Final = 0.05


def paired_p_value(differences: Floats) -> float:
    """Two-sided p-value of "the mean difference is 0" by flipping each example's difference
    at random (exact for the data, no normality assumed; on right/wrong answers it is the
    exact McNemar test: only examples where the models disagree count)."""
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 1.0
    if np.all(np.abs(nonzero) == 1):  # right/wrong answers: the exact sign test (McNemar)
        wins = int((nonzero > 0).sum())
        return _sign_test(min(wins, nonzero.size - wins), nonzero.size)
    observed = abs(float(nonzero.sum())) - 1e-12
    rng = np.random.default_rng(SEED)
    extreme = 0
    for _ in range(PERMUTATIONS // _RESAMPLE_CHUNK):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(_RESAMPLE_CHUNK, nonzero.size))
        extreme += int((np.abs(signs @ nonzero) >= observed).sum())
    return (1 + extreme) / (PERMUTATIONS + 1)


def _sign_test(fewer: int, n: int) -> float:
    """Two-sided exact binomial test of `fewer` successes out of `n` at probability 1/2."""
    # Integers divided, not floats: past 1,024 disagreements 2**n is beyond a float.
    tail: float = sum(math.comb(n, k) for k in range(fewer + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def compare(
    model: Sequence[Answer],
    baseline: Sequence[Answer],
    expected: Sequence[str],
    labels: list[str] | None,
    normalize: Normalization,
    json_task: bool,
    resamples: Resamples,
) -> dict[str, dict[str, Any]]:
    """Per metric: model minus baseline on the same examples, the paired bootstrap interval
    of that difference and the p-value of the paired test. The verdict (`better`, `worse`,
    `no_significant_difference`) is the test's, at 5 %, once `holm` has adjusted the p-values
    for the number of models compared; `compare` fills in the unadjusted one."""
    ours = _rates(model, expected, labels, normalize, json_task)
    theirs = _rates(baseline, expected, labels, normalize, json_task)
    differences: dict[str, dict[str, Any]] = {}
    for name in ours:
        delta = ours[name] - theirs[name]
        low, high = resamples.interval(delta)
        differences[name] = {
            "difference": _round(float(delta.mean())),
            "ci_low": _round(low),
            "ci_high": _round(high),
            "p_value": _round(paired_p_value(delta)),
        }
    return differences


def holm(comparisons: list[dict[str, dict[str, Any]]]) -> None:
    """Adjust each metric's p-values across the models compared with the baseline (Holm's
    step-down method) and set the verdicts from the adjusted values."""
    metrics_seen = {name for comparison in comparisons for name in comparison}
    for name in metrics_seen:
        tests = sorted(
            (c[name] for c in comparisons if name in c), key=lambda test: test["p_value"]
        )
        running = 0.0
        for rank, test in enumerate(tests):
            running = max(running, min(1.0, (len(tests) - rank) * test["p_value"]))
            test["p_value_adjusted"] = _round(running)
            significant = running < SIGNIFICANCE
            test["verdict"] = (
                "no_significant_difference"
                if not significant or test["difference"] == 0
                else ("better" if test["difference"] > 0 else "worse")
            )


def primary_metric(labels: list[str] | None, json_task: bool, wanted: set[str]) -> str | None:
    """What "better" is judged by, among the metrics asked for: accuracy for labels, JSON
    validity for JSON, else F1 (then exact match)."""
    preferred = ["accuracy"] if labels is not None else []
    preferred += ["json_valid"] if json_task else []
    preferred += ["f1", "exact_match"]
    return next((name for name in preferred if name in wanted), None)
