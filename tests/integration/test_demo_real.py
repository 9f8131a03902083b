"""``omotool demo --track real`` on SmolLM2-135M-Instruct (``make real-model``), cut to a few
optimizer steps per stage: every stage runs through the commands' code, the facts are what the
base model knew, the report holds the base model, the SFT gate and the perplexity, and a second
run finds every stage cached."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from omotool.demo.pipeline import run_demo
from omotool.demo.real import SKILL
from omotool.demo.settings import GRPO_METHODS, settings_for

pytestmark = [pytest.mark.real, pytest.mark.slow]

TINY = replace(
    settings_for(True, track="real"),
    real_sft_rows=48,
    real_sft_requests=16,
    real_pref_rows=8,
    real_sums_rows=4,
    real_polite_rows=4,
    real_prose=2,
    real_facts=16,
    real_sft_batch=8,
    real_dpo_batch=4,
    real_dpo_epochs=1.0,
)


def test_real_track_end_to_end(real_model: Path, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    first = run_demo(work, TINY, threads=None, model=str(real_model))
    results = first.results
    methods = {p["method"] for p in results["points"]}
    assert methods == {"base", "sft", *GRPO_METHODS, "merge"}
    assert set(results["tasks"]) == {"polite", SKILL, "facts", "prose"}
    assert results["tasks"]["prose"] == "capability"
    points = {p["method"]: p for p in results["points"]}
    # the facts are what the base model answered right before any training
    answers = [json.loads(line) for line in (work / "real" / "facts" / "answers.jsonl").open()]
    assert len(answers) == TINY.real_facts
    assert points["base"]["validation"]["mean"]["facts"] >= 0.75
    # perplexity of real prose: a number, not averaged into capability
    for point in points.values():
        assert point["test"]["mean"]["prose"] > 1.0
    mean = points["sft"]["test"]["mean"]
    assert mean["capability"] == pytest.approx((mean[SKILL] + mean["facts"]) / 2)
    # the gate: base and SFT on the skill, and the verdicts open with it
    gate = results["sft_gate"]
    assert gate["base"] == points["base"]["test"]["mean"][SKILL]
    assert gate["sft"] == mean[SKILL]
    assert results["verdicts"][0].startswith(f"SFT on {SKILL}: test accuracy")
    assert ("SFT taught the skill" in results["verdicts"][0]) == gate["taught"]
    seed = work / "real" / "seed-0"
    for method in GRPO_METHODS:  # every run trained: its metrics hold a step with a loss
        (run,) = (seed / "runs" / method).iterdir()
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in row for row in metrics), method
    assert (seed / "eval" / "base" / "test.json").exists()
    assert (work / "real" / "report.md").read_text().count("| Base model |") == 1
    # a second run: every stage cached, the same numbers
    again = run_demo(work, TINY, threads=None, model=str(real_model))
    assert again.ran == [] and again.results["points"] == results["points"]
