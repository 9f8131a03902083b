"""The online merge rules (``method=``), registered in ``functional.MERGE_RULES``, with the
reference implementation of each (plain tensor ops: the spec every backend is tested against).

A rule (``functional.MergeRule``) owns its name, its default rescale, how ``T = F(τ_r)`` is
built (``reference_term``) and how a step's update is merged (``merge``); ``MERGE_RULES``
lists them and answers an unknown name with the close ones. Backends implement the merging
rules by name (``backends.base.Backend.rules``) and refuse, at construction, a rule they do
not implement.

- OnDARE (Eq. 3, 4): ``θ ← θ + (1 − α)·F_R(Δθ) + α·T``, ``F_R`` a fresh Bernoulli(p) mask every
  step keyed by ``(seed, "update", t, name)``; only the kept entries of ``Δθ`` are computed.
- OnTIES (Eq. 5–7): ``θ ← θ + (1 − α)·F_K(Δθ) ⊕ α·T``, ``F_K`` the exact top-p of ``|Δθ|``,
  ``⊕`` the TIES disjoint merge of ``omotool.merging`` on the entries where ``T`` is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from omotool.merging import (
    bernoulli_indices,
    dare,
    disjoint_merge,
    keyed_generator,
    magnitude,
    magnitude_topk_indices,
    rescale,
)
from omotool.optim.distributed import sharded_magnitude_mask
from omotool.optim.functional import (
    MERGE_RULES,
    Direction,
    MergeContext,
    MergeOptions,
    MergeRule,
    StepStats,
)

if TYPE_CHECKING:
    from omotool.optim.task_vector import FlatDelta


def register(rule: MergeRule, help: str) -> MergeRule:
    """Add ``rule`` to ``MERGE_RULES`` under its name."""
    return MERGE_RULES.register(rule.name, help=help)(rule)


# -- OnDARE -------------------------------------------------------------------------------------
def dare_reference_term(tau: torch.Tensor, name: str, options: MergeOptions) -> torch.Tensor:
    """``T = clip(rescale(F_R(τ_r)))`` with a mask keyed by ``(seed, "tau", name)``."""
    generator = keyed_generator(options.seed, "tau", name)
    reference = dare(tau, options.reserve_p, generator, options.resolved_rescale)
    if options.tau_clip is not None:
        reference.clamp_(-options.tau_clip, options.tau_clip)
    return reference


def dare_update_indices(numel: int, context: MergeContext, device: torch.device) -> torch.Tensor:
    """``DareDraw`` from a keyed torch generator (``sparsify.bernoulli_indices``): the whole
    tensor's gaps, this shard's part kept."""
    options, shard = context.options, context.shard
    generator = keyed_generator(options.seed, "update", context.step, context.name, device=device)
    whole = shard.numel if shard is not None else numel
    index = bernoulli_indices(whole, options.reserve_p, generator, device=device)
    return shard.local_indices(index, numel) if shard is not None else index


def add_dare_reference_(
    flat: torch.Tensor, reference: FlatDelta | None, options: MergeOptions, stats: StepStats
) -> None:
    """``θ ← θ + α·T`` (the second term of Eq. 4)."""
    alpha = options.alpha
    if reference is None or alpha <= 0:
        return
    values = reference.flat_values()
    if reference.indices is None:
        flat.add_(values, alpha=alpha)
    else:
        flat.index_add_(0, reference.indices, values, alpha=alpha)
    stats.tau_sq += alpha**2 * reference.sq_norm


def merge_dare_(
    param: torch.Tensor, direction: Direction, reference: FlatDelta | None, context: MergeContext
) -> None:
    """``θ ← θ + (1 − α)·F_R(Δθ) + α·T`` (Eq. 3, 4), computing ``Δθ`` only where kept.

    With a ``shard``, the mask is drawn over the whole tensor and this shard's part is used;
    ``context.draw`` (default ``dare_update_indices``) draws it.
    """
    options, stats = context.options, context.stats
    flat, p, alpha = param.view(-1), options.reserve_p, options.alpha
    if p >= 1:
        kept_values = direction(None).reshape(-1)
        flat.add_(kept_values, alpha=1 - alpha)
    else:
        index = (context.draw or dare_update_indices)(flat.numel(), context, param.device)
        mode = options.resolved_rescale
        if mode == "l1":
            dense = direction(None).reshape(-1)
            kept_values = rescale(dense[index], dense, mode, p)
        else:
            kept_values = rescale(direction(index), torch.empty(0), mode, p)
        flat.index_add_(0, index, kept_values, alpha=1 - alpha)
    stats.entries += flat.numel()
    stats.kept += kept_values.numel()
    stats.update_sq += (1 - alpha) ** 2 * float(torch.dot(kept_values, kept_values))
    add_dare_reference_(flat, reference, options, stats)


# -- OnTIES -------------------------------------------------------------------------------------
def ties_reference_term(tau: torch.Tensor, name: str, options: MergeOptions) -> torch.Tensor:
    """``T = rescale(F_K(τ_r))`` (TIES never clips)."""
    return magnitude(tau, options.reserve_p, options.resolved_rescale)


def merge_ties_(
    param: torch.Tensor, direction: Direction, reference: FlatDelta | None, context: MergeContext
) -> None:
    """``θ ← θ + (1 − α)·F_K(Δθ) ⊕ α·T`` (Eq. 5–7) with the shared TIES disjoint merge.

    With a ``shard``, ``F_K`` is the top p of the whole tensor (see ``optim.distributed``).
    """
    options, shard, workspace = context.options, context.shard, context.workspace
    p = options.reserve_p
    update = direction(None).reshape(-1)  # TIES needs every |Δθ| to find the top p
    if shard is not None:
        kept_index = torch.nonzero(sharded_magnitude_mask(update, p, shard)).flatten()
    elif workspace is not None:
        scratch = workspace.get("magnitudes", update), workspace.get("mask", update, torch.bool)
        kept_index = magnitude_topk_indices(update, p, *scratch)
    else:
        kept_index = magnitude_topk_indices(update, p)
    kept = update.index_select(0, kept_index)
    apply_ties_(param.view(-1), kept_index, kept, update, reference, options, context.stats)


def apply_ties_(
    flat: torch.Tensor,
    kept_index: torch.Tensor,
    kept: torch.Tensor,
    update: torch.Tensor | None,
    reference: FlatDelta | None,
    options: MergeOptions,
    stats: StepStats,
) -> None:
    """Add ``(1 − α)·F_K(Δθ) ⊕ α·T`` to ``flat``, given ``F_K``'s sorted ``kept_index`` and
    ``kept = Δθ[kept_index]`` (``update``, the whole ``Δθ``, is only needed by the l1 rescale).
    """
    p, alpha = options.reserve_p, options.alpha
    whole = update if update is not None else torch.empty(0)
    kept_values = rescale(kept, whole, options.resolved_rescale, p)
    stats.entries += flat.numel()
    stats.kept += kept_index.numel()
    if reference is None:
        flat.index_add_(0, kept_index, kept_values, alpha=1 - alpha)
        stats.update_sq += (1 - alpha) ** 2 * float(kept_values.square().sum())
        return
    # F_K(Δθ) where T is kept: both index lists are sorted, so membership is a searchsorted.
    tau_index, tau_values = reference.flat_indices(), reference.flat_values()
    if kept_index.numel():
        position = torch.searchsorted(kept_index, tau_index).clamp_(max=kept_index.numel() - 1)
        present = kept_index.index_select(0, position) == tau_index
        update_at_tau = torch.where(present, kept_values.index_select(0, position), 0.0)
    else:  # a shard may hold none of the whole tensor's top p
        position = torch.zeros_like(tau_index)
        present = torch.zeros_like(tau_index, dtype=torch.bool)
        update_at_tau = torch.zeros_like(tau_values)
    merged, agree = disjoint_merge(
        torch.stack([tau_values, update_at_tau]),
        [alpha, 1 - alpha],
        election=options.election,
        return_mask=True,
    )
    alone = kept_values.clone()
    alone[position[present]] = 0  # those entries arrive through `merged`
    flat.index_add_(0, kept_index, alone, alpha=1 - alpha)
    flat.index_add_(0, tau_index, merged)
    dropped = present & ~agree[1]
    stats.overlap += int(present.sum())
    stats.conflicts += int(dropped.sum())
    stats.update_sq += (1 - alpha) ** 2 * (
        float(kept_values.square().sum()) - float(update_at_tau[dropped].square().sum())
    )
    stats.tau_sq += alpha**2 * float(tau_values[agree[0]].square().sum())


register(MergeRule("none", "none"), help="plain AdamW, no merging")
register(
    MergeRule("dare", "inverse", dare_reference_term, merge_dare_),
    help="OnDARE: random drop of the update, plus alpha * T",
)
register(
    MergeRule("ties", "none", ties_reference_term, merge_ties_, reads_whole_update=True),
    help="OnTIES: top-p of the update, TIES merge with alpha * T",
)
METHODS = tuple(MERGE_RULES.names())
MERGING_METHODS = tuple(name for name in METHODS if MERGE_RULES.get(name).merges)
