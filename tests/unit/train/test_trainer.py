"""online_merging_trainer's optimizer under DeepSpeed: unnamed parameters, no merging."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omotool.errors import UsageError
from omotool.optim import OnlineMergingAdamW
from omotool.train.trainer import online_merging_trainer


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


@pytest.mark.parametrize("options", [{"method": "dare"}, {"method": "ties"}, {}])
def test_under_deepspeed_merging_is_refused(options) -> None:
    trainer = online_merging_trainer(DeepSpeedTrainer, {"weight": torch.zeros(2, 3)}, **options)
    with pytest.raises(UsageError, match="online merging under DeepSpeed is not supported yet"):
        trainer().create_optimizer()
