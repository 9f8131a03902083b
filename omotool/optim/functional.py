"""The online-merging AdamW step as pure functions over tensors (cf. ``torch/optim/adamw.py``).

For one parameter ``θ`` (float32 working copy) with gradient ``g`` at step ``t``:

Adam, with ``torch.optim.AdamW``'s conventions::

    θ ← θ·(1 − η·λ)                                  decoupled weight decay, before the update
    m ← β1·m + (1 − β1)·g        v ← β2·v + (1 − β2)·g²
    Δθ = −η/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

Step-K (Alg. 2): on steps with ``t mod K ≠ 0``: ``θ ← θ + Δθ``, ``c ← c + Δθ`` (plain Adam,
applied updates cached); on ``t mod K = 0``: ``θ ← θ − c``, ``Δθ ← Δθ + c``, ``c ← 0``, merge.

Merge (Eq. 2: ``θ ← θ + F(Δθ) ⊕ F(τ_r)``), with ``T = F(τ_r)`` fixed at the start
(``reference_tensor``):

- OnDARE (Eq. 3, 4): ``θ ← θ + (1 − α)·F_R(Δθ) + α·T``, ``F_R`` a fresh Bernoulli(p) mask every
  step from a generator keyed by ``(seed, "update", t, name)``; only the kept entries of
  ``Δθ`` are ever computed.
- OnTIES (Eq. 5–7): ``θ ← θ + (1 − α)·F_K(Δθ) ⊕ α·T``, ``F_K`` the exact top-p of ``|Δθ|``,
  ``⊕`` the TIES disjoint merge of ``omotool.merging`` (elected sign per entry, entries that
  disagree with it dropped) on the entries where ``T`` is kept; elsewhere ``F_K(Δθ)`` is alone
  and always agrees with itself.

This module holds the options, the shared Adam arithmetic and the readable per-tensor step
(``online_merging_adamw_``: the ``reference`` backend, the spec the others are tested
against). The other backends of ``OnlineMergingAdamW``: ``cpu_backend`` (torch's fused AdamW
plus numba kernels), ``torch_backend`` (sync-free tensor ops, any device) and
``triton_backend`` (fused Triton kernels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from omotool.errors import UsageError
from omotool.merging import (
    RESCALES,
    bernoulli_indices,
    dare,
    disjoint_merge,
    key_seed,
    keyed_generator,
    magnitude,
    magnitude_topk_indices,
    rescale,
)
from omotool.merging.consensus import ELECTIONS
from omotool.optim.distributed import Shard, sharded_magnitude_mask
from omotool.optim.task_vector import FlatDelta
from omotool.registry import Registry

METHODS = ("none", "dare", "ties")
DEFAULT_RESCALE = {"none": "none", "dare": "inverse", "ties": "none"}
DARE_DRAWS = ("generator", "chunks")


@dataclass(frozen=True)
class MergeOptions:
    """How updates are merged with the SFT task vector (see module docstring).

    - ``method``: ``none`` (AdamW), ``dare`` (OnDARE) or ``ties`` (OnTIES).
    - ``reserve_p``: fraction ``p`` of entries kept by ``F`` (of ``Δθ`` and of ``τ_r``).
    - ``alpha``: weight ``α`` of the SFT delta; ``1 − α`` weighs the update.
    - ``online_step``: ``K`` of step-K merging; 1 merges at every step.
    - ``rescale``: survivors of ``F`` scaled by ``1/p`` (``inverse``, the released code's
      dropout, default for DARE), left as they are (``none``, the paper's text, default for
      TIES), or scaled to the dense L1 norm (``l1``); applied to ``Δθ`` and ``τ_r`` alike.
    - ``election``: TIES sign election on ``T + F(Δθ)`` (``unweighted``, the released code)
      or on ``α·T + (1 − α)·F(Δθ)`` (``weighted``, the paper's Eq. 7).
    - ``tau_clip``: DARE clamps ``T`` to ``[−c, c]`` after rescaling (released code: 1);
      ``None`` disables. TIES never clips.
    - ``seed``: keys every random mask, with the step and the parameter name.
    - ``dare_draw``: how OnDARE draws ``Δθ``'s mask, both Bernoulli(p) and keyed by (seed,
      step, name): ``generator`` (``sparsify.bernoulli_indices`` from a keyed torch generator;
      the ``reference`` and ``torch`` backends) or ``chunks`` (``kernels.dare_kept_indices``,
      drawn per chunk inside the CPU kernels; the ``cpu`` backend sets it for its steps).
    """

    method: str = "dare"
    reserve_p: float = 0.01
    alpha: float = 1e-7
    online_step: int = 1
    rescale: str | None = None
    election: str = "unweighted"
    tau_clip: float | None = 1.0
    seed: int = 0
    dare_draw: str = "generator"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r} is not one of {', '.join(METHODS)}.")
        if not 0.0 < self.reserve_p <= 1.0:
            raise UsageError(f"reserve_p must be in (0, 1] (fraction kept), got {self.reserve_p}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha}.")
        if not isinstance(self.online_step, int) or self.online_step < 1:
            raise UsageError(f"online_step must be a positive integer, got {self.online_step}.")
        if self.rescale is not None and self.rescale not in RESCALES:
            raise UsageError(f"rescale {self.rescale!r} is not one of {', '.join(RESCALES)}.")
        if self.election not in ELECTIONS:
            raise UsageError(f"election {self.election!r} is not one of {', '.join(ELECTIONS)}.")
        if self.dare_draw not in DARE_DRAWS:
            raise UsageError(f"dare_draw {self.dare_draw!r} is not one of {', '.join(DARE_DRAWS)}.")
        if self.tau_clip is not None and self.tau_clip <= 0:
            raise UsageError(f"tau_clip must be positive or None, got {self.tau_clip}.")

    @property
    def resolved_rescale(self) -> str:
        return self.rescale or DEFAULT_RESCALE[self.method]

    @property
    def merges(self) -> bool:
        return self.method != "none"


@dataclass
class StepStats:
    """Counts and squared norms summed over the tensors of one step (for logging)."""

    entries: int = 0  # entries of Δθ considered for merging
    kept: int = 0  # entries of Δθ kept by F
    overlap: int = 0  # kept entries of Δθ where T is kept too (TIES)
    conflicts: int = 0  # of those, entries dropped by the sign election (TIES)
    update_sq: float = 0.0  # ‖applied (1 − α)·F(Δθ)‖²
    tau_sq: float = 0.0  # ‖applied α·T‖²
    merged: bool = False  # whether this step merged (false on the K − 1 plain steps)

    def as_dict(self, skipped_steps: int) -> dict[str, float]:
        """Metric names as logged by ``train`` (reads device tensors: the one host sync)."""
        entries, kept, conflicts = float(self.entries), float(self.kept), float(self.conflicts)
        return {
            "merge/kept_fraction": kept / entries if entries else 0.0,
            "merge/sign_conflict_fraction": conflicts / kept if kept else 0.0,
            "merge/update_norm": math.sqrt(float(self.update_sq)),
            "merge/tau_norm": math.sqrt(float(self.tau_sq)),
            "merge/skipped_steps": float(skipped_steps),
        }

    def select(self, keep: torch.Tensor | None, old: StepStats) -> StepStats:
        """These figures where ``keep`` (a 0-d bool on the device), else ``old``'s; no sync.

        ``keep is None``: these figures. Used by the sync-free path, which cannot know on the
        host whether a step was skipped.
        """
        if keep is None:
            return self
        figures = {}
        for field in STAT_FIELDS:
            new, before = getattr(self, field), getattr(old, field)
            figures[field] = torch.where(
                keep, _device_scalar(new, keep.device), _device_scalar(before, keep.device)
            )
        return StepStats(**figures, merged=True)


STAT_FIELDS = ("entries", "kept", "overlap", "conflicts", "update_sq", "tau_sq")


def _device_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 0-d tensor on ``device``: a fill, never a host-to-device copy."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)


def reference_tensor(tau: torch.Tensor, name: str, options: MergeOptions) -> torch.Tensor:
    """``T = F(τ_r)`` for one whole parameter, fixed for the run (dense float32).

    DARE: ``clip(rescale(F_R(τ_r)))`` with a mask keyed by ``(seed, "tau", name)``;
    TIES: ``rescale(F_K(τ_r))``.
    """
    p, mode = options.reserve_p, options.resolved_rescale
    tau = tau.float()
    if options.method == "dare":
        reference = dare(tau, p, keyed_generator(options.seed, "tau", name), mode)
        if options.tau_clip is not None:
            reference.clamp_(-options.tau_clip, options.tau_clip)
    elif options.method == "ties":
        reference = magnitude(tau, p, mode)
    else:
        raise UsageError(f"method {options.method!r} has no reference term T (no merging).")
    return reference


def adam_moments_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> None:
    """``m ← β1·m + (1 − β1)·g``, ``v ← β2·v + (1 − β2)·g²``, in place (as torch's AdamW)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Δθ = −η/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε)``, flat at ``index`` or full-shaped."""
    m, v = exp_avg, exp_avg_sq
    if index is not None:
        m, v = m.reshape(-1).index_select(0, index), v.reshape(-1).index_select(0, index)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return (m / denom).mul_(-lr / (1 - beta1**step))


class Workspace:
    """Reusable scratch buffers by purpose, grown to the largest request seen (the largest
    tensor; for batched OnTIES, all batched entries together).

    Fresh full-size temporaries are page-faulted in on every step (on this kind of machine a
    new buffer costs several times a pass over an existing one), so the fast path keeps them.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A 1-D buffer of ``like.numel()`` entries (contents undefined)."""
        return self.take(key, like.numel(), dtype, like.device)

    def take(
        self, key: str, numel: int, dtype: torch.dtype, device: torch.device, keep: int = 0
    ) -> torch.Tensor:
        """A 1-D buffer of ``numel`` entries of ``dtype`` on ``device``; contents undefined but
        for the first ``keep``, carried over when the buffer has to grow."""
        buffer = self._buffers.get(key)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.device != device
            or buffer.dtype != dtype
        ):
            grown = torch.empty(numel, dtype=dtype, device=device)
            if keep and buffer is not None:
                grown[:keep].copy_(buffer[:keep])
            self._buffers[key] = buffer = grown
        return buffer[:numel]

    def buffers(self) -> dict[str, torch.Tensor]:
        """The buffers held, by purpose (for ``memory_report``)."""
        return dict(self._buffers)


