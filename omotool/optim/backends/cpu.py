"""The ``cpu`` backend: the online-merging AdamW step on CPU tensors, fast.

- ``fused_step_``: one tensor, its dense part in torch's fused AdamW kernel;
- ``batched_dare_step_`` / ``batched_ties_step_``: the OnDARE/OnTIES steps (K = 1) of all
  contiguous float32 tensors of a step in a few numba kernels (``optim.kernels``), with one
  mask draw for all.
Where the kernels are on, every OnDARE mask of this backend, batched or not, is drawn by chunks
(``chunk_dare_indices``, the kernels' draw), so that masks do not depend on sharding or on which
tensors are batched. Both paths are tested equal to the reference
(``functional.online_merging_adamw_``): same kept entries, same parameters to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import torch

from omotool.errors import UsageError
from omotool.merging import kept_count, magnitude_topk_indices
from omotool.merging.sparsify import key_seed
from omotool.optim import kernels
from omotool.optim.backends.base import Backend, Keep, TensorStep, register
from omotool.optim.backends.cpu_shards import ShardTopK
from omotool.optim.distributed import sharded_magnitude_mask
from omotool.optim.functional import (
    MERGE_RULES,
    DareDraw,
    MergeContext,
    MergeOptions,
    StepStats,
    Workspace,
    adam_direction,
    fused_adamw_,
    merge_update_,
)
from omotool.optim.rules import (
    MERGING_METHODS,
    add_dare_reference_,
    apply_ties_,
    dare_update_indices,
)
from omotool.optim.task_vector import FlatDelta


@register("cpu", help="CPU tensors: torch's fused AdamW plus numba kernels over all tensors")
class CpuBackend(Backend):
    rules = MERGING_METHODS  # per tensor by the rules' reference merge; BATCHED in kernels

    def __init__(self, options: MergeOptions, devices: Collection[torch.device]) -> None:
        super().__init__(options, devices)
        if not all(device.type == "cpu" for device in devices):
            raise UsageError(
                "backend='cpu' runs on CPU tensors; the parameters are on "
                f"{', '.join(sorted(str(d) for d in devices))}. Use backend='auto'."
            )
        # Decided once: the kernels' chunk draw where they are on, in every path.
        self.draw: DareDraw = chunk_dare_indices if kernels.usable() else dare_update_indices

    def step(
        self, tensors: list[TensorStep], *, keep: Keep, stats: StepStats, workspace: Workspace
    ) -> None:
        batch: list[TensorStep] = []  # tensors for one batched step
        for t in tensors:
            grad = t.grad.float()
            if t.options.merges and batches(self.options, t.reference, t.work, grad, *t.moments):
                batch.append(replace(t, grad=grad))
                continue
            fused_step_(t, grad, stats, workspace, self.draw)
            t.write_back()
        if batch:
            BATCHED[self.options.method](batch, self.options, stats, workspace)
        for t in batch:
            t.write_back()


def chunk_dare_indices(numel: int, context: MergeContext, device: torch.device) -> torch.Tensor:
    """``rules.DareDraw`` by chunks (``kernels.dare_kept_indices``: the mask ``dare_steps_``
    draws inside the kernels); under a shard, only the chunks that meet it are drawn."""
    options, shard = context.options, context.shard
    key = key_seed(options.seed, "update", context.step, context.name)
    if shard is None:
        return kernels.dare_kept_indices(numel, options.reserve_p, key).to(device)
    start = shard.offset
    index = kernels.dare_kept_indices(shard.numel, options.reserve_p, key, start, start + numel)
    return (index - start).to(device)


def fused_step_(
    t: TensorStep, grad: torch.Tensor, stats: StepStats, workspace: Workspace, draw: DareDraw
) -> None:
    """``online_merging_adamw_`` with the dense part in torch's fused AdamW kernel.

    The kernel makes one pass over ``g, m, v`` and a parameter, as ``AdamW(fused=True)``:
    - OnDARE (K = 1): it runs on the parameter itself with ``lr = 0``, so it only advances
      the moments; ``Δθ`` is then computed at the ~p·n kept entries alone.
    - OnTIES, step-K, ``l1`` rescale: it runs with the real ``lr`` on a zeroed scratch
      buffer of the ``workspace``, which thereby holds ``Δθ``.
    - ``method="none"``: it is ``AdamW(fused=True)``.
    Tests hold it equal to the reference path to float tolerance.
    """
    param, (exp_avg, exp_avg_sq), step, cache = t.work, t.moments, t.step, t.cache
    lr, weight_decay, options = t.adam["lr"], t.adam["weight_decay"], t.options
    adam = dict(beta1=t.adam["beta1"], beta2=t.adam["beta2"], eps=t.adam["eps"])
    if not options.merges:
        fused_adamw_(
            param, grad, exp_avg, exp_avg_sq, step, lr=lr, weight_decay=weight_decay, **adam
        )
        return
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    dense = (
        MERGE_RULES.get(options.method).reads_whole_update
        or cache is not None
        or options.resolved_rescale == "l1"
        or options.reserve_p >= 1
    )
    if dense:
        update = workspace.get("update", param).view_as(param).zero_()
        fused_adamw_(update, grad, exp_avg, exp_avg_sq, step, lr=lr, weight_decay=0.0, **adam)

        def direction(index: torch.Tensor | None) -> torch.Tensor:
            return update if index is None else update.reshape(-1)[index]

    else:
        fused_adamw_(param, grad, exp_avg, exp_avg_sq, step, lr=0.0, weight_decay=0.0, **adam)
        count = int(step)

        def direction(index: torch.Tensor | None) -> torch.Tensor:
            return adam_direction(exp_avg, exp_avg_sq, step=count, lr=lr, index=index, **adam)

    context = MergeContext(t.name, int(step), options, stats, t.shard, workspace, draw)
    merge_update_(param, direction, cache, t.reference, context)


def batches(
    options: MergeOptions, reference: FlatDelta | None, param: torch.Tensor, *tensors: torch.Tensor
) -> bool:
    """Whether a tensor can join a batched step: OnDARE or OnTIES with K = 1, ``p < 1``,
    rescale ``none|inverse``, contiguous float32 CPU tensors (whole or shards); OnTIES with a
    sparse T (int32 indices) or none. For a shard the answer is the same on every rank of its
    group (the batched OnTIES step agrees on top-k with collectives): it depends on the
    options, the tensors' kind and the form of T, which every rank cuts alike."""
    if options.online_step != 1 or options.reserve_p >= 1 or options.resolved_rescale == "l1":
        return False
    if options.method not in BATCHED:
        return False
    dense = reference is not None and (
        reference.indices is None or reference.indices.dtype != torch.int32
    )
    if dense and options.method in SPARSE_T_ONLY:
        return False
    return kernels.usable(param, *tensors)


