"""What a file is validated for: the model, the fine-tuning method, epochs and a price override.

Kept apart from the engine so that `cost` (which needs it) and the engine can both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.validation.catalog import ModelSpec

__all__ = ["Method", "Target"]

Method = Literal["supervised", "dpo"]


@dataclass(frozen=True)
class Target:
    """The model and method a file is checked for.

    `n_epochs` None means OpenAI's default heuristic (see `cost.epochs_for`);
    `price_override_usd_per_1m` replaces the catalog's training price.
    """

    model: ModelSpec
    method: Method = "supervised"
    n_epochs: int | None = None
    price_override_usd_per_1m: float | None = None
