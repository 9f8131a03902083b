"""run_training end to end on a tiny Llama: every algorithm, merges, outputs, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, TrainerCallback

from omotool.delta import DeltaConfig, compute_delta
from omotool.errors import InputError, OutputError, UsageError
from omotool.train.algorithms import Algorithm
from omotool.train.runner import TrainConfig, run_training


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    rows = [
        {"prompt": f"what is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1} !"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(llama_pair, prefs, out, **options) -> TrainConfig:
    """A short run; with ``merge="none"`` the merge options are left out (AdamW refuses them)."""
    base, sft = llama_pair
    settings = dict(
        model=str(sft), dataset=str(prefs), out=str(out), lr=1e-3, batch_size=4, max_steps=3,
        max_length=32,
    )  # fmt: skip
    if options.get("merge") != "none":
        settings.update(base=str(base), reserve_p=0.2, alpha=0.01)
    return TrainConfig(**(settings | options))


def state(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("merge", ["dare", "ties", "none"])
def test_dpo_trains_and_writes_a_loadable_model(llama_pair, prefs, tmp_path, merge) -> None:
    out = tmp_path / "run"
    result = run_training(config(llama_pair, prefs, out, merge=merge))
    assert result.steps == 3 and not result.interrupted
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "merge/kept_fraction"):
        assert key in steps[-1]
    if merge == "dare":
        assert steps[-1]["merge/kept_fraction"] == pytest.approx(0.2, abs=0.02)
    before, after = state(llama_pair[1]), state(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert yaml.safe_load((out / "config.yaml").read_text())["merge"] == merge
    metadata = json.loads((out / "omotool.json").read_text())
    assert metadata["steps"] == 3 and metadata["model"]["fingerprint"]
    assert metadata["optimizer_backend"] == result.optimizer_backend == "cpu"  # auto on CPUs
    assert set(metadata["versions"]) == {"torch", "transformers", "trl", "accelerate"}


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_optimizer_backend_reaches_the_optimizer(llama_pair, prefs, tmp_path, backend) -> None:
    out = tmp_path / backend
    options = dict(merge="ties", max_steps=2, optimizer_backend=backend)
    result = run_training(config(llama_pair, prefs, out, **options))
    assert result.optimizer_backend == backend
    assert json.loads((out / "omotool.json").read_text())["optimizer_backend"] == backend
    assert result.metrics["merge/kept_fraction"] == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("algo", ["ipo", "hinge", "robust", "kto", "simpo", "orpo", "sft"])
def test_every_algorithm_runs_with_online_merging(llama_pair, prefs, tmp_path, algo) -> None:
    out = tmp_path / algo
    smoothing = {"label_smoothing": 0.1} if algo in ("robust", "simpo") else {}
    result = run_training(config(llama_pair, prefs, out, algo=algo, max_steps=2, **smoothing))
    assert result.steps == 2
    assert "merge/kept_fraction" in result.metrics
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("algo", ["dpo", "sft"])
def test_gradient_checkpointing_flag_reaches_the_model(llama_pair, prefs, tmp_path, algo, on):
    """Both ways: TRL's configs turn checkpointing on unless told otherwise."""
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(model.is_gradient_checkpointing)

    options = dict(algo=algo, merge="none", max_steps=1, gradient_checkpointing=on)
    run_training(config(llama_pair, prefs, tmp_path / "run", **options), callbacks=[Probe()])
    assert seen == [on]


@pytest.mark.slow  # a real run, to see --trl reach TRL's trainer and the saved config
def test_trl_fields_reach_the_trainer_and_are_saved(llama_pair, prefs, tmp_path) -> None:
    seen = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append((args.max_grad_norm, args.ld_alpha))

    out = tmp_path / "run"
    trl = {"max_grad_norm": 0.5, "ld_alpha": 0.5}
    run_training(config(llama_pair, prefs, out, merge="none", max_steps=1, trl=trl), [Probe()])
    assert seen == [(0.5, 0.5)]
    assert yaml.safe_load((out / "config.yaml").read_text())["trl"] == trl
    assert json.loads((out / "omotool.json").read_text())["config"]["trl"] == trl


def test_an_option_the_loss_does_not_read_is_refused_before_anything(llama_pair, prefs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="--precompute-ref has no effect with --algo orpo"):
        run_training(config(llama_pair, prefs, out, algo="orpo", precompute_ref=True))
    assert not out.exists()


