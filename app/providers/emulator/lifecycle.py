"""A job's life, computed from the clock: nothing runs in the background.

A job spends `VALIDATING_SECONDS` in `validating_files` (then `failed` if its files are invalid),
`QUEUED_SECONDS` in `queued`, `STEP_SECONDS` per training step in `running`, then `succeeded`.
These are emulated seconds: wall-clock seconds multiplied by the emulator's `speed`, not counting
time spent paused. Every read recomputes status, events, checkpoints and metrics from the job's
creation time, its pauses and its cancellation, so the answer is the same whoever asks and when.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

VALIDATING_SECONDS = 2.0
QUEUED_SECONDS = 2.0
STEP_SECONDS = 0.5

# OpenAI's published heuristic for `n_epochs: "auto"`: aim for 100..25 000 examples seen.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_DEFAULT_EPOCHS = 25


@dataclass(frozen=True)
class JobPlan:
    """The resolved shape of a training run (known once the files are validated)."""

    examples: int
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    tokens_per_epoch: int
    has_validation: bool

    @property
    def total_steps(self) -> int:
        return math.ceil(self.examples * self.n_epochs / self.batch_size)

    @property
    def trained_tokens(self) -> int:
        return self.tokens_per_epoch * self.n_epochs

    @property
    def running_from(self) -> float:
        return VALIDATING_SECONDS + QUEUED_SECONDS

    @property
    def finishes_at(self) -> float:
        return self.running_from + self.total_steps * STEP_SECONDS

    def step_at(self, step: int) -> float:
        return self.running_from + step * STEP_SECONDS

    def checkpoint_steps(self) -> list[int]:
        """One checkpoint at the end of each epoch."""
        steps = (
            math.ceil(self.total_steps * epoch / self.n_epochs)
            for epoch in range(1, 1 + self.n_epochs)
        )
        return sorted(set(steps))


def resolve_plan(
    requested: dict[str, Any],
    *,
    examples: int,
    tokens_per_epoch: int,
    model: str,
    has_validation: bool,
) -> JobPlan:
    """Turn `"auto"` hyperparameters into numbers the way OpenAI does for a file this size."""
    n_epochs = requested.get("n_epochs", "auto")
    if not isinstance(n_epochs, int):
        n_epochs = TARGET_EPOCHS
        if examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
            n_epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // examples)
        elif examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
            n_epochs = max(1, MAX_TARGET_EXAMPLES // examples)
    batch_size = requested.get("batch_size", "auto")
    if not isinstance(batch_size, int):
        batch_size = max(1, min(256, round(examples * 0.002)))
    rate = requested.get("learning_rate_multiplier", "auto")
    if not isinstance(rate, int | float):
        rate = 1.8 if model.startswith(("gpt-4", "o4")) else 2.0
    return JobPlan(
        examples=examples,
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=float(rate),
        tokens_per_epoch=tokens_per_epoch,
        has_validation=has_validation,
    )


@dataclass
class Pause:
    """One pause: wall-clock start and end, and how far the job had got (emulated seconds)."""

    started: float
    progress: float
    ended: float | None = None


@dataclass
class Clock:
    """Maps wall-clock time to a job's progress and back, skipping pauses."""

    created: float
    speed: float
    pauses: list[Pause] = field(default_factory=list)
    stopped: float | None = None
    """Wall time of cancellation: progress freezes there."""

    def progress(self, now: float) -> float:
        end = now if self.stopped is None else min(now, self.stopped)
        active = end - self.created
        for pause in self.pauses:
            if pause.started < end:
                active -= min(pause.ended if pause.ended is not None else end, end) - pause.started
        return max(0.0, active) * self.speed

    def wall_at(self, progress: float) -> float:
        """When (wall clock) the job reached `progress`, paused time included."""
        moment = self.created + progress / self.speed
        for pause in self.pauses:
            if pause.progress < progress and pause.ended is not None:
                moment += pause.ended - pause.started
        return moment

    @property
    def paused(self) -> bool:
        return bool(self.pauses) and self.pauses[-1].ended is None


def stable_id(prefix: str, *parts: object, length: int = 24) -> str:
    """An id that is the same on every read (events and checkpoints are recomputed)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    number = int.from_bytes(digest, "big")
    chars = []
    for _ in range(length):
        number, index = divmod(number, len(alphabet))
        chars.append(alphabet[index])
    return prefix + "".join(chars)


def step_metrics(seed: int, step: int, plan: JobPlan) -> dict[str, float]:
    """Loss falling with a little noise, the same for the same seed and step."""
    noise = random.Random(seed * 1_000_003 + step)
    fraction = step / max(1, plan.total_steps)
    train_loss = max(0.01, 0.12 + 1.9 * math.exp(-4.0 * fraction) + noise.uniform(-0.06, 0.06))
    train_accuracy = min(0.995, max(0.05, 0.98 - 0.3 * train_loss + noise.uniform(-0.02, 0.02)))
    metrics = {
        "step": float(step),
        "train_loss": round(train_loss, 5),
        "train_mean_token_accuracy": round(train_accuracy, 5),
    }
    if plan.has_validation:
        valid_loss = train_loss * 1.08 + 0.04 + noise.uniform(-0.05, 0.05)
        metrics["valid_loss"] = round(max(0.01, valid_loss), 5)
        metrics["valid_mean_token_accuracy"] = round(
            min(0.995, max(0.05, 0.97 - 0.3 * valid_loss)), 5
        )
    return metrics


def result_csv(seed: int, plan: JobPlan) -> bytes:
    """OpenAI's `step_metrics.csv`: one row per step, validation columns empty without one."""
    lines = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
    for step in range(1, plan.total_steps + 1):
        metrics = step_metrics(seed, step, plan)
        valid = (
            f"{metrics['valid_loss']},{metrics['valid_mean_token_accuracy']}"
            if plan.has_validation
            else ","
        )
        lines.append(
            f"{step},{metrics['train_loss']},{metrics['train_mean_token_accuracy']},{valid}"
        )
    return ("\n".join(lines) + "\n").encode()
