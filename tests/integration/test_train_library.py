"""The optimizer inside a user's own TRL / transformers trainer, and the other data shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from trl import DPOConfig, DPOTrainer

from omotool.errors import UsageError
from omotool.optim import OnlineMergingAdamW, TaskVector, online_merging
from omotool.train import online_merging_trainer
from omotool.train.runner import TrainConfig, run_training

PREFS = Path(__file__).parents[2] / "recipes" / "data" / "tiny-prefs.jsonl"
ROWS = [json.loads(line) for line in PREFS.read_text().splitlines()]


def test_optimizer_passed_to_a_trl_trainer(llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = OnlineMergingAdamW(
        model.named_parameters(), TaskVector.from_models(base, sft), method="ties",
        reserve_p=0.2, alpha=0.01, lr=1e-3,
    )  # fmt: skip
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, max_length=32, save_strategy="no",
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(ROWS[:16]),
        processing_class=AutoTokenizer.from_pretrained(str(sft)), optimizers=(optimizer, None),
    )  # fmt: skip
    trainer.train()
    assert optimizer.stats()["merge/kept_fraction"] == pytest.approx(0.2, abs=0.01)
    moved = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert 0 < moved < 0.5 * total  # top-p of each update, plus T's entries: a sparse move


def test_an_optimizer_of_ones_own_gets_the_trainers_gradient_norm(
    llama_pair, tmp_path, monkeypatch
) -> None:
    """``online_merging_trainer(DPOTrainer)`` given ``optimizers=(opt, None)``: the trainer
    keeps that optimizer and hands it the gradient norm before each step."""
    base, sft = llama_pair
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    optimizer = OnlineMergingAdamW(
        model.named_parameters(), TaskVector.from_models(base, sft), method="dare",
        reserve_p=0.2, alpha=0.01, lr=1e-3,
    )  # fmt: skip
    norms = []
    note = optimizer.note_grad_norm
    monkeypatch.setattr(optimizer, "note_grad_norm", lambda n: (norms.append(n), note(n)))
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, max_length=32, save_strategy="no",
    )  # fmt: skip
    trainer = online_merging_trainer(DPOTrainer)(
        model=model, args=args, train_dataset=Dataset.from_list(ROWS[:16]),
        processing_class=AutoTokenizer.from_pretrained(str(sft)), optimizers=(optimizer, None),
    )  # fmt: skip
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer and len(norms) == 2
    assert optimizer.skipped_steps == 0


def test_online_merging_trainer_wraps_a_plain_transformers_trainer(
    llama_pair, tmp_path, monkeypatch
) -> None:
    """... and hands the optimizer the gradient norm the trainer computes before each step,
    so that the optimizer does not read the gradients again for its NaN check."""
    base, sft = llama_pair
    norms = []
    note = OnlineMergingAdamW.note_grad_norm

    def recorded(self, total_norm):
        norms.append(float(total_norm))
        note(self, total_norm)

    def no_read(tensors):
        raise AssertionError("the optimizer read the gradients for its NaN check")

    monkeypatch.setattr(OnlineMergingAdamW, "note_grad_norm", recorded)
    monkeypatch.setattr(online_merging.kernels, "all_finite", no_read)
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    texts = [f"{r['prompt']} {r['chosen']}" for r in ROWS[:16]]
    data = Dataset.from_dict(dict(tokenizer(texts))).map(lambda x: {"labels": x["input_ids"]})
    FineTune = online_merging_trainer(
        Trainer, TaskVector.from_models(base, sft), method="dare", reserve_p=0.1, alpha=0.0
    )
    trainer = FineTune(
        model=AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=1,
            learning_rate=1e-3,
            weight_decay=0.1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        ),  # fmt: skip
        train_dataset=data,
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, OnlineMergingAdamW)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}  # no decay on norms
    assert optimizer.stats()["merge/kept_fraction"] == pytest.approx(0.1, abs=0.01)
    assert len(norms) == 2 and all(0 < n < float("inf") for n in norms)


def test_conversational_preferences_and_sft_messages(llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    chats = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in ROWS[:12]
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    common = dict(model=str(sft), base=str(base), lr=1e-3, batch_size=4, max_steps=2, max_length=64)
    for algo in ("dpo", "sft"):  # sft trains on the chosen conversation
        result = run_training(
            TrainConfig(algo=algo, dataset=str(data), out=str(tmp_path / algo), **common)
        )
        assert result.steps == 2 and result.dropped == 0


def test_eval_dataset_and_precomputed_reference(llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    result = run_training(
        TrainConfig(
            model=str(sft),
            base=str(base),
            dataset=str(PREFS),
            eval_dataset=str(PREFS),
            eval_steps=1,
            out=str(tmp_path / "run"),
            lr=1e-3,
            batch_size=8,
            max_steps=2,
            max_length=32,
            precompute_ref=True,
        )  # fmt: skip
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    assert any("rewards/accuracies" in r for r in records)
    assert result.steps == 2


def test_report_to_needs_its_package(llama_pair, tmp_path, monkeypatch) -> None:
    import importlib.util

    config = TrainConfig(model="m", dataset="d", out="o", merge="none", report_to="wandb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install wandb"):
        config.validate()
    with pytest.raises(UsageError, match="choose one of none, tensorboard, wandb"):
        TrainConfig(model="m", dataset="d", out="o", merge="none", report_to="mlflow").validate()
