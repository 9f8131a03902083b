"""RLHF algorithms: each ``--algo`` is a TRL trainer, its config class and the loss settings.

The optimizer is loss-agnostic, so every algorithm here trains with online merging.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from omotool.registry import Registry


@dataclass(frozen=True)
class Algorithm:
    """How one ``--algo`` maps onto TRL."""

    kind: str  # data kind (omotool.data.KINDS)
    trainer: str  # "module:Class"
    config: str  # "module:Class"
    settings: dict[str, Any] = field(default_factory=dict)  # fixed config values (loss type)
    uses_beta: bool = True  # whether --beta means anything to it
    uses_reference: bool = True  # whether it compares against a reference model

    def trainer_class(self) -> type:
        return _load(self.trainer)

    def config_class(self) -> type:
        return _load(self.config)


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
_DPO = ("trl:DPOTrainer", "trl:DPOConfig")
ALGORITHMS.register("dpo", help="DPO, sigmoid loss (Rafailov et al. 2023)")(
    Algorithm("preference", *_DPO, {"loss_type": ["sigmoid"]})
)
ALGORITHMS.register("ipo", help="IPO (Azar et al. 2023); --beta is its tau")(
    Algorithm("preference", *_DPO, {"loss_type": ["ipo"]})
)
ALGORITHMS.register("hinge", help="SLiC hinge loss on the DPO reward")(
    Algorithm("preference", *_DPO, {"loss_type": ["hinge"]})
)
ALGORITHMS.register("robust", help="cDPO / robust DPO with --label-smoothing")(
    Algorithm("preference", *_DPO, {"loss_type": ["robust"]})
)
ALGORITHMS.register("kto", help="KTO (Ethayarajh et al. 2024); pairs are unpaired")(
    Algorithm("unpaired", "trl:KTOTrainer", "trl:KTOConfig")
)
ALGORITHMS.register("simpo", help="SimPO (Meng et al. 2024), reference-free")(
    Algorithm(
        "preference",
        "trl.experimental.cpo:CPOTrainer",
        "trl.experimental.cpo:CPOConfig",
        {"loss_type": "simpo", "cpo_alpha": 0.0},
        uses_reference=False,
    )
)
ALGORITHMS.register("orpo", help="ORPO (Hong et al. 2024), reference-free")(
    Algorithm(
        "preference",
        "trl.experimental.orpo:ORPOTrainer",
        "trl.experimental.orpo:ORPOConfig",
        uses_reference=False,
    )
)
ALGORITHMS.register("sft", help="continual supervised fine-tuning on the chosen answers")(
    Algorithm(
        "language_modeling",
        "trl:SFTTrainer",
        "trl:SFTConfig",
        uses_beta=False,
        uses_reference=False,
    )
)