def test_a_merge_option_adamw_does_not_read_is_refused_before_anything(llama_pair, prefs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="--alpha 0.0 has no effect with --merge none"):
        run_training(config(llama_pair, prefs, out, merge="none", alpha=0.0))
    assert not out.exists()


def test_what_transformers_and_trl_refuse_is_a_user_error(llama_pair, prefs, tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"--model .*not a model transformers can load"):
        run_training(config(llama_pair, prefs, tmp_path / "a", model=str(tmp_path), merge="none"))

    class Refusing:
        def __init__(self, **kwargs):
            raise ValueError("pad token missing")

    monkeypatch.setattr(Algorithm, "trainer_class", lambda self: Refusing)
    with pytest.raises(UsageError, match="TRL's DPOTrainer refuses this run: pad token missing"):
        run_training(config(llama_pair, prefs, tmp_path / "b", merge="none"))


def test_task_vector_from_delta_must_match_the_model(llama_pair, prefs, tmp_path) -> None:
    base, sft = llama_pair
    tau = tmp_path / "tau"
    compute_delta(DeltaConfig(base=str(base), sft=str(sft), out=str(tau)))
    run_training(
        config(llama_pair, prefs, tmp_path / "ok", base=None, task_vector=str(tau), max_steps=1)
    )
    other = tmp_path / "other-tau"
    compute_delta(DeltaConfig(base=str(sft), sft=str(base), out=str(other)))
    with pytest.raises(InputError, match="another SFT model"):
        run_training(config(llama_pair, prefs, tmp_path / "bad", base=None, task_vector=str(other)))


def test_bad_options_and_outputs(llama_pair, prefs, tmp_path) -> None:
    with pytest.raises(UsageError, match="--base BASE"):
        run_training(config(llama_pair, prefs, tmp_path / "a", base=None))
    with pytest.raises(UsageError, match="Did you mean 'dpo'"):
        run_training(config(llama_pair, prefs, tmp_path / "a", algo="dpp"))
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        run_training(config(llama_pair, prefs, out))
    assert (out / "keep.txt").read_text() == "mine"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1: missing field 'rejected'"):
        run_training(config(llama_pair, bad, tmp_path / "b"))


# -- resume and faults -----------------------------------------------------------------------
def long_run(llama_pair, prefs, out, **options) -> TrainConfig:
    """12 steps over 4 epochs of the 12 pairs, a checkpoint every 3 steps."""
    return config(llama_pair, prefs, out, max_steps=12, save_steps=3, merge="dare", **options)


