"""The judge: a model that compares two answers to the same prompt by the user's rubric.

Each comparison is asked twice, the answers in both orders (A = baseline then A = the model),
because judges favour a position; the model wins only when the judge prefers it both times,
loses only when it prefers the baseline both times, and anything else (a tie, or a verdict that
follows the position) is a tie. A reply that names no verdict is `invalid` and left out of the
rates.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Final, Literal

__all__ = ["Outcome", "Verdict", "judge_messages", "outcome", "parse_verdict", "summarize"]

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss", "invalid"]

_SYSTEM: Final = (
    "You are an impartial judge of answers to the same prompt. Compare Answer A and Answer B "
    "by this rubric:\n{rubric}\n\nA reference answer may be given; use it as a guide, not as "
    "the only acceptable answer. Ignore the order in which the answers are shown and their "
    "length unless the rubric asks for it. Reply with exactly one word: A if Answer A is "
    "better, B if Answer B is better, or tie."
)
_WORD: Final = re.compile(r"[A-Za-z]+")
# Words a judge may put before its verdict ("Answer: B", "Verdict - tie", "The winner is A").
_PREAMBLE: Final = frozenset({"answer", "verdict", "winner", "the", "is", "final", "better"})
_VERDICTS: Final[dict[str, Verdict]] = {"a": "A", "b": "B", "tie": "tie", "draw": "tie"}


def _transcript(prompt: list[dict[str, Any]]) -> str:
    lines = []
    for message in prompt:
        content = message.get("content")
        text = content if isinstance(content, str) else str(content)
        lines.append(f"{message.get('role', 'user')}: {text}")
    return "\n".join(lines)


def judge_messages(
    rubric: str, prompt: list[dict[str, Any]], reference: str, first: str, second: str
) -> list[dict[str, str]]:
    """The judge's chat: the rubric as system message; prompt, reference and both answers."""
    user = (
        f"Prompt:\n{_transcript(prompt)}\n\nReference answer:\n{reference}\n\n"
        f"Answer A:\n{first}\n\nAnswer B:\n{second}\n\nWhich answer is better: A, B or tie?"
    )
    return [
        {"role": "system", "content": _SYSTEM.format(rubric=rubric)},
        {"role": "user", "content": user},
    ]


def parse_verdict(reply: str | None) -> Verdict | None:
    """The verdict at the start of the judge's reply, or None when it names none."""
    words = [word.lower() for word in _WORD.findall(reply or "")[:8]]
    if any(word in ("tie", "draw") for word in words[:3]):
        return "tie"  # "A tie.", "It's a tie"
    for word in words:
        if word not in _PREAMBLE:
            return _VERDICTS.get(word)
    return None


def outcome(baseline_first: Verdict | None, model_first: Verdict | None) -> Outcome:
    """The model's outcome against the baseline from the two orders: `baseline_first` is the
    verdict with the baseline as A, `model_first` with the model as A."""
    if baseline_first is None or model_first is None:
        return "invalid"
    model_wins = (baseline_first == "B", model_first == "A")
    baseline_wins = (baseline_first == "A", model_first == "B")
    if all(model_wins):
        return "win"
    if all(baseline_wins):
        return "loss"
    return "tie"


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts, and rates over the valid comparisons."""
    counts = Counter(outcomes)
    valid = counts["win"] + counts["tie"] + counts["loss"]

    def rate(name: Outcome) -> float | None:
        return round(counts[name] / valid, 6) if valid else None

    return {
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "invalid": counts["invalid"],
        "win_rate": rate("win"),
        "tie_rate": rate("tie"),
        "loss_rate": rate("loss"),
    }
