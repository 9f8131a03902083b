"""`omotool train --lora-r R`: a PEFT adapter trained by TRL's real trainers on a tiny Llama,
loadable by PEFT, with and without online merging, and the LoRA options' refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from omotool.errors import InputError, UsageError
from omotool.optim.lora_merging import SHARE
from omotool.train.runner import TrainConfig, run_training

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "omotool.json"}


PREFS = Path(__file__).parents[2] / "recipes" / "data" / "tiny-prefs.jsonl"  # arithmetic pairs


@pytest.fixture
def prefs() -> Path:
    return PREFS


def lora_config(llama_pair, data, out, **options) -> TrainConfig:
    settings = dict(
        model=str(llama_pair[1]), dataset=str(data), out=str(out), lr=1e-2, batch_size=4,
        max_steps=3, max_length=32, merge="none", lora_r=4, lora_alpha=8.0,
    )  # fmt: skip
    return TrainConfig(**(settings | options))


def logits(model, tokens=torch.tensor([[5, 9, 17, 33, 40]])) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_dpo_lora_writes_a_peft_adapter_that_changes_the_model(llama_pair, prefs, tmp_path):
    out = tmp_path / "run"
    result = run_training(lora_config(llama_pair, prefs, out, lora_target_modules="q_proj,v_proj"))
    assert result.steps == 3 and not result.interrupted
    assert {p.name for p in out.iterdir()} >= ADAPTER_FILES
    assert not (out / "model.safetensors").exists()  # an adapter, not a whole model
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and not adapter["use_rslora"]
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    factors = load_file(out / "adapter_model.safetensors")
    assert factors and all(("q_proj" in k or "v_proj" in k) for k in factors)
    # B starts at 0: trained, it is not (the signal that the factors learned).
    lora_b = [v for k, v in factors.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    sft = AutoModelForCausalLM.from_pretrained(str(llama_pair[1]), dtype=torch.float32)
    before = logits(sft)
    tuned = PeftModel.from_pretrained(sft, str(out))
    assert not torch.allclose(logits(tuned), before)
    with tuned.disable_adapter():  # the base under the adapter is --model, untouched
        torch.testing.assert_close(logits(tuned), before)
    assert yaml.safe_load((out / "config.yaml").read_text())["lora_r"] == 4
    metadata = json.loads((out / "omotool.json").read_text())
    assert metadata["config"]["lora_target_modules"] == "q_proj,v_proj"
    assert metadata["model"]["fingerprint"]


@pytest.mark.parametrize("merge", ["none", "ties"])
def test_grpo_lora_all_linear_with_rslora(llama_pair, tmp_path, merge):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"say {i}", "reference": "1"} for i in range(4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grpo"
    options = dict(
        algo="grpo", reward=["exact"], num_generations=2, batch_size=2, max_completion_length=4,
        max_steps=2, max_length=TrainConfig().max_length, use_rslora=True, lora_dropout=0.0,
        merge=merge,
    )  # fmt: skip
    if merge != "none":
        options.update(base=str(llama_pair[0]), reserve_p=0.2, alpha=0.01)
    result = run_training(lora_config(llama_pair, prompts, out, **options))
    assert result.steps == 2
    assert (SHARE in result.metrics) == (merge != "none")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_rslora"] and adapter["lora_dropout"] == 0.0
    names = {k for k in load_file(out / "adapter_model.safetensors")}
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{module}.lora_A" in k for k in names), module  # all-linear: every one
    assert not any("lm_head" in k for k in names)
    sft = AutoModelForCausalLM.from_pretrained(str(llama_pair[1]), dtype=torch.float32)
    PeftModel.from_pretrained(sft, str(out))  # loads


def test_lora_options_on_the_command_line_and_in_recipes(cli, llama_pair, prefs, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"lora-r": 2, "lora-alpha": 4, "lora-target-modules": "q_proj"})
    )
    out = tmp_path / "cli"
    cli(
        "train", "--config", recipe, "--model", llama_pair[1], "--dataset", prefs, "-o", out,
        "--lr", "1e-2", "--batch-size", "4", "--max-steps", "1", "--max-length", "32",
        "--merge", "none", "--lora-alpha", "6", "--json",
    )  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (2, 6.0, ["q_proj"])
    help_text = cli("train", "--help").output
    for name in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules",
                 "--use-rslora", "--load-in-4bit"):  # fmt: skip
        assert name in help_text


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"lora_r": None, "lora_alpha": 16.0}, UsageError, "--lora-alpha 16.0 has no effect"),
        (
            {"lora_r": None, "lora_alpha": 32.0, "use_rslora": True},
            UsageError,
            "--use-rslora has no effect",
        ),
        ({"lora_r": 0}, UsageError, "--lora-r must be at least 1"),
        ({"lora_dropout": 1.0}, UsageError, "--lora-dropout must be in [0, 1)"),
        ({"lora_target_modules": "q_proj,,v_proj"}, UsageError, "--lora-target-modules"),
        ({"merge": "dare", "base": "x", "online_step": 2}, UsageError, "--online-step 2 is not"),
        ({"merge": "ties", "base": "x", "load_in_4bit": True}, UsageError, "--load-in-4bit is not"),
        ({"lora_target_modules": "nope_proj"}, InputError, "has no such module"),
    ],
)
def test_bad_lora_options_are_refused_before_anything_is_written(
    llama_pair, prefs, tmp_path, options, error, words
):
    out = tmp_path / "refused"
    with pytest.raises(error, match=None) as caught:
        run_training(lora_config(llama_pair, prefs, out, **options))
    assert words in str(caught.value)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_load_in_4bit_is_refused_on_cpu(llama_pair, prefs, tmp_path):
    with pytest.raises(UsageError, match="--load-in-4bit .*needs a CUDA GPU"):
        run_training(lora_config(llama_pair, prefs, tmp_path / "q", load_in_4bit=True))
    with pytest.raises(UsageError, match="--load-in-4bit has no effect without --lora-r"):
        off = dict(lora_r=None, lora_alpha=TrainConfig().lora_alpha, load_in_4bit=True)
        run_training(lora_config(llama_pair, prefs, tmp_path / "q", **off))


def test_dare_reserve_1_alpha_0_is_lora_adamw_bit_for_bit(llama_pair, prefs, tmp_path):
    plain = tmp_path / "none"
    run_training(lora_config(llama_pair, prefs, plain, max_steps=2))
    merged = tmp_path / "dare"
    options = dict(merge="dare", base=str(llama_pair[0]), reserve_p=1.0, alpha=0.0, max_steps=2)
    result = run_training(lora_config(llama_pair, prefs, merged, **options))
    assert result.metrics[SHARE] == 1.0  # the correction ran (E = 0: all of nothing kept)
    assert result.metrics["merge/kept_fraction"] == 1.0
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (plain, merged))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("merge", ["ties", "dare"])
def test_online_merging_reaches_the_adapter(llama_pair, prefs, tmp_path, merge):
    out = tmp_path / merge
    options = dict(merge=merge, base=str(llama_pair[0]), reserve_p=0.2, alpha=0.01, max_steps=2)
    result = run_training(lora_config(llama_pair, prefs, out, **options))
    assert 0 < result.metrics[SHARE] < 1  # part of the merge lies outside the tangent space
    assert result.metrics["merge/kept_fraction"] == pytest.approx(0.2, abs=0.03)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if SHARE in r][:2] == [1, 2]
    sft = AutoModelForCausalLM.from_pretrained(str(llama_pair[1]), dtype=torch.float32)
    before = logits(sft)  # (from_pretrained puts the adapter into sft itself)
    assert not torch.allclose(logits(PeftModel.from_pretrained(sft, str(out))), before)


@pytest.mark.slow
def test_lora_merging_resumes_bit_identical(llama_pair, prefs, tmp_path):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted one did: the
    factors' Adam state and the merge's step count (which keys the masks) are restored."""
    import shutil

    options = dict(
        merge="dare", base=str(llama_pair[0]), reserve_p=0.3, alpha=0.01, max_steps=4,
        save_steps=2, lora_dropout=0.0,
    )  # fmt: skip
    whole = tmp_path / "whole"
    run_training(lora_config(llama_pair, prefs, whole, **options))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "adapter_model.safetensors").unlink()
    saved = yaml.safe_load((resumed / "config.yaml").read_text())
    (resumed / "config.yaml").write_text(yaml.safe_dump({**saved, "out": str(resumed)}))
    config = lora_config(llama_pair, prefs, resumed, resume=True, **options)
    assert run_training(config).resumed_from.endswith("checkpoint-2")
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_merging_under_ddp_ranks_agree_and_match_one_process(llama_pair, prefs, tmp_path):
    """2 CPU processes (torchrun, gloo): the ranks' factors end bit-identical (same keyed masks
    on every rank), and as one process with both ranks' batches, to float tolerance."""
    import dataclasses
    import os
    import subprocess
    import sys

    from tests.integration.test_distributed import free_port

    worker = Path(__file__).with_name("train_dist_worker.py")
    options = dict(
        merge="dare", base=str(llama_pair[0]), reserve_p=0.3, alpha=0.01, lora_dropout=0.0,
        lr=1e-3,
    )  # fmt: skip
    config = lora_config(llama_pair, prefs, tmp_path / "ddp", **options)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker),
        str(tmp_path / "config.json"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    factors = [name for name in ranks[0] if "lora_" in name]
    assert factors and all(torch.equal(ranks[0][n], ranks[1][n]) for n in factors)
    one = tmp_path / "one"
    run_training(dataclasses.replace(config, out=str(one), batch_size=8))
    alone = load_file(one / "adapter_model.safetensors")
    for name in factors:
        saved = name.replace(".default", "")  # PEFT files drop the adapter's name
        torch.testing.assert_close(alone[saved], ranks[0][name], rtol=1e-4, atol=1e-6)


def test_an_adapter_as_model_is_refused_with_the_way_round(llama_pair, prefs, tmp_path):
    first = tmp_path / "first"
    run_training(lora_config(llama_pair, prefs, first, max_steps=1))
    with pytest.raises(InputError, match="is a LoRA adapter folder.*merge-offline --sft"):
        run_training(lora_config(llama_pair, prefs, tmp_path / "second", model=str(first)))
    assert not (tmp_path / "second").exists()
