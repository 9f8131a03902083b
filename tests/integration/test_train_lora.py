"""`omotool train --lora-r R`: a PEFT adapter trained by TRL's real trainers on a tiny Llama,
loadable by PEFT, with and without online merging, and the LoRA options' refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from omotool.errors import InputError, UsageError
from omotool.optim.lora_merging import SHARE
from omotool.train.runner import TrainConfig, run_training
from tests.conftest import tiny_logits as logits

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


def interrupted_copy(run: Path, copy: Path, last_checkpoint: str) -> Path:
    """``run`` copied to ``copy`` as if stopped before ``last_checkpoint`` and the end."""
    import shutil

    shutil.copytree(run, copy)
    shutil.rmtree(copy / last_checkpoint)
    (copy / "adapter_model.safetensors").unlink()
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**saved, "out": str(copy)}))
    return copy


@pytest.mark.slow
def test_lora_merging_resumes_bit_identical(llama_pair, prefs, tmp_path):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted one did: the
    factors' Adam state and the merge's step count (which keys the masks) are restored."""
    options = dict(
        merge="dare", base=str(llama_pair[0]), reserve_p=0.3, alpha=0.01, max_steps=4,
        save_steps=2, lora_dropout=0.0,
    )  # fmt: skip
    whole = tmp_path / "whole"
    run_training(lora_config(llama_pair, prefs, whole, **options))
    resumed = interrupted_copy(whole, tmp_path / "resumed", "checkpoint-4")
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


def test_an_adapter_as_model_without_lora_r_is_refused_with_the_way_round(
    llama_pair, prefs, tmp_path
):
    first = tmp_path / "first"
    run_training(lora_config(llama_pair, prefs, first, max_steps=1))
    with pytest.raises(UsageError, match="is a LoRA adapter folder.*merge-offline --sft"):
        run_training(lora_config(llama_pair, prefs, tmp_path / "second", model=str(first),
                                 lora_r=None, lora_alpha=TrainConfig().lora_alpha))  # fmt: skip
    assert not (tmp_path / "second").exists()


# -- an SFT adapter as --model: trained further, τ = s·B·A from it, the reference is it -------
@pytest.fixture
def sft_adapter(llama_pair, tmp_path):
    """An SFT adapter (rank 2, q_proj and v_proj) over the tiny base, B away from 0."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(llama_pair[0]), dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    folder = tmp_path / "sft-adapter"
    model.save_pretrained(str(folder))
    return folder


def sft_policy(llama_pair, adapter) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(str(llama_pair[0]), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


class Watch(TrainerCallback):
    """A trainer callback keeping the policy's logits at the end and its reference adapter's
    logits at the start and the end of training."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def _look(self, model, when: str) -> None:
        from trl.trainer.utils import use_adapter

        training = model.training
        model.eval()
        self.seen[f"ref_adapters_{when}"] = sorted(model.peft_config)
        with use_adapter(model, "ref"):
            self.seen[f"ref_{when}"] = logits(model)
        if when == "end":
            self.seen["policy"] = logits(model)
        model.train(training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._look(model, "begin")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._look(model, "end")


@pytest.mark.parametrize("merge", ["none", "ties"])
def test_dpo_continues_an_sft_adapter_against_it(llama_pair, prefs, sft_adapter, tmp_path, merge):
    """--model an SFT adapter: the run trains that adapter further over its base (τ from its
    factors, no --base), the DPO reference is the SFT policy (base + SFT adapter) all along,
    and the written adapter loads over the base as the trained policy."""
    out = tmp_path / "continued"
    options = dict(
        model=str(sft_adapter), lora_r=2, lora_alpha=4.0, lora_dropout=0.0, merge=merge,
        max_steps=2, logging_steps=1,
    )  # fmt: skip
    if merge != "none":
        options.update(reserve_p=0.3, alpha=0.01)
    watch = Watch()
    result = run_training(lora_config(llama_pair, prefs, out, **options), callbacks=[watch])
    assert result.steps == 2 and (SHARE in result.metrics) == (merge != "none")
    sft = logits(sft_policy(llama_pair, sft_adapter))
    assert watch.seen["ref_adapters_begin"] == ["default", "ref"]
    torch.testing.assert_close(watch.seen["ref_begin"], sft)  # the reference is the SFT policy
    torch.testing.assert_close(watch.seen["ref_end"], sft)  # and stays it (frozen)
    # Step 1's forward pass sees policy = reference: DPO's implicit rewards are exactly 0.
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)  # ln 2
    # The output: the SFT adapter trained further, over the same base, loadable by PEFT.
    written = json.loads((out / "adapter_config.json").read_text())
    saved = json.loads((sft_adapter / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(llama_pair[0])
    assert (written["r"], written["lora_alpha"]) == (saved["r"], saved["lora_alpha"])
    assert sorted(written["target_modules"]) == sorted(saved["target_modules"])
    assert not (out / "ref").exists()  # only the trained adapter is written
    factors = load_file(out / "adapter_model.safetensors")
    assert factors.keys() == load_file(sft_adapter / "adapter_model.safetensors").keys()
    trained = logits(sft_policy(llama_pair, out))
    torch.testing.assert_close(trained, watch.seen["policy"])
    assert not torch.allclose(trained, sft)
    metadata = json.loads((out / "omotool.json").read_text())
    assert metadata["model"]["path"] == str(sft_adapter.absolute())


def test_a_task_vector_of_the_adapter_is_taken(llama_pair, prefs, sft_adapter, tmp_path):
    """`omotool delta BASE ADAPTER` then --task-vector: its SFT fingerprint is the adapter's."""
    from omotool.delta import DeltaConfig, compute_delta

    compute_delta(
        DeltaConfig(base=str(llama_pair[0]), sft=str(sft_adapter), out=str(tmp_path / "t"))
    )
    options = dict(
        model=str(sft_adapter), lora_r=2, lora_alpha=TrainConfig().lora_alpha, merge="dare",
        task_vector=str(tmp_path / "t"), reserve_p=0.5, max_steps=1,
    )  # fmt: skip
    assert run_training(lora_config(llama_pair, prefs, tmp_path / "run", **options)).steps == 1
    compute_delta(
        DeltaConfig(base=str(llama_pair[0]), sft=str(llama_pair[1]), out=str(tmp_path / "u"))
    )
    options["task_vector"] = str(tmp_path / "u")  # the SFT model's τ, not the adapter's
    with pytest.raises(InputError, match="computed for another SFT model"):
        run_training(lora_config(llama_pair, prefs, tmp_path / "no", **options))
    assert not (tmp_path / "no").exists()


def adapter_without_base(adapter: Path, tmp_path: Path) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")})
    )
    return adapter


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"lora_r": 4}, UsageError, "--lora-r 4: --model .* is a LoRA adapter with --lora-r 2"),
        ({"lora_alpha": 8.0}, UsageError, "--lora-alpha 8.0: .* with --lora-alpha 4"),
        (
            {"lora_target_modules": "q_proj"},
            UsageError,
            "--lora-target-modules q_proj: .*q_proj,v_proj",
        ),
        ({"use_rslora": True}, UsageError, "--use-rslora True: .*--use-rslora False"),
        ({"merge": "ties", "base": "SFT"}, InputError, "--base .* is not the base of the adapter"),
        (
            {"merge": "ties", "base_gone": True},
            InputError,
            "its base model .*gone.* cannot be found",
        ),
    ],
)
def test_bad_sft_adapter_runs_are_refused_before_anything_is_written(
    llama_pair, prefs, sft_adapter, tmp_path, options, error, words
):
    options = dict(options)
    if options.pop("base_gone", False):
        adapter_without_base(sft_adapter, tmp_path)
    if options.get("base") == "SFT":  # another model than the adapter's base
        options["base"] = str(llama_pair[1])
    out = tmp_path / "refused"
    default_alpha = TrainConfig().lora_alpha  # left at its default: the adapter's own
    settings = dict(lora_r=2, lora_alpha=default_alpha, model=str(sft_adapter), max_steps=1)
    settings |= options
    with pytest.raises(error) as caught:
        run_training(lora_config(llama_pair, prefs, out, **settings))
    assert re.search(words, str(caught.value)), str(caught.value)
    assert not out.exists()


