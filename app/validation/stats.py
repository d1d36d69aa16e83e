"""Per-example statistics that stay exact without keeping one number per example.

`Distribution` keeps a histogram (value -> how many examples), so its memory depends on the
number of distinct values (a few thousand token counts in practice), not on the number of
examples, and min/max/mean/median/p5/p95 come out exactly as numpy's default (linear)
percentiles would. `Labels` counts the distinct answers while they are few and short, for the
classification checks.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_LABELS", "MAX_LABEL_CHARS", "Distribution", "Labels"]

MAX_LABELS: Final = 20
MAX_LABEL_CHARS: Final = 50


class Distribution:
    """Exact summary statistics of non-negative integers, fed one by one or in arrays."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.n = 0
        self.total = 0

    def add(self, value: int) -> None:
        self._counts[value] = self._counts.get(value, 0) + 1
        self.n += 1
        self.total += value

    def add_array(self, values: npt.NDArray[np.int64]) -> None:
        if not values.size:
            return
        distinct, counts = np.unique(values, return_counts=True)
        table = self._counts
        for value, count in zip(distinct.tolist(), counts.tolist(), strict=True):
            table[value] = table.get(value, 0) + count
        self.n += int(values.size)
        self.total += int(values.sum())

    def summary(self) -> dict[str, Any] | None:
        """min, max, mean, median, p5, p95; None when empty."""
        if not self.n:
            return None
        values = sorted(self._counts)
        cumulative = np.cumsum([self._counts[v] for v in values])
        return {
            "min": values[0],
            "max": values[-1],
            "mean": round(self.total / self.n, 2),
            "median": self._percentile(values, cumulative, 50),
            "p5": self._percentile(values, cumulative, 5),
            "p95": self._percentile(values, cumulative, 95),
        }

    def _percentile(
        self, values: list[int], cumulative: npt.NDArray[np.int64], q: float
    ) -> float | int:
        # numpy's "linear" method: interpolate between the order statistics around q*(n-1).
        position = q / 100 * (self.n - 1)
        low = int(position)
        fraction = position - low
        low_value = self._order_statistic(values, cumulative, low)
        if fraction == 0:
            return low_value
        high_value = self._order_statistic(values, cumulative, low + 1)
        result = low_value + (high_value - low_value) * fraction
        return int(result) if result == int(result) else round(result, 2)

    @staticmethod
    def _order_statistic(values: list[int], cumulative: npt.NDArray[np.int64], rank: int) -> int:
        """The value at 0-based `rank` in sorted order."""
        return values[int(np.searchsorted(cumulative, rank, side="right"))]


class Labels:
    """Counts of distinct answers, given up (None) past MAX_LABELS or a long answer."""

    def __init__(self) -> None:
        self._counts: dict[str, int] | None = {}
        self.n = 0

    @property
    def active(self) -> bool:
        """False once the answers are known not to be a few labels."""
        return self._counts is not None

    def add(self, answer: str) -> None:
        counts = self._counts
        if counts is None:
            return
        self.n += 1
        if len(answer) >= MAX_LABEL_CHARS:
            self._counts = None
            return
        previous = counts.get(answer)
        if previous is None and len(counts) >= MAX_LABELS:
            self._counts = None
            return
        counts[answer] = (previous or 0) + 1

    def give_up(self) -> None:
        """An answer that is not a plain text (tool calls …): not classification data."""
        self._counts = None

    def distribution(self) -> dict[str, int] | None:
        """Answer -> count, most frequent first; None when the answers are not a few labels."""
        if self._counts is None or not self._counts:
            return None
        return dict(sorted(self._counts.items(), key=lambda item: (-item[1], item[0])))
