"""Point estimates with 95% confidence intervals, for the tables and the trade-off plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class Estimate:
    """``value`` with a 95% interval ``[low, high]`` from ``n`` observations."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def mean_interval(values: Sequence[float]) -> Estimate:
    """Mean ± 1.96·s/√n (normal approximation; s the sample standard deviation)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(variance / n)
    return Estimate(mean, mean - half, mean + half, n)


def proportion_interval(successes: float, n: int) -> Estimate:
    """The fraction ``successes / n`` with a Wilson score interval (sound near 0 and 1).

    ``successes`` may count halves (a tie in a win rate)."""
    if n == 0:
        raise ValueError("no trials")
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)
