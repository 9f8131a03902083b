"""``LoraOnlineMerging``: OnDARE/OnTIES for LoRA adapters, around the optimizer of the factors.

The inner optimizer (``OnlineMergingAdamW(method="none")`` in ``omotool train``: the same AdamW
as LoRA without merging) steps every factor. Then, per adapted module ``W = W₀ + s·B·A``,
its factor updates ``dA``, ``dB`` (what the inner step applied) give ``δW``, the merge rule
gives ``M = merge(δW, T)`` with ``T = F(τ)`` of the module's weight, and the factors get the
tangent-space correction of ``E = M − δW`` (``omotool.optim.lora_projection``). With
``method="dare", reserve_p=1, alpha=0`` the correction is exact zeros, so the run is the
unmerged one bit for bit.

Masks are keyed by ``(seed, "update", step, name)`` with ``name`` the module's weight name in
``τ`` and ``step`` this optimizer's count of applied steps: every data-parallel rank (which
holds the same factors and gradients) draws the same, and a resumed run continues the count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omotool.errors import InputError, UsageError
from omotool.optim.functional import MergeContext, MergeOptions, StepStats
from omotool.optim.lora_projection import DAMPING, MAX_A_CHANGE, lora_merge_step
from omotool.optim.references import build_references, merge_options_of, takes_merge_options
from omotool.optim.task_vector import TaskVector
from omotool.optim.wrapper import WrappedOptimizer

SHARE = "merge/lora_kept_share"
"""Logged: ``‖s(ΔB·A + B·ΔA)‖ / ‖E‖`` over every adapted module of the step (energy-weighted),
the share of the merge's correction the adapter realised."""


@dataclass
class LoraModule:
    """One adapted module: ``weight`` (``W₀``, named ``name`` as in ``τ``), its factors ``a``
    (r×k) and ``b`` (d×r) and scale ``s``."""

    name: str
    weight: torch.Tensor
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    scale: float


def peft_lora_modules(model: Any, adapter: str = "default") -> list[LoraModule]:
    """The adapted modules of a PEFT LoRA ``model``, named as the weights of the model it wraps
    (``base_model.model.x.q_proj`` → ``x.q_proj.weight``)."""
    from peft.tuners.lora import LoraLayer

    modules = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        name = path.removeprefix("base_model.model.") + ".weight"
        weight = module.get_base_layer().weight
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        modules.append(LoraModule(name, weight, a, b, float(module.scaling[adapter])))
    return modules


class LoraOnlineMerging(WrappedOptimizer):
    """Online merging of LoRA ``modules`` with ``task_vector`` around ``optimizer`` (which
    steps their factors). Merge options as for ``OnlineMergingAdamW`` (``online_step`` 1
    only); ``rho`` and ``max_a_change`` as for ``lora_projection.tangent_correction``."""

    @takes_merge_options
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        modules: Sequence[LoraModule],
        task_vector: TaskVector | Mapping[str, torch.Tensor] | str | os.PathLike[str],
        *,
        rho: float = DAMPING,
        max_a_change: float | None = MAX_A_CHANGE,
        **merge_options: Any,
    ) -> None:
        # No Optimizer.__init__: the inner optimizer owns the param groups and their state.
        self.optimizer = optimizer
        self.options: MergeOptions = merge_options_of(self, merge_options)
        self.options.validate()
        if not self.options.merges:
            raise UsageError("LoraOnlineMerging merges: give method='dare' or 'ties'.")
        if self.options.online_step != 1:
            raise UsageError("online merging of LoRA factors runs every step: online_step 1.")
        if not modules:
            raise UsageError("no LoRA module to merge: the model has no adapter.")
        self.modules = list(modules)
        self.rho, self.max_a_change = rho, max_a_change
        tau = TaskVector.coerce(task_vector)
        missing = [m.name for m in self.modules if m.name not in tau]
        if missing:
            raise InputError(
                f"the task vector has no entry for the adapted weight(s) {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}: use the task vector of this model."
            )
        named = [(m.name, m.weight) for m in self.modules]
        self.references = build_references(named, tau, self.options)
        self.task_vector_fingerprint = tau.sft_fingerprint
        self.merge_steps = 0
        self.last_stats = StepStats()
        self.last_share: tuple[torch.Tensor, torch.Tensor] | None = None  # ‖realised‖², ‖E‖²

    @property
    def resolved_backend(self) -> str | None:
        return getattr(self.optimizer, "resolved_backend", None)

    def note_grad_norm(self, total_norm: torch.Tensor | float) -> None:
        if hasattr(self.optimizer, "note_grad_norm"):
            self.optimizer.note_grad_norm(total_norm)

    def __repr__(self) -> str:
        return f"LoraOnlineMerging({self.options}, {self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Inner step; unless it skipped (non-finite gradients), each module's factors get the
        tangent-space correction of its merged update."""
        skipped = getattr(self.optimizer, "skipped_steps", 0)
        before = [(m.a.detach().clone(), m.b.detach().clone()) for m in self.modules]
        loss = self.optimizer.step(closure)
        if getattr(self.optimizer, "skipped_steps", 0) != skipped:
            return loss  # nothing moved: nothing to merge (OnDARE would still add α·T)
        self.merge_steps += 1
        stats = StepStats()
        error_sq = realised_sq = torch.zeros((), dtype=torch.float64)  # summed on the device
        for module, (a, b) in zip(self.modules, before, strict=True):
            da, db = module.a.detach() - a, module.b.detach() - b
            context = MergeContext(module.name, self.merge_steps, self.options, stats)
            step = lora_merge_step(
                a.float(), b.float(), da.float(), db.float(), module.scale,
                self.references[module.name], context, rho=self.rho,
                max_a_change=self.max_a_change,
            )  # fmt: skip
            module.a.add_(step.delta_a.to(module.a.dtype))
            module.b.add_(step.delta_b.to(module.b.dtype))
            error_sq = error_sq.to(step.error_norm.device) + step.error_norm.double() ** 2
            realised_sq = (
                realised_sq.to(error_sq.device)
                + (step.kept_share.double() * step.error_norm.double()) ** 2
            )
        self.last_stats, self.last_share = stats, (realised_sq, error_sq)
        return loss

    def stats(self) -> dict[str, float]:
        """The last merged step's statistics (``StepStats.as_dict``) and ``SHARE``; read on the
        host here, at logging, not at every step."""
        if self.last_share is None:
            return {}
        realised_sq, error_sq = (float(x) for x in self.last_share)
        return {
            **self.last_stats.as_dict(getattr(self.optimizer, "skipped_steps", 0)),
            SHARE: math.sqrt(realised_sq / error_sq) if error_sq else 1.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.optimizer.state_dict(),
            "lora_merging": {
                "options": dataclasses.asdict(self.options),
                "merge_steps": self.merge_steps,
                "task_vector_fingerprint": self.task_vector_fingerprint,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict["lora_merging"]
        if MergeOptions.from_saved(extra["options"], self.options) != self.options:
            raise InputError("the checkpoint was made with other merge options.")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.merge_steps = int(extra["merge_steps"])
