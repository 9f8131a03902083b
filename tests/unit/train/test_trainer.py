"""online_merging_trainer's optimizer under DeepSpeed: unnamed parameters without merging,
named ones (they build T) with it; the runs of DeepSpeed's partitions attached after set-up."""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from omotool.errors import UsageError
from omotool.optim import OnlineMergingAdamW
from omotool.train.trainer import (
    ZERO_SPREAD_KEY,
    ZERO_SPREAD_WARN_AFTER,
    attach_zero_runs,
    completions_callback,
    metrics_callback,
    online_merging_trainer,
)


class DeepSpeedTrainer:
    """What ``create_optimizer`` reads of a transformers trainer DeepSpeed is enabled on."""

    is_deepspeed_enabled = True
    optimizer = None

    def __init__(self) -> None:
        self.model = torch.nn.Linear(3, 2)
        self.args = SimpleNamespace(
            weight_decay=0.1, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8,
        )  # fmt: skip

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return ["weight"]


def test_under_deepspeed_the_optimizer_gets_unnamed_parameters() -> None:
    """DeepSpeed swaps its flat partitions into the groups: names would not match them."""
    trainer = online_merging_trainer(DeepSpeedTrainer, method="none")()
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, OnlineMergingAdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert all("param_names" not in group for group in optimizer.param_groups)
    assert [p is trainer.model.weight for p in optimizer.param_groups[0]["params"]] == [True]


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_under_deepspeed_merging_gets_named_parameters(method) -> None:
    tau = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    trainer = online_merging_trainer(DeepSpeedTrainer, tau, method=method)()
    optimizer = trainer.create_optimizer()
    assert [group["param_names"] for group in optimizer.param_groups] == [["weight"], ["bias"]]
    assert set(optimizer.references) == {"weight", "bias"}


def test_attach_zero_runs_only_where_deepspeed_wraps_the_optimizer() -> None:
    """Without ZeRO (nor bf16 partitions) DeepSpeed steps the optimizer on the parameters."""
    attached = []

    class Optimizer:
        def attach_zero_runs(self, runs) -> None:
            attached.append(runs)

    ours = Optimizer()
    attach_zero_runs(SimpleNamespace(optimizer=ours), torch.nn.Linear(2, 2))
    assert attached == []
    with pytest.raises(UsageError, match="not a DeepSpeed ZeRO"):  # wrapped by something else
        attach_zero_runs(SimpleNamespace(optimizer=SimpleNamespace(optimizer=ours)),
                         torch.nn.Linear(2, 2))  # fmt: skip


def _log_lines(path, *logs: dict) -> Any:
    """A ``metrics_callback`` on ``path`` after one ``on_log`` per entry of ``logs``."""
    callback = metrics_callback(path)
    for step, log in enumerate(logs, 1):
        state = SimpleNamespace(is_world_process_zero=True, global_step=step)
        callback.on_log(None, state, None, logs=log)
    return callback


