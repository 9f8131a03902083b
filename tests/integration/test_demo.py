"""``omotool demo --fast`` end to end: every stage through the public commands, cached, and
deterministic (two runs in fresh folders write the same results)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omotool.demo.markdown import summary_markdown
from omotool.demo.pipeline import run_demo
from omotool.demo.provenance import VOLATILE
from omotool.demo.settings import FAST
from omotool.demo.stages import METHODS, run_name

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One ``omotool demo --fast`` through the command line (each test may use it in any
    order; none changes it)."""
    from typer.testing import CliRunner

    from omotool.cli import app

    folder = tmp_path_factory.mktemp("demo")
    results_file = folder.parent / f"{folder.name}-results.json"
    result = CliRunner().invoke(
        app, ["demo", "--fast", "--workdir", str(folder), "--results", str(results_file)]
    )
    assert result.exit_code == 0, result.output
    return folder, results_file, result.output


def _comparable(results: dict) -> dict:
    results = json.loads(json.dumps(results))
    for key in VOLATILE:
        results["provenance"].pop(key)
    return results


def test_fast_demo_end_to_end(demo_run) -> None:
    folder, results_file, output = demo_run
    results = json.loads((folder / "results.json").read_text())
    assert json.loads(results_file.read_text()) == results
    # the command prints what the README renders from the results file, line for line
    assert summary_markdown(results) in output
    assert set(results["best"]) == set(METHODS)
    trained = [p for p in results["points"] if p["method"] in METHODS]
    assert len(trained) == sum(len(FAST.grid(m)) for m in METHODS)
    assert {p["method"] for p in results["points"]} == {*METHODS, "sft", "merge"}
    for point in results["points"]:
        for split in ("validation", "test"):
            assert 0.0 <= point[split]["mean"]["reward"] <= 1.0
    # one seed: no verdict rests on an interval
    assert results["tax"]["verdict"] == "not tested"
    assert all(" better than " not in v and " worse than " not in v for v in results["verdicts"])
    made = results["provenance"]
    assert made["threads"] == 1 and made["omotool"] and made["cpu"]
    # the stages wrote real outputs of the public commands
    seed = folder / "seed-0"
    assert (seed / "tau" / "omotool.json").exists()
    lr, alpha = FAST.grid("onties")[0]
    run = seed / "runs" / "onties" / run_name(lr, alpha, "onties")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("merge/kept_fraction", 0) > 0 for m in metrics)
    assert json.loads((run / "omotool.json").read_text())["config"]["merge"] == "ties"
    lr, alpha = FAST.grid("ondare")[0]
    ondare = json.loads((seed / "runs" / "ondare" / run_name(lr, alpha, "ondare") /
                         "omotool.json").read_text())  # fmt: skip
    assert ondare["config"]["alpha"] == alpha == FAST.dare_alphas[0]
    assert (seed / "merges" / "alpha-0.5" / "config.json").exists()
    assert (seed / "eval" / "sft" / "validation.json").exists()
    assert (folder / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    report = (folder / "report.md").read_text()
    assert "| AdamW |" in report and "#### Verdicts" in report


def test_fast_demo_is_deterministic(demo_run, tmp_path) -> None:
    folder, _, _ = demo_run
    again = run_demo(tmp_path / "again", FAST)
    first = json.loads((folder / "results.json").read_text())
    assert _comparable(again.results) == _comparable(first)


def test_second_run_is_cached_and_a_broken_stage_is_rebuilt(demo_run, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_run[0], copy)
    again = run_demo(copy, FAST)
    assert again.ran == [] and len(again.cached) > 10
    # a stage interrupted while being built has no marker: it is built anew, and what
    # depends on it is re-evaluated (its digest is the same, so the run's key is too)
    lr, _ = FAST.grid("adamw")[0]
    stage = copy / "seed-0" / "runs" / "adamw" / run_name(lr, 0.0, "adamw")
    (stage / "demo-stage.json").unlink()
    (stage / "model.safetensors").unlink()
    resumed = run_demo(copy, FAST)
    assert resumed.ran == [str(stage.relative_to(copy))]
    assert (stage / "model.safetensors").exists()
    shutil.rmtree(copy / "seed-0" / "eval")
    evaluated = [s for s in run_demo(copy, FAST).ran if "/eval/" in s]
    trained = sum(len(FAST.grid(m)) for m in METHODS)
    assert len(evaluated) == 1 + trained + len(FAST.merge_alphas)


def _run_track(dpo_work: Path, tmp_path: Path, track: str) -> tuple[Path, dict]:
    """``omotool demo --fast --track <track> --results`` in a copy of the DPO track's work
    dir: the copy and the track's results, checked against the results file and the output."""
    from typer.testing import CliRunner

    from omotool.cli import app

    work = tmp_path / "work"
    shutil.copytree(dpo_work, work)
    results_file = tmp_path / f"{track}.json"
    result = CliRunner().invoke(
        app, ["demo", "--fast", "--track", track, "--workdir", str(work), "--results",
              str(results_file)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((work / track / "results.json").read_text())
    assert json.loads(results_file.read_text()) == results
    assert summary_markdown(results) in result.output
    return work, results


def test_fast_grpo_track_builds_its_own_world(demo_run, tmp_path) -> None:
    """``omotool demo --fast --track grpo`` in the DPO track's work dir: its world (more polite
    SFT answers), base, SFT and τ stages go to ``grpo/seed-<s>/``, GRPO runs train with the
    style rule as reward, and the report lands in ``grpo/``, leaving the DPO track's stages and
    results as they were."""
    from omotool.demo.settings import GRPO_METHODS, settings_for

    dpo_results = (demo_run[0] / "results.json").read_text()
    work, results = _run_track(demo_run[0], tmp_path, "grpo")
    assert results["settings"]["track"] == "grpo" and set(results["best"]) == set(GRPO_METHODS)
    grid = settings_for(True, track="grpo")
    trained = [p for p in results["points"] if p["method"] in GRPO_METHODS]
    assert len(trained) == sum(len(grid.grid(m)) for m in GRPO_METHODS)
    assert {p["method"] for p in results["points"]} == {*GRPO_METHODS, "sft", "merge"}
    assert (work / "results.json").read_text() == dpo_results
    seed = work / "grpo" / "seed-0"
    world = json.loads((seed / "world" / "demo-stage.json").read_text())["key"]
    assert world["style_rate"] == grid.grpo_style_rate != grid.style_rate
    lr, alpha = grid.grid("onties")[0]
    run = seed / "grpo" / "runs" / "onties" / run_name(lr, alpha, "onties")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/regex/mean" in m for m in metrics)
    assert any(m.get("merge/kept_fraction", 0) > 0 for m in metrics)
    # a learning signal in every run: most steps hold a group whose rewards differ
    for metrics_file in (seed / "grpo" / "runs").glob("*/*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        spread = [m["frac_reward_zero_std"] < 1 for m in rows if "frac_reward_zero_std" in m]
        assert spread and sum(spread) >= 0.5 * len(spread), (metrics_file, spread)
    config = json.loads((run / "omotool.json").read_text())["config"]
    assert config["algo"] == "grpo" and config["reward_pattern"] == "(glad to help)"
    assert (seed / "grpo" / "merges" / "alpha-0.5" / "config.json").exists()
    assert (seed / "eval" / f"grpo__runs__onties__{run.name}" / "test.json").exists()
    assert (work / "grpo" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    # the dpo track's stages were not rebuilt
    stamp = json.loads((work / "seed-0" / "sft" / "demo-stage.json").read_text())
    assert stamp == json.loads((demo_run[0] / "seed-0" / "sft" / "demo-stage.json").read_text())
    assert (work / "seed-0" / "sft" / "model.safetensors").stat().st_mtime == (
        demo_run[0] / "seed-0" / "sft" / "model.safetensors"
    ).stat().st_mtime


def test_fast_lora_track_trains_adapters_beside_the_dpo_tracks_adamw(demo_run, tmp_path) -> None:
    """``omotool demo --fast --track lora`` in the DPO track's work dir: the shared stages and
    full AdamW's runs and merges come from cache; LoRA-AdamW / -OnDARE / -OnTIES write adapters
    that move the model (their B factors leave zero, the merging ones log the projection),
    and the report lands in ``lora/``."""
    from safetensors.torch import load_file

    from omotool.demo.settings import settings_for
    from omotool.demo.stages import LORA_METHODS

    work, results = _run_track(demo_run[0], tmp_path, "lora")
    methods = {"adamw", *LORA_METHODS}
    assert results["settings"]["track"] == "lora" and set(results["best"]) == methods
    grid = settings_for(True, track="lora")
    trained = [p for p in results["points"] if p["method"] in methods]
    assert len(trained) == sum(len(grid.grid(m)) for m in methods)
    assert set(results["differences"]) == set(LORA_METHODS)
    assert set(results["lora_differences"]) == {"lora-ondare", "lora-onties"}
    assert set(results["frontier"]) == set(LORA_METHODS)
    assert results["tax"]["verdict"] == "not tested"  # one seed: no interval, no verdict
    assert any(v.startswith("LoRA-OnTIES (") and "against LoRA-AdamW" in v
               for v in results["verdicts"])  # fmt: skip
    seed = work / "seed-0"
    for method in LORA_METHODS:
        lr, alpha = grid.grid(method)[-1]
        run = seed / "lora" / "runs" / method / run_name(lr, alpha, method)
        config = json.loads((run / "omotool.json").read_text())["config"]
        assert config["lora_r"] == grid.lora_r and config["merge"] == LORA_METHODS[method]
        weights = load_file(run / "adapter_model.safetensors")
        assert any("lora_B" in name and t.abs().max() > 0 for name, t in weights.items())
        assert not (run / "model.safetensors").exists()  # an adapter, not a whole model
        evaluation = json.loads((seed / "eval" / f"lora__runs__{method}__{run.name}" /
                                 "test.json").read_text())  # fmt: skip
        assert evaluation["models"][0]["averages"]
        if method != "lora-adamw":
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert any("merge/lora_kept_share" in m for m in metrics)
    # full AdamW's runs and merges are the DPO track's, cached
    assert (seed / "runs" / "adamw").exists() and not (seed / "lora" / "runs" / "adamw").exists()
    assert (work / "lora" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
