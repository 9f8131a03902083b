"""The demo's comparison: choices on validation, test numbers, paired differences, frontiers,
the tax and the verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from omotool.demo.markdown import (
    details_markdown,
    robustness_markdown,
    summary_markdown,
    write_demo_report,
)
from omotool.demo.report import (
    average_half_width,
    build_results,
    frontier_reward,
    interval,
    judge,
    pareto,
    plot_frontiers,
    verdict_words,
)
from omotool.demo.settings import DemoSettings
from omotool.demo.stages import _Model
from omotool.eval.runner import _averages


def evaluation(polite: float, facts: float, half: float = 0.1) -> dict:
    def task(category: str, value: float) -> dict:
        score = {"value": value, "low": value - half, "high": value + half}
        return {"task": "generate", "category": category, "failed": None,
                "scores": {"accuracy": score}}  # fmt: skip

    tasks = {"polite": task("reward", polite), "facts": task("capability", facts)}
    return {"tasks": tasks, "averages": _averages(tasks)}


def splits(polite: float, facts: float, validation: tuple[float, float] | None = None) -> dict:
    """Test scores as given; validation scores the same unless given."""
    return {"validation": evaluation(*(validation or (polite, facts))),
            "test": evaluation(polite, facts)}  # fmt: skip


def model(method: str, seed: int, lr: float | None = None, alpha=None) -> _Model:
    return _Model(Path(f"/w/{method}-{lr}-{seed}-{alpha}"), "d", method, seed, lr, alpha)


@pytest.fixture
def evaluations() -> list:
    rows = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        rows += [
            (model("sft", seed), splits(0.1, 0.8)),
            (model("adamw", seed, 1e-5, 0.0), splits(0.5 + noise, 0.75)),
            (model("adamw", seed, 5e-5, 0.0), splits(0.9 + noise, 0.4)),
            (model("ondare", seed, 1e-5, 1e-3), splits(0.7 + noise, 0.75 + noise)),
            # test says 0.95/0.95, but validation says it is bad: it is not chosen
            (model("ondare", seed, 5e-5, 1e-3), splits(0.95, 0.95, validation=(0.2, 0.2))),
            (model("merge", seed, 5e-5, 0.5), splits(0.3, 0.75)),
        ]
    return rows


def test_choices_are_made_on_validation_and_reported_on_test(evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    assert results["best"]["adamw"]["lr"] == 5e-5  # overall (0.9 + 0.4)/2 beats (0.5 + 0.75)/2
    assert results["best"]["ondare"] == {"lr": 1e-5, "alpha": 1e-3, "setting": "lr 1e-05, α 0.001"}
    difference = results["differences"]["ondare"]
    assert difference["polite"]["mean"] == pytest.approx(-0.2)
    assert difference["facts"]["mean"] == pytest.approx(0.35)
    # paired by seed: the shared noise cancels in polite, not in facts
    assert difference["polite"]["high"] - difference["polite"]["low"] == pytest.approx(0, abs=1e-9)
    assert difference["facts"]["low"] < 0.35 < difference["facts"]["high"]


def test_frontier_gaps_per_seed_and_undefined_beyond_its_capability(evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    entry = results["frontier"]["ondare"]
    # each seed's frontier runs AdamW 5e-5 (0.4, 0.9 + n) – AdamW 1e-5 (0.75, 0.5 + n) – SFT
    # (0.8, 0.1); the merge (0.75, 0.3) is dominated. OnDARE sits at (0.75 + n, 0.7 + n)
    gaps = [0.2, 0.71 - (0.51 - 0.41 * 0.01 / 0.05), 0.69 - (0.49 + 0.4 * 0.01 / 0.35)]
    gap = entry["settings"]["lr 1e-05, α 0.001"]
    assert gap["mean"] == pytest.approx(sum(gaps) / 3)
    assert judge(gap) == 1
    # 0.95 capability lies beyond SFT's 0.8: no AdamW point to compare with
    assert entry["settings"]["lr 5e-05, α 0.001"] is None
    assert (entry["beyond"], entry["behind"], entry["undefined"]) == (1, 0, 1)
    assert entry["chosen"] == "lr 1e-05, α 0.001"
    start = "OnDARE at lr 1e-05, α 0.001 against AdamW's frontier (reward gap"
    assert any(
        v.startswith(start) and ": beyond; of its 2 settings 1 beyond" in v
        for v in results["verdicts"]
    )


def test_tax_at_the_highest_validation_reward(evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    tax = results["tax"]
    assert tax["top_reward_lr"] == "5e-05"
    assert tax["adamw"]["5e-05"]["capability"]["mean"] == pytest.approx(-0.4)
    # two tasks with ±0.1 each: the average's half-width is √(0.1² + 0.1²)/2 per category;
    # the capability category here has one task
    assert tax["sft_capability_half_width"] == pytest.approx(0.1)
    assert tax["verdict"] == "measurable"
    assert results["verdicts"][0].endswith("a measurable tax")


def test_small_drop_is_not_a_measurable_tax() -> None:
    rows = []
    for seed, noise in enumerate((0.0, 0.02, -0.02)):
        rows += [(model("sft", seed), splits(0.1, 0.8)),
                 (model("adamw", seed, 1e-5, 0.0), splits(0.9, 0.75 + noise))]  # fmt: skip
    results = build_results(DemoSettings(seeds=3), rows)
    assert results["tax"]["verdict"] == "not measurable"  # −0.05 is inside the test sets' ±0.1


def test_one_seed_gives_no_verdict(evaluations) -> None:
    one = build_results(DemoSettings(seeds=1), [e for e in evaluations if e[0].seed == 0])
    assert one["tax"]["verdict"] == "not tested"
    assert all("better" not in v and "worse" not in v for v in one["verdicts"])
    assert any(v.startswith("OnDARE (lr 1e-05, α 0.001) against AdamW (lr 5e-05), overall")
               and v.endswith(": not tested (one seed)") for v in one["verdicts"])  # fmt: skip
    assert "±" not in next(line for line in summary_markdown(one).splitlines()
                           if line.startswith("| AdamW |"))  # fmt: skip


def test_average_half_width_of_independent_tasks() -> None:
    tasks = {
        name: {"task": "generate", "category": "capability", "failed": None,
               "scores": {"accuracy": {"value": 0.5, "low": 0.5 - h, "high": 0.5 + h}}}
        for name, h in (("a", 0.3), ("b", 0.4))
    }  # fmt: skip
    assert average_half_width({"tasks": tasks}, "capability") == pytest.approx(0.25)


def test_interval_is_a_t_interval() -> None:
    entry = interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert entry["mean"] == 2.0 and entry["low"] == pytest.approx(2 - half)
    assert interval([0.5]) == {"mean": 0.5, "low": None, "high": None}


def test_frontier_is_interpolated_between_pareto_points() -> None:
    frontier = pareto([(0.4, 0.9), (0.6, 0.5), (0.8, 0.1), (0.5, 0.4)])
    assert frontier == [(0.4, 0.9), (0.6, 0.5), (0.8, 0.1)]
    assert frontier_reward(frontier, 0.5) == pytest.approx(0.7)
    assert frontier_reward(frontier, 0.7) == pytest.approx(0.3)
    assert frontier_reward(frontier, 0.2) == 0.9
    assert frontier_reward(frontier, 0.9) is None


def test_report_files(tmp_path, evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    plot = plot_frontiers(results, tmp_path / "tradeoff.png")
    assert plot is not None and plot.read_bytes()[:4] == b"\x89PNG"
    report = write_demo_report(results, tmp_path, plot)
    text = report.read_text()
    assert "| OnDARE | lr 1e-05, α 0.001 |" in text and "| SFT |" in text
    assert "tradeoff.png" in text and "not comparable" in text
    assert json.loads((tmp_path / "results.json").read_text())["best"]["adamw"]["lr"] == 5e-5
    assert details_markdown(results) in text


def test_robustness_table_compares_verdicts(evaluations) -> None:
    results = build_results(DemoSettings(seeds=3), evaluations)
    shifted = [(m, splits(0.1, 0.8)) if m.method == "ondare" else (m, e) for m, e in evaluations]
    other = build_results(DemoSettings(seeds=3), shifted)
    words = verdict_words(results)
    assert words["AdamW's tax"] == "a measurable tax"
    assert words["OnDARE vs AdamW's frontier"] == "beyond"
    assert verdict_words(other)["OnDARE vs AdamW's frontier"] != "beyond"
    text = robustness_markdown(results, {"same": results, "other": other})
    assert f"{len(words)} of {len(words)} verdicts are the same" not in text
    assert "| AdamW's tax | a measurable tax | a measurable tax | a measurable tax |" in text
    same = robustness_markdown(results, {"same": results})
    assert f"{len(words)} of {len(words)} verdicts are the same in every run." in same


def test_lora_track_pairs_the_merging_adapters_with_full_and_lora_adamw() -> None:
    """The lora track: each adapter against full AdamW (its frontier too), and the merging
    adapters also against LoRA-AdamW, each verdict on an interval over seeds."""
    rows = []
    for seed, noise in enumerate((0.0, 0.01, -0.01, 0.02)):
        rows += [
            (model("sft", seed), splits(0.1, 0.8)),
            (model("adamw", seed, 5e-5, 0.0), splits(0.9 + noise, 0.4)),
            (model("merge", seed, 5e-5, 0.5), splits(0.5, 0.7)),
            (model("lora-adamw", seed, 2e-4, 0.0), splits(0.6 + noise, 0.7)),
            (model("lora-ondare", seed, 2e-4, 1e-3), splits(0.6 + noise, 0.7 + noise)),
            (model("lora-onties", seed, 1e-3, 1e-3), splits(0.8 + noise, 0.75)),
        ]
    results = build_results(DemoSettings(seeds=4, track="lora"), rows)
    assert set(results["best"]) == {"adamw", "lora-adamw", "lora-ondare", "lora-onties"}
    assert set(results["differences"]) == {"lora-adamw", "lora-ondare", "lora-onties"}
    assert set(results["lora_differences"]) == {"lora-ondare", "lora-onties"}
    onties = results["lora_differences"]["lora-onties"]["overall"]
    assert onties["mean"] == pytest.approx(((0.8 + 0.75) - (0.6 + 0.7)) / 2)
    words = verdict_words(results)
    assert words["LoRA-OnTIES vs LoRA-AdamW overall"] == "better"  # the noise is shared
    assert words["LoRA-OnDARE vs LoRA-AdamW overall"] == "not distinguishable"
    assert words["LoRA-AdamW vs AdamW's frontier"] == "beyond"  # above the merge at 0.7
    assert any(v.startswith("LoRA-OnTIES (lr 0.001, α 0.001) against LoRA-AdamW (lr 0.0002)")
               for v in results["verdicts"])  # fmt: skip
    assert "#### Differences against LoRA-AdamW" in details_markdown(results)
    # the other tracks' results keep their keys
    assert "lora_differences" not in build_results(DemoSettings(seeds=4), rows[:3])
