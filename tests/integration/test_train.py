"""run_training end to end on a tiny Llama: every algorithm, merges, outputs, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from omotool.delta import DeltaConfig, compute_delta
from omotool.errors import InputError, OutputError, UsageError
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
    base, sft = llama_pair
    settings = dict(
        model=str(sft), base=str(base), dataset=str(prefs), output=str(out), lr=1e-3,
        batch_size=4, max_steps=3, reserve_p=0.2, alpha=0.01, max_length=32,
    )  # fmt: skip
    return TrainConfig(**(settings | options))


def state(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("merge", ["dare", "ties", "none"])
def test_dpo_trains_and_writes_a_loadable_model(llama_pair, prefs, tmp_path, merge) -> None:
    out = tmp_path / "run"
    result = run_training(config(llama_pair, prefs, out, merge=merge))
    assert result["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "merge/kept_fraction"):
        assert key in steps[-1]
    if merge == "dare":
        assert steps[-1]["merge/kept_fraction"] == pytest.approx(0.2, abs=0.02)
    before, after = state(llama_pair[1]), state(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "train_config.json").read_text())["merge"] == merge


@pytest.mark.parametrize("algo", ["ipo", "hinge", "robust", "kto", "simpo", "orpo", "sft"])
def test_every_algorithm_runs_with_online_merging(llama_pair, prefs, tmp_path, algo) -> None:
    out = tmp_path / algo
    result = run_training(
        config(llama_pair, prefs, out, algo=algo, max_steps=2, label_smoothing=0.1)
    )
    assert result["steps"] == 2
    assert "merge/kept_fraction" in result
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


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