def test_non_finite_metrics_are_written_as_null_with_one_warning_each(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    with pytest.warns(UserWarning) as caught:
        callback = _log_lines(
            path,
            {"loss": 0.5, "reward": math.nan},
            {"loss": math.inf, "reward": math.nan},
            {"loss": 0.25, "reward": None},
        )
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # strict JSON
    assert lines == [
        {"step": 1, "loss": 0.5, "reward": None},
        {"step": 2, "loss": None, "reward": None},
        {"step": 3, "loss": 0.25, "reward": None},
    ]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # once per metric
    assert "'reward' is nan at step 1" in messages[0] and "'loss' is inf at step 2" in messages[1]
    assert callback.last == {"step": 3, "loss": 0.25, "reward": None}
    json.dumps(callback.last, allow_nan=False)  # the summary and omotool.json stay JSON


FLAT = {"loss": 0.0, "frac_reward_zero_std": 1.0}


def test_a_run_without_reward_spread_is_warned_about_once(tmp_path) -> None:
    with pytest.warns(UserWarning, match="NO LEARNING SIGNAL") as caught:
        callback = _log_lines(tmp_path / "m.jsonl", *[FLAT] * (ZERO_SPREAD_WARN_AFTER + 3))
        callback.on_train_end(None, None, None)
    assert len(caught) == 1
    assert f"first {ZERO_SPREAD_WARN_AFTER} logged steps" in str(caught[0].message)
    assert callback.last[ZERO_SPREAD_KEY] == ZERO_SPREAD_WARN_AFTER + 3


def test_a_short_run_without_reward_spread_is_warned_about_at_its_end(tmp_path) -> None:
    callback = _log_lines(tmp_path / "m.jsonl", FLAT, FLAT)
    with pytest.warns(UserWarning, match="first 2 logged steps"):
        callback.on_train_end(None, None, None)


def test_some_reward_spread_is_not_warned_about(tmp_path, recwarn) -> None:
    spread = {"loss": 0.1, "frac_reward_zero_std": 0.5}
    callback = _log_lines(tmp_path / "m.jsonl", FLAT, spread, *[FLAT] * ZERO_SPREAD_WARN_AFTER)
    callback.on_train_end(None, None, None)
    assert not [w for w in recwarn if "LEARNING SIGNAL" in str(w.message)]
    assert callback.last[ZERO_SPREAD_KEY] == ZERO_SPREAD_WARN_AFTER + 1  # (the summary's count)
    offline = _log_lines(tmp_path / "dpo.jsonl", {"loss": 0.3})  # no such metric: no count
    offline.on_train_end(None, None, None)
    assert ZERO_SPREAD_KEY not in offline.last


class SamplingTrainer:
    """What ``completions_callback`` reads of TRL's GRPO/RLOO trainer: ``_logs``."""

    def __init__(self) -> None:
        self._logs: dict = {"prompt": deque(maxlen=4), "completion": deque(maxlen=4),
                            "rewards": defaultdict(lambda: deque(maxlen=4)),
                            "advantages": deque(maxlen=4)}  # fmt: skip

    def sample(self, *rows: tuple) -> None:
        for prompt, completion, exact, model, advantage in rows:
            self._logs["prompt"].append(prompt)
            self._logs["completion"].append(completion)
            self._logs["rewards"]["exact"].append(exact)
            self._logs["rewards"]["model"].append(model)
            self._logs["advantages"].append(float(advantage))


def test_completions_are_written_once_per_sampled_batch_up_to_the_bound(tmp_path) -> None:
    trainer, path, shown = SamplingTrainer(), tmp_path / "completions.jsonl", []
    callback = completions_callback(trainer, path, 3, show=lambda *a: shown.append(a), shown=1)

    def log(step: int, **logs: float) -> None:
        state = SimpleNamespace(is_world_process_zero=True, global_step=step)
        callback.on_log(None, state, None, logs=logs or {"loss": 0.1})

    log(1)  # nothing sampled yet
    trainer.sample(("p", "1", 1.0, math.nan, 0.5), ("p", "2", 0.0, math.inf, -0.5),
                   ("q", "", 0.0, 2.0, 0.0), ("q", "3", 0.0, 1.0, 0.0))  # fmt: skip
    log(2)
    log(3)  # the same batch (--num-iterations 2): not again
    trainer.sample(("e", "e", 1.0, 1.0, 1.0))
    log(3, eval_loss=0.2)  # evaluation: not written
    log(4)  # still evaluation's completions
    trainer.sample(*[("r", "4", 1.0, 0.5, 0.25)] * 4)
    log(5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # strict JSON
    assert lines[:3] == [
        {"step": 2, "prompt": "p", "completion": "1", "rewards": {"exact": 1.0, "model": None},
         "advantage": 0.5},
        {"step": 2, "prompt": "p", "completion": "2", "rewards": {"exact": 0.0, "model": None},
         "advantage": -0.5},
        {"step": 2, "prompt": "q", "completion": "", "rewards": {"exact": 0.0, "model": 2.0},
         "advantage": 0.0},
    ]  # fmt: skip
    assert [line["step"] for line in lines] == [2, 2, 2, 5, 5, 5]
    assert [(step, [row["completion"] for row in rows]) for step, rows in shown] == [
        (2, ["1"]), (5, ["4"])
    ]  # fmt: skip


def test_completions_are_not_written_when_off(tmp_path) -> None:
    trainer, path = SamplingTrainer(), tmp_path / "completions.jsonl"
    trainer.sample(("p", "1", 1.0, 1.0, 0.5))
    callback = completions_callback(trainer, path, 0)
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=1), None,
                    logs={"loss": 0.1})  # fmt: skip
    assert not path.exists()
