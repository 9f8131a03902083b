"""The ``cpu`` backend: the online-merging AdamW step on CPU tensors, fast.

- ``fused_online_merging_adamw_``: one tensor, its dense part in torch's fused AdamW kernel;
- ``batched_step_``: the OnDARE/OnTIES steps (K = 1) of all contiguous float32 tensors of a step
  in a few numba kernels (``optim.kernels``), with one mask draw for all.
Both are tested equal to the reference (``functional.online_merging_adamw_``): same kept
entries, same parameters to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omotool.merging import kept_count, magnitude_topk_indices
from omotool.merging.sparsify import key_seed
from omotool.optim import kernels
from omotool.optim.distributed import Shard
from omotool.optim.functional import (
    MergeOptions,
    StepStats,
    Workspace,
    adam_direction,
    add_dare_reference_,
    apply_ties_,
    fused_adamw_,
    merge_update_,
)
from omotool.optim.task_vector import FlatDelta


def fused_online_merging_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    cache: torch.Tensor | None,
    reference: FlatDelta | None,
    workspace: Workspace,
    *,
    name: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    options: MergeOptions,
    stats: StepStats,
    shard: Shard | None = None,
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
    adam = dict(beta1=beta1, beta2=beta2, eps=eps)
    if not options.merges:
        fused_adamw_(
            param, grad, exp_avg, exp_avg_sq, step, lr=lr, weight_decay=weight_decay, **adam
        )
        return
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    dense = (
        options.method == "ties"
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

    merge_update_(
        param,
        direction,
        cache,
        reference,
        name=name,
        step=int(step),
        options=options,
        stats=stats,
        shard=shard,
        workspace=workspace,
    )


@dataclass
class BatchEntry:
    """One tensor of a batched OnDARE / OnTIES step (``batched_step_``)."""

    name: str
    param: torch.Tensor  # float32 working copy
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int  # counts this step
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    reference: FlatDelta | None


def batches(
    options: MergeOptions, reference: FlatDelta | None, param: torch.Tensor, *tensors: torch.Tensor
) -> bool:
    """Whether a tensor can join a batched step: OnDARE or OnTIES with K = 1, ``p < 1``,
    rescale ``none|inverse``, unsharded contiguous float32 CPU tensors; OnTIES with a sparse T
    (int32 indices) or none."""
    if options.online_step != 1 or options.reserve_p >= 1 or options.resolved_rescale == "l1":
        return False
    dense = reference is not None and (
        reference.indices is None or reference.indices.dtype != torch.int32
    )
    if options.method == "ties" and dense:
        return False
    return options.method in ("dare", "ties") and kernels.usable(param, *tensors)


def batched_step_(
    entries: list[BatchEntry], options: MergeOptions, stats: StepStats, workspace: Workspace
) -> None:
    """``batched_dare_step_`` or ``batched_ties_step_`` for ``options.method``."""
    if not entries:
        return
    if options.method == "ties":
        batched_ties_step_(entries, options, stats, workspace)
    else:
        batched_dare_step_(entries, options, stats)


def _decay_(entries: list[BatchEntry]) -> None:
    for e in entries:
        if e.weight_decay != 0:
            e.param.mul_(1 - e.lr * e.weight_decay)


def batched_ties_step_(
    entries: list[BatchEntry], options: MergeOptions, stats: StepStats, workspace: Workspace
) -> None:
    """OnTIES for many tensors in a few kernel calls (``kernels.ties_steps_``).

    The same selection and merge as ``merge_ties_`` tensor by tensor; a tensor whose sampled
    floor overshot selects from its whole ``Δθ`` here.
    """
    p, alpha = options.reserve_p, options.alpha
    _decay_(entries)
    total = sum(e.param.numel() for e in entries)
    like = torch.empty(1).expand(total)  # only its size and device are used
    buffers = workspace.get("index", like, torch.long), workspace.get("values", like)
    short, totals = kernels.ties_steps_(
        [(e.param, e.grad, e.exp_avg, e.exp_avg_sq) for e in entries],
        [None if e.reference is None else (e.reference.indices, e.reference.values)
         for e in entries],
        [(e.step, e.lr, e.beta1, e.beta2, e.eps) for e in entries],
        [kept_count(e.param.numel(), p) for e in entries],
        buffers,
        density=p if options.resolved_rescale == "inverse" else 1.0,
        alpha=alpha,
        weighted=options.election == "weighted",
    )  # fmt: skip
    stats.merged = True
    overlap, conflicts, update_sq, tau_sq = totals
    stats.overlap += int(overlap)
    stats.conflicts += int(conflicts)
    stats.update_sq += (1 - alpha) ** 2 * float(update_sq)
    stats.tau_sq += alpha**2 * float(tau_sq)
    for e, overshot in zip(entries, short, strict=True):
        if overshot:  # the moments are this step's already: select from the whole Δθ
            update = adam_direction(
                e.exp_avg, e.exp_avg_sq, step=e.step, lr=e.lr, beta1=e.beta1, beta2=e.beta2,
                eps=e.eps,
            ).reshape(-1)  # fmt: skip
            kept_index = magnitude_topk_indices(update, p)
            flat = e.param.view(-1)
            apply_ties_(flat, kept_index, update[kept_index], update, e.reference, options, stats)
        else:
            stats.entries += e.param.numel()
            stats.kept += kept_count(e.param.numel(), p)


def batched_dare_step_(entries: list[BatchEntry], options: MergeOptions, stats: StepStats) -> None:
    """OnDARE for many tensors in one kernel call (``kernels.dare_steps_``).

    The arithmetic of ``fused_online_merging_adamw_`` tensor by tensor; each tensor's mask is
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
        [(e.param, e.grad, e.exp_avg, e.exp_avg_sq) for e in entries],
        [key_seed(options.seed, "update", e.step, e.name) for e in entries],
        [(e.reference.indices, e.reference.values) if s and alpha > 0 else None
         for e, s in zip(entries, sparse, strict=True)],
        [(e.step, e.lr, e.beta1, e.beta2, e.eps) for e in entries],
        keep=p,
        density=p if options.resolved_rescale == "inverse" else 1.0,
        weight=1 - alpha,
        alpha=alpha,
    )  # fmt: skip
    stats.merged = True
    stats.update_sq += (1 - alpha) ** 2 * squares
    stats.entries += sum(e.param.numel() for e in entries)
    stats.kept += int(kept.sum())
    for e, s in zip(entries, sparse, strict=True):
        if s and alpha > 0:
            stats.tau_sq += alpha**2 * e.reference.sq_norm
        else:
            add_dare_reference_(e.param.view(-1), e.reference, options, stats)
