"""The training progress bar shows the loss and, per algorithm family, the reward figure."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from omotool.train.progress import progress_callback


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
