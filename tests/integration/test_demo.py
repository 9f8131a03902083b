"""``omotool demo --fast`` end to end: every stage through the public commands, cached."""

from __future__ import annotations

import json
import shutil

import pytest

from omotool.demo.pipeline import FAST, METHODS, run_demo

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


def test_fast_demo_end_to_end(cli, demo_dir) -> None:
    result = cli("demo", "--fast", "--workdir", str(demo_dir))
    assert "each method at its best learning rate" in result.output
    results = json.loads((demo_dir / "results.json").read_text())
    assert set(results["best"]) == set(METHODS)
    trained = [p for p in results["points"] if p["method"] in METHODS]
    assert len(trained) == sum(len(FAST.grid(m)) for m in METHODS)
    assert {p["method"] for p in results["points"]} == {*METHODS, "sft", "merge"}
    for point in results["points"]:
        for key in ("reward", "capability"):
            assert 0.0 <= point["mean"][key] <= 1.0
    # the stages wrote real outputs of the public commands
    assert (demo_dir / "tau" / "omotool.json").exists()
    run = demo_dir / "runs" / "onties" / f"lr-{FAST.ties_lr_grid[0]:g}" / "seed-0"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("merge/kept_fraction", 0) > 0 for m in metrics)
    assert json.loads((run / "omotool.json").read_text())["config"]["merge"] == "ties"
    assert (demo_dir / "merges" / "seed-0" / "alpha-0.5" / "config.json").exists()
    assert (demo_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    report = (demo_dir / "report.md").read_text()
    assert "| AdamW |" in report and "## What it shows" in report


def test_second_run_is_cached_and_a_broken_stage_is_rebuilt(demo_dir) -> None:
    again = run_demo(demo_dir, FAST)
    assert again.ran == [] and len(again.cached) > 10
    # a stage interrupted while being built has no marker: it is built anew, and what
    # depends on it is re-evaluated (its digest is the same, so the run's key is too)
    stage = demo_dir / "runs" / "adamw" / f"lr-{FAST.lr_grid[0]:g}" / "seed-0"
    (stage / "demo-stage.json").unlink()
    (stage / "model.safetensors").unlink()
    resumed = run_demo(demo_dir, FAST)
    assert resumed.ran == [str(stage.relative_to(demo_dir))]
    assert (stage / "model.safetensors").exists()
    shutil.rmtree(demo_dir / "eval")
    evaluated = [s for s in run_demo(demo_dir, FAST).ran if s.startswith("eval/")]
    trained = sum(len(FAST.grid(m)) for m in METHODS) * FAST.seeds
    assert len(evaluated) == 1 + trained + len(FAST.merge_alphas) * FAST.seeds
