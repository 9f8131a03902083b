"""RLHF algorithms: each ``--algo`` is a TRL trainer, its config class and the loss settings.

The optimizer is loss-agnostic, so every algorithm here trains with online merging: offline
ones on fixed examples (DPO family, KTO, SFT) and online ones that sample completions and score
them with reward functions (GRPO, RLOO; data kind ``prompt``). Options of ``omotool train``
that only some algorithms take (declared with ``lacks`` in ``omotool.train.options``) are
listed per algorithm in ``Algorithm.options``: they reach its TRL config, and a value set for an
algorithm that does not list it is refused (``omotool.train.arguments.check_algorithm_options``),
never dropped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from omotool.registry import Registry

# The options of TRL's online trainers (GRPO and RLOO) that both take.
_ONLINE = (
    "beta", "num_generations", "max_completion_length", "temperature", "top_p", "use_vllm",
    "num_iterations", "epsilon", "reward_weights", "num_generations_eval",
)  # fmt: skip


@dataclass(frozen=True)
class Algorithm:
    """How one ``--algo`` maps onto TRL."""

    kind: str  # data kind (omotool.data.KINDS)
    trainer: str  # "module:Class"
    config: str  # "module:Class"
    settings: dict[str, Any] = field(default_factory=dict)  # fixed config values (loss type)
    options: tuple[str, ...] = ()  # the algorithm-only train options its TRL loss reads
    min_batch_size: int = 1  # per device: KTO estimates its KL term from the other examples

    @property
    def online(self) -> bool:
        """Whether it samples completions and scores them with rewards (GRPO, RLOO)."""
        return self.kind == "prompt"

    def trainer_class(self) -> type:
        return _load(self.trainer)

    def config_class(self) -> type:
        return _load(self.config)


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
_DPO = ("trl:DPOTrainer", "trl:DPOConfig")
_REFERENCE = ("beta", "precompute_ref")  # TRL 1.16's DPO losses read label_smoothing only in robust
ALGORITHMS.register("dpo", help="DPO, sigmoid loss (Rafailov et al. 2023)")(
    Algorithm("preference", *_DPO, {"loss_type": ["sigmoid"]}, _REFERENCE)
)
ALGORITHMS.register("ipo", help="IPO (Azar et al. 2023); --beta is its tau")(
    Algorithm("preference", *_DPO, {"loss_type": ["ipo"]}, _REFERENCE)
)
ALGORITHMS.register("hinge", help="SLiC hinge loss on the DPO reward")(
    Algorithm("preference", *_DPO, {"loss_type": ["hinge"]}, _REFERENCE)
)
ALGORITHMS.register("robust", help="cDPO / robust DPO with --label-smoothing")(
    Algorithm("preference", *_DPO, {"loss_type": ["robust"]}, (*_REFERENCE, "label_smoothing"))
)
ALGORITHMS.register("kto", help="KTO (Ethayarajh et al. 2024); pairs are unpaired")(
    Algorithm(
        "unpaired",
        "trl:KTOTrainer",
        "trl:KTOConfig",
        {"loss_type": "kto"},
        _REFERENCE,
        min_batch_size=2,
    )
)
ALGORITHMS.register("simpo", help="SimPO (Meng et al. 2024), reference-free")(
    Algorithm(
        "preference",
        "trl.experimental.cpo:CPOTrainer",
        "trl.experimental.cpo:CPOConfig",
        {"loss_type": "simpo", "cpo_alpha": 0.0},
        ("beta", "label_smoothing"),
    )
)
ALGORITHMS.register("orpo", help="ORPO (Hong et al. 2024), reference-free; --beta is its lambda")(
    Algorithm(
        "preference",
        "trl.experimental.orpo:ORPOTrainer",
        "trl.experimental.orpo:ORPOConfig",
        options=("beta",),
    )
)
ALGORITHMS.register("sft", help="continual supervised fine-tuning on the chosen answers")(
    Algorithm("language_modeling", "trl:SFTTrainer", "trl:SFTConfig")
)
ALGORITHMS.register("grpo", help="GRPO (Shao et al. 2024) with rewards; online sampling")(
    Algorithm("prompt", "trl:GRPOTrainer", "trl:GRPOConfig", options=(*_ONLINE, "loss_type",
              "scale_rewards"))
)  # fmt: skip
ALGORITHMS.register("rloo", help="RLOO (Ahmadian et al. 2024) with rewards; online sampling")(
    Algorithm("prompt", "trl:RLOOTrainer", "trl:RLOOConfig", options=_ONLINE)
)
