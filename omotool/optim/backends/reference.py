"""The ``reference`` backend: the readable per-tensor step of ``functional`` (plain tensor ops,
any device, values read on the host): the spec every other backend is tested against. With
``method="none"`` it follows ``torch.optim.AdamW(foreach=False)`` bit for bit.
"""

from __future__ import annotations

from omotool.optim.backends.base import Backend, Keep, TensorStep, register
from omotool.optim.functional import StepStats, Workspace, online_merging_adamw_
from omotool.optim.rules import MERGING_METHODS


@register("reference", help="plain tensor ops, tensor by tensor: the spec")
class ReferenceBackend(Backend):
    rules = MERGING_METHODS

    def step(
        self, tensors: list[TensorStep], *, keep: Keep, stats: StepStats, workspace: Workspace
    ) -> None:
        for t in tensors:
            online_merging_adamw_(
                t.work, t.grad.float(), *t.moments, t.cache, t.reference, name=t.name,
                step=int(t.step), options=t.options, stats=stats, shard=t.shard, **t.adam,
            )  # fmt: skip
            t.write_back()
