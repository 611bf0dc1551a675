"""Running statistics of predicted values, merged chunk by chunk and run by run (batch scoring's summary)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PredictionStats:
    """Running count, mean, spread and range of predicted values, merged chunk by chunk.

    Chan et al.'s pairwise update of the mean and the sum of squared deviations: exact up to rounding,
    without keeping the values and without the cancellation of a sum-of-squares formula.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        """Merge a chunk's values."""
        values = np.asarray(values, dtype="float64")
        if values.size == 0:
            return
        n, mean = values.size, float(values.mean())
        m2 = float(np.sum((values - mean) ** 2))
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    def merge(self, other: PredictionStats) -> None:
        """Merge another run's statistics (Chan et al.'s pairwise update, as `add` does for a chunk)."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta**2 * self.count * other.count / total
        self.count = total
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def as_dict(self) -> dict[str, float]:
        """`mean`, `std` (population), `min`, `max`; empty when nothing was added."""
        if self.count == 0:
            return {}
        return {"mean": self.mean, "std": (self.m2 / self.count) ** 0.5, "min": self.min, "max": self.max}
