"""The ``torch`` backend: the online-merging AdamW step in tensor ops that never wait on the
device (any device; what a GPU takes where the ``triton`` backend does not apply).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from omotool.merging import disjoint_merge, kept_count, keyed_generator
from omotool.merging.sparsify import gap_chunk, gap_dtype, geometric_gaps_
from omotool.optim.backends.base import Backend, Keep, TensorStep, register
from omotool.optim.distributed import Shard, sharded_magnitude_mask
from omotool.optim.functional import (
    MERGE_RULES,
    MergeOptions,
    StepStats,
    Workspace,
    fused_adamw_,
    step_k_,
)
from omotool.optim.rules import add_dare_reference_

# Nothing here reads a tensor on the host: the step count that keys the DARE masks and the
# step-K phase is a host integer kept beside the device ``step`` (``host_step``), bias
# corrections are computed from the device ``step``, sizes never depend on values (DARE draws a
# fixed number of gaps and masks the ones past the end; OnTIES selects with ``topk`` and a
# tie-break by prefix counts, and merges densely), a skipped step (``keep`` false on the device)
# is applied as no change by ``torch.where`` and ``_fused_adamw_``'s ``found_inf``, and every
# statistic stays a device tensor until ``StepStats.as_dict``.


def sync_free_step_(
    t: TensorStep,
    grad: torch.Tensor,
    keep: torch.Tensor | None,
    stats: StepStats,
    workspace: Workspace,
) -> None:
    """``cpu.fused_step_`` without host synchronisation (note above), for one tensor.

    ``t.step`` (on the parameter's device) already counts this step unless it is skipped;
    ``t.host_step`` counts it in any case (it keys masks and step-K's phase). ``keep``: a 0-d
    bool on the device, false when this step is skipped (``None``: never skipped). The
    sharded OnTIES threshold is the one part that still synchronises
    (``optim.distributed.sharded_magnitude_mask``).
    """
    param, (exp_avg, exp_avg_sq), step, cache, options = (
        t.work,
        t.moments,
        t.step,
        t.cache,
        t.options,
    )
    lr, weight_decay = t.adam["lr"], t.adam["weight_decay"]
    beta1, beta2, eps = t.adam["beta1"], t.adam["beta2"], t.adam["eps"]
    found_inf = None if keep is None else (~keep).float()
    adam = dict(beta1=beta1, beta2=beta2, eps=eps, found_inf=found_inf)
    if not options.merges:
        fused_adamw_(
            param, grad, exp_avg, exp_avg_sq, step, lr=lr, weight_decay=weight_decay, **adam
        )
        return
    if weight_decay != 0:
        factor = 1 - lr * weight_decay
        param.mul_(factor if keep is None else torch.where(keep, factor, 1.0))
    dense = (
        MERGE_RULES.get(options.method).reads_whole_update
        or cache is not None
        or options.resolved_rescale == "l1"
        or options.reserve_p >= 1
    )
    flat = param.view(-1)
    if dense:  # Δθ in a zeroed buffer; on a skipped step the kernel leaves it zero
        update = workspace.get("update", param).view_as(param).zero_()
        fused_adamw_(update, grad, exp_avg, exp_avg_sq, step, lr=lr, weight_decay=0.0, **adam)
        update = update.view(-1)
        if cache is not None and not step_k_(
            flat, update, cache.view(-1), t.host_step, options.online_step, keep
        ):
            return
        direction = None
    else:  # the moments only; Δθ is computed at the kept entries
        fused_adamw_(param, grad, exp_avg, exp_avg_sq, step, lr=0.0, weight_decay=0.0, **adam)
        update = None

        def direction(index: torch.Tensor) -> torch.Tensor:
            return _adam_direction_at(exp_avg, exp_avg_sq, step, index, lr, beta1, beta2, eps)

    stats.merged = True
    RULES[options.method](SyncFreeMerge(t, flat, update, direction, keep, stats, workspace))


def _adam_direction_at(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    index: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """``adam_direction`` at flat ``index`` with the bias corrections of the device ``step``
    (computed in float64 on the device, as the host computes them)."""
    t = step.to(torch.float64)
    correction1 = 1 - torch.pow(beta1, t)
    correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    m = exp_avg.reshape(-1).index_select(0, index)
    v = exp_avg_sq.reshape(-1).index_select(0, index)
    denom = (v.sqrt() / correction2_sqrt.float()).add_(eps)
    return (m / denom).mul_((-lr / correction1).float())


def _l1_scale(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``rescale``'s l1 factor ``‖x‖₁ / ‖F(x)‖₁`` (1 when either is ~0), on the device."""
    tiny = (before < 1e-12) | (after < 1e-12)
    return torch.where(tiny, torch.ones_like(before), before / torch.where(tiny, 1.0, after))


def sync_free_dare_indices(
    numel: int,
    *,
    name: str,
    step: int,
    options: MergeOptions,
    shard: Shard | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, valid)``: ``dare_update_indices`` padded to a size known on the host.

    The same gaps as ``bernoulli_indices`` (one draw of ``gap_chunk`` gaps); entries past the
    tensor (or outside this shard) have ``valid`` false and index 0. ``bernoulli_indices``
    draws more gaps when the first draw ends before the tensor does (the expected count plus
    six standard deviations fell short: probability about 1e-9 per tensor and step); this path
    cannot look, and keeps nothing past the last gap drawn.
    """
    p = options.reserve_p
    whole = shard.numel if shard is not None else numel
    generator = keyed_generator(options.seed, "update", step, name, device=device)
    gaps = torch.empty(gap_chunk(whole, p), device=device, dtype=gap_dtype(p))
    geometric_gaps_(gaps.uniform_(generator=generator), p)
    positions = torch.cumsum(gaps, dim=0, dtype=torch.float64).add_(-1.0)
    index = positions.to(torch.long)
    valid = positions < whole
    if shard is not None:
        index = index - shard.offset
        valid &= (index >= 0) & (index < numel)
    return torch.where(valid, index, 0), valid


@dataclass
class SyncFreeMerge:
    """One tensor's merge in the sync-free step (after Adam and step-K): its record, ``θ``
    flat, the whole ``Δθ`` (``update``) or ``direction`` (``Δθ`` at given indices, when only
    the kept entries are computed), ``keep`` (a 0-d bool on the device, false on a skipped step;
    ``None``: never skipped), the statistics and scratch buffers."""

    t: TensorStep
    flat: torch.Tensor
    update: torch.Tensor | None
    direction: Callable[[torch.Tensor], torch.Tensor] | None
    keep: torch.Tensor | None
    stats: StepStats
    workspace: Workspace


def _sync_free_dare_(m: SyncFreeMerge) -> None:
    """OnDARE (``merge_dare_``) without a host sync; ``update`` is the whole Δθ or None."""
    t, flat, update, direction, keep, stats = m.t, m.flat, m.update, m.direction, m.keep, m.stats
    reference, options = t.reference, t.options
    p, alpha, mode = options.reserve_p, options.alpha, options.resolved_rescale
    if p >= 1:
        assert update is not None
        kept_values = update
        flat.add_(kept_values, alpha=1 - alpha)
        stats.kept += flat.numel()
    else:
        index, valid = sync_free_dare_indices(
            flat.numel(), name=t.name, step=t.host_step, options=options, shard=t.shard,
            device=flat.device,
        )  # fmt: skip
        if keep is not None:
            valid &= keep
        raw = update.index_select(0, index) if update is not None else direction(index)
        kept_values = torch.where(valid, raw, 0.0)
        if mode == "l1":
            assert update is not None
            kept_values = kept_values * _l1_scale(update.abs().sum(), kept_values.abs().sum())
        elif mode == "inverse":
            kept_values = kept_values / p
        flat.index_add_(0, index, kept_values, alpha=1 - alpha)
        stats.kept += valid.sum()
    stats.entries += flat.numel()
    stats.update_sq += (1 - alpha) ** 2 * torch.dot(kept_values, kept_values)
    if reference is None or alpha <= 0:
        return
    if keep is None:
        add_dare_reference_(flat, reference, options, stats)
        return
    values = reference.flat_values() * torch.where(keep, alpha, 0.0)
    if reference.indices is None:
        flat.add_(values)
    else:
        flat.index_add_(0, reference.indices, values)
    stats.tau_sq += alpha**2 * reference.sq_norm


def sync_free_topk_mask(
    update: torch.Tensor, density: float, workspace: Workspace | None = None
) -> torch.Tensor:
    """``magnitude_mask`` of the 1-D ``update`` with no host sync: exactly ``k`` entries of
    largest ``|x|``, ties at the threshold to the lowest indices (prefix counts of the ties).

    The threshold is the smallest of ``torch.topk``'s ``k`` values (a radix select on CUDA).
    """
    n = update.numel()
    k = kept_count(n, density)
    if workspace is not None:
        magnitudes = torch.abs(update, out=workspace.get("magnitudes", update))
    else:
        magnitudes = update.abs()
    threshold = torch.topk(magnitudes, k, sorted=False).values.min()
    above = magnitudes > threshold
    ties = magnitudes == threshold
    places = k - above.sum()  # ties to keep, counted on the device
    rank = torch.cumsum(ties, dim=0, dtype=torch.int32 if n < 2**31 else torch.long)
    return above | (ties & (rank <= places))


def _sync_free_ties_(m: SyncFreeMerge) -> None:
    """OnTIES (``merge_ties_`` + ``apply_ties_``) densely, without a host sync.

    Under a ``shard`` the threshold of the whole tensor comes from
    ``sharded_magnitude_mask``, which synchronises (a gather of candidates of data-dependent
    size); everything else does not. ``update``: the whole Δθ (``reads_whole_update``).
    """
    t, flat, update, keep, stats, workspace = m.t, m.flat, m.update, m.keep, m.stats, m.workspace
    assert update is not None
    reference, options, shard = t.reference, t.options, t.shard
    p, alpha = options.reserve_p, options.alpha
    if shard is not None:
        mask = sharded_magnitude_mask(update, p, shard).view(-1)
        stats.kept += mask.sum()
    else:
        mask = sync_free_topk_mask(update, p, workspace)
        stats.kept += kept_count(update.numel(), p)
    stats.entries += flat.numel()
    kept = torch.where(mask, update, 0.0)
    mode = options.resolved_rescale
    if mode == "inverse":
        kept = kept / p
    elif mode == "l1":
        kept = kept * _l1_scale(update.abs().sum(), kept.abs().sum())
    kept_sq = torch.dot(kept, kept)
    if reference is None:
        flat.add_(kept, alpha=1 - alpha)
        stats.update_sq += (1 - alpha) ** 2 * kept_sq
        return
    dense_tau = reference.indices is None
    tau_values = reference.flat_values()
    if dense_tau:
        present, update_at_tau = mask, kept
    else:
        tau_index = reference.indices.long()
        present = mask.index_select(0, tau_index)
        update_at_tau = kept.index_select(0, tau_index)
    weights = torch.stack(
        [torch.full((), alpha, device=flat.device), torch.full((), 1 - alpha, device=flat.device)]
    )
    merged, agree = disjoint_merge(
        torch.stack([tau_values, update_at_tau]), weights, election=options.election,
        return_mask=True,
    )  # fmt: skip
    if keep is not None:
        merged = torch.where(keep, merged, 0.0)
    dropped = present & ~agree[1]
    stats.overlap += present.sum()
    stats.conflicts += dropped.sum()
    stats.update_sq += (1 - alpha) ** 2 * (
        kept_sq - torch.where(dropped, update_at_tau, 0.0).square().sum()
    )
    stats.tau_sq += alpha**2 * torch.where(agree[0], tau_values, 0.0).square().sum()
    if dense_tau:  # every entry arrives through `merged`
        flat.add_(merged)
    else:
        alone = kept.index_fill_(0, tau_index, 0.0)  # those entries arrive through `merged`
        flat.add_(alone, alpha=1 - alpha)
        flat.index_add_(0, tau_index, merged)


RULES = {"dare": _sync_free_dare_, "ties": _sync_free_ties_}
"""Each merging method's sync-free step (``SyncFreeBackend.rules``)."""


@register("torch", help="tensor ops that never wait on the device, any device")
class SyncFreeBackend(Backend):
    sync_free = True
    rules = tuple(RULES)

    def step(
        self, tensors: list[TensorStep], *, keep: Keep, stats: StepStats, workspace: Workspace
    ) -> None:
        for t in tensors:
            sync_free_step_(t, t.grad.float(), keep, stats, workspace)
            t.write_back()
