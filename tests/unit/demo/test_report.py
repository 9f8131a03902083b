"""The demo's comparison: best learning rates, paired differences, frontiers, verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from omotool.demo.pipeline import DemoSettings, _Model
from omotool.demo.report import (
    build_results,
    interval,
    plot_frontiers,
    report_markdown,
    write_demo_report,
)
from omotool.eval.runner import _averages


def evaluation(polite: float, facts: float) -> dict:
    def task(category: str, value: float) -> dict:
        score = {"value": value, "low": value - 0.1, "high": value + 0.1}
        return {"task": "generate", "category": category, "failed": None,
                "scores": {"accuracy": score}}  # fmt: skip

    tasks = {"polite": task("reward", polite), "facts": task("capability", facts)}
    return {"tasks": tasks, "averages": _averages(tasks)}


def model(method: str, lr: float | None = None, seed: int | None = None, alpha=None) -> _Model:
    return _Model(Path(f"/w/{method}-{lr}-{seed}-{alpha}"), "d", method, lr, seed, alpha)


@pytest.fixture
def evaluations() -> list:
    rows = [(model("sft"), evaluation(0.1, 0.8))]
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        rows += [
            (model("adamw", 1e-5, seed), evaluation(0.5 + noise, 0.75)),
            (model("adamw", 5e-5, seed), evaluation(0.9 + noise, 0.4)),
            (model("ondare", 1e-5, seed), evaluation(0.6 + noise, 0.75 + noise)),
            (model("ondare", 5e-5, seed), evaluation(0.2, 0.2)),
            (model("merge", seed=seed, alpha=0.5), evaluation(0.3, 0.75)),
        ]
    return rows


def test_best_learning_rate_differences_and_frontier(evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    assert results["best"]["adamw"]["lr"] == 5e-5  # overall (0.9 + 0.4)/2 beats (0.5 + 0.75)/2
    assert results["best"]["ondare"]["lr"] == 1e-5
    difference = results["differences"]["ondare"]
    assert difference["polite"]["mean"] == pytest.approx(-0.3)
    assert difference["facts"]["mean"] == pytest.approx(0.35)
    # paired by seed: the shared noise cancels in polite, not in facts
    assert difference["polite"]["high"] - difference["polite"]["low"] == pytest.approx(0, abs=1e-9)
    assert difference["facts"]["low"] < 0.35 < difference["facts"]["high"]
    # ondare at 1e-5 (0.75 capability, 0.6 reward) is beyond every AdamW/merge/SFT point
    frontier = results["beyond_adamw_frontier"]["ondare"]
    assert (frontier["beyond"], frontier["points"]) == (1, 2)
    # the frontier runs SFT (0.8, 0.1) – AdamW 1e-5 (0.75, 0.5) – AdamW 5e-5 (0.4, 0.9); the
    # merge (0.75, 0.3) is dominated. At capability 0.75 it holds 0.5: gap 0.1
    assert frontier["gaps"]["1e-05"] == pytest.approx(0.1)
    assert frontier["gaps"]["5e-05"] == pytest.approx(0.2 - 0.9)  # below: its best reward

    tax = results["tax"]["adamw"]["5e-05"]
    assert tax["capability"]["mean"] == pytest.approx(-0.4)
    assert tax["capability"]["high"] < 0
    # the SFT evaluation's intervals are ±0.1: a drop of 0.4 is a tax, of 0.1 is not
    assert results["tax"]["sft_capability_half_width"] == pytest.approx(0.1)
    assert any("5e-05" in v and "a tax beyond" in v for v in results["verdicts"])
    assert any("1e-05" in v and "no tax beyond" in v for v in results["verdicts"])
    assert any(v.startswith("OnDARE (best lr) is better than") for v in results["verdicts"])
    json.dumps(results, allow_nan=False)


def test_interval_is_a_t_interval() -> None:
    entry = interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert entry["mean"] == 2.0 and entry["low"] == pytest.approx(2 - half)
    assert interval([0.5]) == {"mean": 0.5, "low": None, "high": None}


def test_report_files(tmp_path, evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    plot = plot_frontiers(results, tmp_path / "tradeoff.png")
    assert plot is not None and plot.read_bytes()[:4] == b"\x89PNG"
    report = write_demo_report(results, tmp_path, plot, seconds=12.0)
    text = report.read_text()
    assert "| OnDARE | 1e-05 |" in text and "| SFT |" in text and "tradeoff.png" in text
    assert "Run time: 12 s." in text
    assert json.loads((tmp_path / "results.json").read_text())["best"]["adamw"]["lr"] == 5e-5
    one_seed = build_results(DemoSettings(seeds=1), [e for e in evaluations
                                                     if e[0].seed in (None, 0)])  # fmt: skip
    adamw_row = next(
        line for line in report_markdown(one_seed, None, None).splitlines()
        if line.startswith("| AdamW |")
    )  # fmt: skip
    assert "±" not in adamw_row


def test_frontier_is_interpolated_between_pareto_points() -> None:
    from omotool.demo.report import _frontier_reward

    frontier = [(0.4, 0.9), (0.6, 0.5), (0.8, 0.1)]
    assert _frontier_reward(frontier, 0.5) == pytest.approx(0.7)
    assert _frontier_reward(frontier, 0.7) == pytest.approx(0.3)
    assert _frontier_reward(frontier, 0.2) == 0.9
    assert _frontier_reward(frontier, 0.9) == 0.0