def test_refusals_exit_1_or_2_on_the_command_line(cli, llama_pair, prefs, sft_adapter, tmp_path):
    common = ["--dataset", prefs, "--max-steps", "1", "--merge", "none"]
    cases = [
        (["--model", llama_pair[1], "--lora-r", "0"], 2),
        (["--model", llama_pair[1], "--lora-r", "2", "--lora-target-modules", "nope_proj"], 1),
        (["--model", adapter_without_base(sft_adapter, tmp_path), "--lora-r", "2"], 1),
    ]
    for arguments, code in cases:
        out = tmp_path / f"out{code}"
        done = cli("train", *arguments, *common, "-o", out, expect=code)
        assert done.exit_code == code and not out.exists()


@pytest.mark.slow
def test_a_continued_sft_adapter_resumes_bit_identical(llama_pair, prefs, sft_adapter, tmp_path):
    """Resumed from its step-1 checkpoint, a run that continues an SFT adapter ends where the
    uninterrupted one did: the trained adapter comes from the checkpoint, the reference copy
    is the SFT adapter again (made from --model, not from the checkpoint)."""
    options = dict(
        model=str(sft_adapter), lora_r=2, lora_alpha=4.0, lora_dropout=0.0, merge="dare",
        reserve_p=0.3, alpha=0.01, max_steps=2, save_steps=1,
    )  # fmt: skip
    whole = tmp_path / "whole"
    run_training(lora_config(llama_pair, prefs, whole, **options))
    resumed = interrupted_copy(whole, tmp_path / "resumed", "checkpoint-2")
    watch = Watch()
    config = lora_config(llama_pair, prefs, resumed, resume=True, **options)
    assert run_training(config, callbacks=[watch]).resumed_from.endswith("checkpoint-1")
    torch.testing.assert_close(watch.seen["ref_end"], logits(sft_policy(llama_pair, sft_adapter)))
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_continues_an_sft_adapter(llama_pair, sft_adapter, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"say {i}", "reference": "1"} for i in range(4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = dict(
        model=str(sft_adapter), lora_r=2, lora_alpha=TrainConfig().lora_alpha, algo="grpo",
        reward=["exact"], num_generations=2, batch_size=2, max_completion_length=4, max_steps=1,
        max_length=TrainConfig().max_length, merge="ties", reserve_p=0.2, alpha=0.01, beta=0.1,
    )  # fmt: skip
    watch = Watch()
    out = tmp_path / "grpo"
    run_training(lora_config(llama_pair, prompts, out, **options), callbacks=[watch])
    sft = logits(sft_policy(llama_pair, sft_adapter))
    torch.testing.assert_close(watch.seen["ref_end"], sft)  # with --beta: the SFT policy
    torch.testing.assert_close(logits(sft_policy(llama_pair, out)), watch.seen["policy"])