Direction = Callable[[torch.Tensor | None], torch.Tensor]
"""``direction(index)``: Adam's ``Δθ`` at flat ``index`` (1-D), or whole when ``None``."""

MergeRule = Callable[..., None]
MERGE_RULES: Registry[MergeRule] = Registry("merge rule")


def dare_update_indices(
    numel: int,
    *,
    name: str,
    step: int,
    options: MergeOptions,
    shard: Shard | None,
    device: torch.device,
) -> torch.Tensor:
    """Sorted flat indices of ``Δθ`` kept by OnDARE at ``step`` (local ones under a shard).

    The mask is keyed by ``(seed, "update", step, name)`` and is the whole tensor's
    (``options.dare_draw``: ``chunks`` draws only the chunks that meet the shard).
    """
    if options.dare_draw == "chunks":
        from omotool.optim import kernels

        key = key_seed(options.seed, "update", step, name)
        if shard is None:
            return kernels.dare_kept_indices(numel, options.reserve_p, key).to(device)
        start = shard.offset
        index = kernels.dare_kept_indices(shard.numel, options.reserve_p, key, start, start + numel)
        return (index - start).to(device)
    generator = keyed_generator(options.seed, "update", step, name, device=device)
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


@MERGE_RULES.register("dare", help="OnDARE: random drop of the update, plus alpha * T")
def merge_dare_(
    param: torch.Tensor,
    direction: Direction,
    reference: FlatDelta | None,
    *,
    name: str,
    step: int,
    options: MergeOptions,
    stats: StepStats,
    shard: Shard | None = None,
    workspace: Workspace | None = None,
) -> None:
    """``θ ← θ + (1 − α)·F_R(Δθ) + α·T`` (Eq. 3, 4), computing ``Δθ`` only where kept.

    With a ``shard``, the mask is drawn over the whole tensor and this shard's part is used.
    """
    flat, p, alpha = param.view(-1), options.reserve_p, options.alpha
    if p >= 1:
        kept_values = direction(None).reshape(-1)
        flat.add_(kept_values, alpha=1 - alpha)
    else:
        index = dare_update_indices(
            flat.numel(), name=name, step=step, options=options, shard=shard, device=param.device
        )
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