def _decay_(entries: list[TensorStep]) -> None:
    for e in entries:
        lr, weight_decay = e.adam["lr"], e.adam["weight_decay"]
        if weight_decay != 0:
            e.work.mul_(1 - lr * weight_decay)


def _moments(e: TensorStep) -> tuple[torch.Tensor, ...]:
    """What the kernels read and write of a tensor: ``(θ, g, m, v)``."""
    return (e.work, e.grad, *e.moments)


def _adam(e: TensorStep) -> tuple[int | float, ...]:
    """The kernels' Adam settings of a tensor: ``(t, η, β1, β2, ε)``."""
    a = e.adam
    return (int(e.step), a["lr"], a["beta1"], a["beta2"], a["eps"])


def batched_ties_step_(
    entries: list[TensorStep], options: MergeOptions, stats: StepStats, workspace: Workspace
) -> None:
    """OnTIES for many tensors in a few kernel calls (``kernels.ties_steps_``).

    The same selection and merge as ``merge_ties_`` tensor by tensor; a tensor whose sampled
    floor overshot selects from its whole ``Δθ`` here.
    """
    p, alpha = options.reserve_p, options.alpha
    _decay_(entries)
    total = sum(e.work.numel() for e in entries)
    like = torch.empty(1).expand(total)  # only its size and device are used
    buffers = workspace.get("index", like, torch.long), workspace.get("values", like)
    shards = [e.shard for e in entries]
    shared = ShardTopK(shards, workspace) if any(shards) else None
    short, totals = kernels.ties_steps_(
        [_moments(e) for e in entries],
        [None if e.reference is None else (e.reference.indices, e.reference.values)
         for e in entries],
        [_adam(e) for e in entries],
        [kept_count(_whole_numel(e), p) for e in entries],
        buffers,
        density=p if options.resolved_rescale == "inverse" else 1.0,
        alpha=alpha,
        weighted=options.election == "weighted",
        shared=shared,
    )  # fmt: skip
    stats.merged = True
    overlap, conflicts, update_sq, tau_sq = totals
    stats.overlap += int(overlap)
    stats.conflicts += int(conflicts)
    stats.update_sq += (1 - alpha) ** 2 * float(update_sq)
    stats.tau_sq += alpha**2 * float(tau_sq)
    for t, (e, overshot) in enumerate(zip(entries, short, strict=True)):
        if overshot:  # the moments are this step's already: select from the whole Δθ
            adam = {k: v for k, v in e.adam.items() if k != "weight_decay"}
            update = adam_direction(*e.moments, step=int(e.step), **adam).reshape(-1)
            if e.shard is None:
                kept_index = magnitude_topk_indices(update, p)
            else:  # every rank of the group finds this shard short (from the same counts)
                kept_index = torch.nonzero(sharded_magnitude_mask(update, p, e.shard)).flatten()
            flat = e.work.view(-1)
            apply_ties_(flat, kept_index, update[kept_index], update, e.reference, options, stats)
        else:
            stats.entries += e.work.numel()
            stats.kept += kept_count(e.work.numel(), p) if e.shard is None else shared.kept[t]


