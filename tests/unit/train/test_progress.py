"""The training progress bar shows the loss and, per algorithm family, the reward figure."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

from rich.console import Console

from omotool.train.progress import (
    MISSING,
    completions_table,
    is_main_process,
    metric_text,
    progress_callback,
)


def description_after(logs: dict) -> str:
    callback = progress_callback(Console(file=io.StringIO(), force_terminal=True))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=3)
    callback.on_train_begin(None, state, None)
    try:
        callback.on_log(None, state, None, logs=logs)
        return callback.bar.tasks[0].description
    finally:
        callback.on_train_end(None, state, None)


def test_dpo_shows_the_reward_accuracy_and_grpo_the_mean_reward() -> None:
    assert description_after({"loss": 0.5, "rewards/accuracies": 0.75}) == (
        "loss 0.5000  reward acc 0.75"
    )
    assert description_after({"loss": 0.01, "reward": 0.4375}) == "loss 0.0100  reward 0.438"


def test_none_nan_and_missing_metrics_are_shown_not_formatted() -> None:
    # TRL logs reward None when no reward applied to any completion of the step
    assert description_after({"loss": 0.5, "reward": None}) == "loss 0.5000  reward –"
    assert description_after({"loss": float("nan"), "reward": float("inf")}) == (
        "loss nan  reward inf"
    )
    assert description_after({"loss": None, "rewards/accuracies": None}) == "loss –  reward acc –"
    assert description_after({"reward": 0.5}) == ""  # no loss: not a training step's log


def test_metric_text() -> None:
    assert metric_text(0.123456) == "0.1235" and metric_text(3, ".2f") == "3.00"
    assert metric_text(None) == MISSING
    assert [metric_text(v) for v in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]
    assert metric_text("text") == "text" and metric_text(True) == "True"


def test_the_completions_table_shows_each_reward_and_the_advantage() -> None:
    rows = [
        {"prompt": "pick [1]", "completion": "1", "rewards": {"exact": 1.0, "model": None},
         "advantage": 0.5},
        {"prompt": [{"role": "user", "content": "say 2"}], "completion": "[b]2",
         "rewards": {"exact": 0.0, "model": 0.25}, "advantage": -0.5},
    ]  # fmt: skip
    console = Console(file=io.StringIO(), width=100)
    console.print(completions_table(7, rows))
    text = console.file.getvalue()
    assert "completions at step 7" in text
    assert all(word in text for word in ("pick [1]", "say 2", "[b]2", "exact", "model", "-0.5"))
    assert MISSING in text  # the reward that did not apply


def test_only_rank_0_of_a_launch_is_the_main_process(monkeypatch) -> None:
    """Under torchrun/accelerate (``RANK`` set) only rank 0 prints; a process started alone
    (no ``RANK``) is its own main process. (`omotool train --deepspeed` over 2 processes
    prints its summary once: tests/integration/test_train_deepspeed.py.)"""
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