@MERGE_RULES.register("ties", help="OnTIES: top-p of the update, TIES merge with alpha * T")
def merge_ties_(
    param: torch.Tensor,
    direction: Direction,
    reference: FlatDelta | None,
    *,
    name: str,
    step: int,
    options: MergeOptions,
    stats: StepStats,
    shard: Shard | None = None,
    workspace: Workspace | None = None,
) -> None:
    """``θ ← θ + (1 − α)·F_K(Δθ) ⊕ α·T`` (Eq. 5–7) with the shared TIES disjoint merge.

    With a ``shard``, ``F_K`` is the top p of the whole tensor (see ``optim.distributed``).
    """
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
    apply_ties_(param.view(-1), kept_index, kept, update, reference, options, stats)


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


def online_merging_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    cache: torch.Tensor | None,
    reference: FlatDelta | None,
    *,
    name: str,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    options: MergeOptions,
    stats: StepStats,
    shard: Shard | None = None,
) -> None:
    """One step for one float32 parameter (see module docstring); ``step`` counts from 1.

    ``options.method == "none"``, or a parameter without a τ under ``missing="adamw"``
    (``reference is None`` and ``cache is None``), is exactly ``torch.optim.AdamW``.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    adam_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    if not options.merges:
        # The same operations as torch's single-tensor AdamW, so trajectories match exactly.
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        return

    def direction(index: torch.Tensor | None) -> torch.Tensor:
        return adam_direction(
            exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, index=index
        )

    merge_update_(
        param,
        direction,
        cache,
        reference,
        name=name,
        step=step,
        options=options,
        stats=stats,
        shard=shard,
    )


def merge_update_(
    param: torch.Tensor,
    direction: Direction,
    cache: torch.Tensor | None,
    reference: FlatDelta | None,
    *,
    name: str,
    step: int,
    options: MergeOptions,
    stats: StepStats,
    shard: Shard | None = None,
    workspace: Workspace | None = None,
) -> None:
    """Apply the update ``direction`` to ``param`` merged per ``options``, with step-K.

    ``cache`` (``None`` when K = 1) accumulates the plain updates of the K − 1 steps between
    merges. Used by ``OnlineMergingAdamW`` (Adam's ``Δθ``) and ``OnlineMerging`` (any inner
    optimizer's ``Δθ``).
    """
    if cache is not None:
        update = direction(None)
        if step % options.online_step != 0:  # plain step, applied update cached
            param.add_(update)
            cache.add_(update)
            return
        param.sub_(cache)  # roll back the K − 1 plain steps, merge their sum with this one
        update.add_(cache)
        cache.zero_()

        def direction(index: torch.Tensor | None, update: torch.Tensor = update) -> torch.Tensor:
            return update if index is None else update.reshape(-1)[index]

    stats.merged = True
    MERGE_RULES.get(options.method)(
        param,
        direction,
        reference,
        name=name,
        step=step,
        options=options,
        stats=stats,
        shard=shard,
        workspace=workspace,
    )


def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: torch.Tensor | None = None,
) -> None:
    """torch's fused AdamW kernel on one tensor (``step`` already counts this step); with a
    ``found_inf`` tensor holding 1 it changes nothing (decided on the device, no host read)."""
    torch._fused_adamw_(
        [param], [grad], [exp_avg], [exp_avg_sq], [], [step],
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
        amsgrad=False, maximize=False, found_inf=found_inf,
    )  # fmt: skip
