"""Training cost: OpenAI's default number of epochs, billable tokens and the price.

OpenAI picks the epochs when none are given: 3, unless that makes fewer than
`MIN_TARGET_EXAMPLES` or more than `MAX_TARGET_EXAMPLES` examples seen in total, clamped to
`MIN_DEFAULT_EPOCHS`..`MAX_DEFAULT_EPOCHS`. Each example is billed for at most the model's
context limit (longer ones are truncated), once per epoch.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

from app.validation.target import Target

__all__ = ["cost_report", "epochs_for", "price_for"]

TARGET_EPOCHS: Final = 3
MIN_TARGET_EXAMPLES: Final = 100
MAX_TARGET_EXAMPLES: Final = 25_000
MIN_DEFAULT_EPOCHS: Final = 1
MAX_DEFAULT_EPOCHS: Final = 25

EpochsSource = Literal["given", "default_heuristic"]


def epochs_for(examples: int, n_epochs: int | None) -> tuple[int, EpochsSource]:
    """The epochs a job will run: `n_epochs` when given, else OpenAI's default heuristic."""
    if n_epochs is not None:
        return n_epochs, "given"
    epochs = TARGET_EPOCHS
    if examples > 0 and examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = math.ceil(MIN_TARGET_EXAMPLES / examples)
    elif examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = MAX_TARGET_EXAMPLES // examples
    return max(MIN_DEFAULT_EPOCHS, min(MAX_DEFAULT_EPOCHS, epochs)), "default_heuristic"


def price_for(target: Target) -> tuple[float | None, str | None]:
    """USD per 1M training tokens and the date the price was taken (None when overridden)."""
    if target.price_override_usd_per_1m is not None:
        return target.price_override_usd_per_1m, None
    return target.model.training_usd_per_1m, target.model.price_date


def cost_report(
    target: Target,
    examples: int,
    billable_per_epoch: int,
    *,
    priced: bool = True,
    usd_digits: int = 6,
) -> dict[str, Any]:
    """The report's `cost` section. `priced` False (tokens were not counted) leaves usd None."""
    epochs, source = epochs_for(examples, target.n_epochs)
    usd_per_1m, price_date = price_for(target)
    billable = billable_per_epoch * epochs
    usd = (
        None if usd_per_1m is None or not priced else round(billable * usd_per_1m / 1e6, usd_digits)
    )
    return {
        "n_epochs": epochs,
        "n_epochs_source": source,
        "billable_tokens": billable,
        "usd": usd,
        "usd_per_1m": usd_per_1m,
        "price_date": price_date,
    }