def start_worker(cfg: TrainConfig, tmp_path) -> subprocess.Popen:
    path = tmp_path / f"{Path(cfg.out).name}.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    worker = Path(__file__).with_name("train_worker.py")
    return subprocess.Popen(
        [sys.executable, str(worker), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def assert_same_model(a: Path, b: Path) -> None:
    first, second = state(a), state(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def uninterrupted(llama_pair, prefs, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_training(long_run(llama_pair, prefs, out))
    return out


@pytest.mark.slow  # subprocesses killed and resumed
def test_sigkill_then_resume_is_bit_identical(llama_pair, prefs, tmp_path, uninterrupted) -> None:
    out = tmp_path / "killed"
    cfg = long_run(llama_pair, prefs, out)
    process = start_worker(cfg, tmp_path)
    wait_for(out / "checkpoint-3", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "omotool.json").exists()  # it did not finish
    result = run_training(dataclasses.replace(cfg, resume=True))
    assert result.resumed_from is not None and result.steps == 12
    assert_same_model(out, uninterrupted)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))  # none twice


@pytest.mark.slow  # subprocesses killed and resumed
def test_ctrl_c_saves_a_checkpoint_and_resumes(llama_pair, prefs, tmp_path, uninterrupted) -> None:
    out = tmp_path / "interrupted"
    cfg = long_run(llama_pair, prefs, out, save_total_limit=1)
    process = start_worker(cfg, tmp_path)
    wait_for(out / "checkpoint-3", process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    if report["interrupted"]:  # (the run may have finished before the signal arrived)
        assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{report['steps']}"]
        assert not (out / "omotool.json").exists()
        run_training(dataclasses.replace(cfg, resume=True))
    assert_same_model(out, uninterrupted)


def test_resume_refuses_other_settings_and_empty_folders(
    llama_pair, prefs, tmp_path, uninterrupted
) -> None:
    cfg = long_run(llama_pair, prefs, uninterrupted, resume=True)
    with pytest.raises(UsageError, match=r"lr: 0.001 → 0.002"):
        run_training(dataclasses.replace(cfg, lr=2e-3))
    with pytest.raises(InputError, match="nothing to resume"):
        run_training(dataclasses.replace(cfg, out=str(tmp_path / "empty")))


# -- the command line ------------------------------------------------------------------------
TINY_PREFS = Path(__file__).parents[2] / "recipes" / "data" / "tiny-prefs.jsonl"


def test_train_command_runs_and_reports_json(cli, llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    out = tmp_path / "run"
    result = cli(
        "train", "--algo", "dpo", "--merge", "ties", "--model", sft, "--base", base,
        "--dataset", TINY_PREFS, "-o", out, "--max-steps", "2", "--batch-size", "4",
        "--max-length", "32", "--lr", "1e-3", "--reserve-p", "0.2", "--json",
    )  # fmt: skip
    report = json.loads(result.output)
    assert report["steps"] == 2 and report["interrupted"] is False
    assert "merge/sign_conflict_fraction" in report["metrics"]
    assert (out / "model.safetensors").exists()


def test_recipe_with_set_overrides(cli, llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"algo: ipo\nmerge: dare\nmodel: {sft}\nbase: {base}\ndataset: {TINY_PREFS}\n"
        f"out: {tmp_path / 'run'}\nlr: 5e-7\nmax_steps: 3\nbatch_size: 4\nmax_length: 32\n"
    )
    cli(
        "train",
        "--config",
        recipe,
        "--set",
        "lr=2e-3",
        "--set",
        "max-steps=1",
        "--max-length",
        "48",
    )
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["algo"], saved["lr"], saved["max_steps"], saved["max_length"]) == (
        "ipo",
        2e-3,
        1,
        48,
    )


def test_train_command_bad_input(cli, llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    common = ["--model", sft, "--dataset", TINY_PREFS, "-o", tmp_path / "run", "--max-steps", "1"]
    assert "--base BASE" in cli("train", *common, expect=2).output
    assert "unknown option 'lrr'" in cli("train", *common, "--set", "lrr=1", expect=2).output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TINY_PREFS.read_text().splitlines()[0] + "\n" + '{"prompt": "a"}\n')
    output = cli(
        "train", *common[:2], "--dataset", bad, "-o", tmp_path / "b", "--merge", "none", expect=1
    ).output
    assert "bad.jsonl:2: missing field 'chosen', 'rejected'" in " ".join(output.split())
    assert "Traceback" not in output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    full = ["--model", sft, "--dataset", TINY_PREFS, "-o", tmp_path / "full", "--merge", "none"]
    assert "--overwrite" in cli("train", *full, expect=1).output


def test_long_examples_are_counted(llama_pair, tmp_path) -> None:
    rows = (
        [{"prompt": "what is 1 + 2 ?", "chosen": "3", "rejected": "4"}] * 4
        + [{"prompt": "what is 1 + 2 ?", "chosen": "3 " * 40, "rejected": "4"}] * 3
        + [{"prompt": "what is 1 + 2 ? " * 12, "chosen": "3", "rejected": "4"}] * 2
    )
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_training(config(llama_pair, data, tmp_path / "run", max_length=24, max_steps=1))
    assert (result.examples, result.dropped, result.truncated) == (9, 2, 3)
    metadata = json.loads((tmp_path / "run" / "omotool.json").read_text())
    assert metadata["examples"] == {"read": 9, "dropped": 2, "truncated": 3}


def test_bf16_run_saves_a_bf16_model(llama_pair, prefs, tmp_path) -> None:
    out = tmp_path / "bf16"
    result = run_training(config(llama_pair, prefs, out, bf16=True, max_steps=2))
    assert result.steps == 2
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow  # subprocesses killed and resumed
def test_ctrl_c_on_the_command_line_exits_130_with_a_hint(llama_pair, prefs, tmp_path) -> None:
    base, sft = llama_pair
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "omotool", "train", "--model", str(sft), "--base", str(base),
        "--dataset", str(prefs), "-o", str(out), "--max-steps", "200", "--save-steps", "2",
        "--batch-size", "4", "--max-length", "32", "--lr", "1e-3",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoint-2", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
