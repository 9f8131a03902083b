"""online_merging_trainer's optimizer under DeepSpeed: unnamed parameters without merging,
named ones (they build T) with it; the runs of DeepSpeed's partitions attached after set-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omotool.errors import UsageError
from omotool.optim import OnlineMergingAdamW
from omotool.train.trainer import attach_zero_runs, online_merging_trainer


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
