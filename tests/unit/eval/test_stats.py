"""Intervals: against textbook values and by coverage."""

from __future__ import annotations

import math
import random

import pytest

from omotool.eval.stats import mean_interval, proportion_interval


def test_mean_interval_matches_the_formula() -> None:
    values = [1.0, 2.0, 4.0, 7.0]
    estimate = mean_interval(values)
    s = math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3)
    assert estimate.value == 3.5 and estimate.n == 4
    assert estimate.high - 3.5 == pytest.approx(1.959963984540054 * s / 2)
    assert mean_interval([2.0]).low == mean_interval([2.0]).high == 2.0


def test_wilson_interval_known_value_and_edges() -> None:
    # 8 of 10: Wilson 95% interval (0.4902, 0.9433), as in standard tables.
    estimate = proportion_interval(8, 10)
    assert (round(estimate.low, 4), round(estimate.high, 4)) == (0.4902, 0.9433)
    assert proportion_interval(0, 5).low == 0.0 and proportion_interval(5, 5).high == 1.0
    with pytest.raises(ValueError):
        proportion_interval(0, 0)


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    hits = sum(
        (e := mean_interval([rng.gauss(1.0, 2.0) for _ in range(50)])).low <= 1.0 <= e.high
        for _ in range(2000)
    )
    assert 0.93 <= hits / 2000 <= 0.97