def _whole_numel(e: TensorStep) -> int:
    """Entries of the whole tensor (all shards)."""
    return e.shard.numel if e.shard is not None else e.work.numel()


def batched_dare_step_(
    entries: list[TensorStep], options: MergeOptions, stats: StepStats, workspace: Workspace
) -> None:
    """OnDARE for many tensors in one kernel call (``kernels.dare_steps_``).

    The arithmetic of ``fused_step_`` tensor by tensor; each tensor's mask is
    drawn in the kernel, keyed by ``key_seed(seed, "update", step, name)`` (the same law as
    ``sparsify.bernoulli_indices``, other draws: ``kernels.dare_kept_indices`` gives them).
    """
    p, alpha = options.reserve_p, options.alpha
    _decay_(entries)
    sparse = [
        e.reference is not None
        and e.reference.indices is not None
        and e.reference.indices.dtype == torch.int32
        for e in entries
    ]
    squares, kept = kernels.dare_steps_(
        [_moments(e) for e in entries],
        [key_seed(options.seed, "update", int(e.step), e.name) for e in entries],
        [(e.reference.indices, e.reference.values) if s and alpha > 0 else None
         for e, s in zip(entries, sparse, strict=True)],
        [_adam(e) for e in entries],
        keep=p,
        density=p if options.resolved_rescale == "inverse" else 1.0,
        weight=1 - alpha,
        alpha=alpha,
        origins=[0 if e.shard is None else e.shard.offset for e in entries],
    )  # fmt: skip
    stats.merged = True
    stats.update_sq += (1 - alpha) ** 2 * squares
    stats.entries += sum(e.work.numel() for e in entries)
    stats.kept += int(kept.sum())
    for e, s in zip(entries, sparse, strict=True):
        if s and alpha > 0:
            stats.tau_sq += alpha**2 * e.reference.sq_norm
        else:
            add_dare_reference_(e.work.view(-1), e.reference, options, stats)


BATCHED = {"dare": batched_dare_step_, "ties": batched_ties_step_}
"""The batched step of each merging method (the others go tensor by tensor)."""
SPARSE_T_ONLY = ("ties",)
"""The batched steps that take ``T`` sparse with int32 indices (or none) only."""
