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

This module holds the options' checks (``MergeOptions``; they are declared in
``optim.options``), the shared Adam arithmetic and the readable per-tensor step
(``online_merging_adamw_``: the ``reference`` backend, the spec the others are tested
against; the merge rules themselves are in ``optim.rules``). The backends of
``OnlineMergingAdamW`` (``optim.backends``, one ``Backend.step`` each): ``reference`` (this
module's step), ``cpu`` (torch's fused AdamW plus numba kernels), ``torch`` (sync-free tensor
ops, any device) and ``triton`` (fused Triton kernels).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from omotool.config import check_declared, check_types
from omotool.errors import UsageError
from omotool.optim.distributed import Shard
from omotool.optim.options import MergeFields
from omotool.optim.task_vector import FlatDelta
from omotool.registry import Registry

_RETIRED_OPTIONS = ("dare_draw",)  # saved by older versions: a backend's detail, not an option


Direction = Callable[[torch.Tensor | None], torch.Tensor]
"""``direction(index)``: Adam's ``Δθ`` at flat ``index`` (1-D), or whole when ``None``."""


DareDraw = Callable[[int, "MergeContext", torch.device], torch.Tensor]
"""``draw(numel, context, device)``: sorted flat indices of ``Δθ`` kept by OnDARE at
``context.step``, keyed by ``(seed, "update", step, name)`` (local ones under a shard): the
whole tensor's Bernoulli(p) mask. Each backend has one way to draw it (``dare_update_indices``:
from a keyed torch generator)."""


@dataclass
class MergeContext:
    """What a rule's ``merge`` needs of one parameter's step besides its tensors: its ``name``
    and ``step`` (which key the masks), the ``options``, the ``stats`` to add to, the FSDP
    ``shard`` (``None``: the whole tensor), scratch buffers (``workspace``) and the backend's
    OnDARE mask ``draw`` (``None``: ``dare_update_indices``)."""

    name: str
    step: int
    options: MergeOptions
    stats: StepStats
    shard: Shard | None = None
    workspace: Workspace | None = None
    draw: DareDraw | None = None


MergeFn = Callable[[torch.Tensor, Direction, "FlatDelta | None", MergeContext], None]
"""``merge(θ, direction, T, context)``: ``θ ← θ + merge(Δθ, T)`` for one parameter."""


@dataclass(frozen=True)
class MergeRule:
    """One online merge rule: ``name`` (``method=``), ``default_rescale`` (``rescale=None``),
    ``reference_term`` (``T = F(τ_r)`` of one whole parameter), ``merge`` (the reference
    step; a rule with neither is plain AdamW) and ``reads_whole_update`` (whether it needs
    every entry of ``Δθ``, as a top-p does, or only those it keeps)."""

    name: str
    default_rescale: str
    reference_term: Callable[[torch.Tensor, str, MergeOptions], torch.Tensor] | None = None
    merge: MergeFn | None = None
    reads_whole_update: bool = False

    @property
    def merges(self) -> bool:
        return self.merge is not None


MERGE_RULES: Registry[MergeRule] = Registry("online merge method", "omotool.optim.rules")
"""The rules by name (``optim.rules`` registers them, imported on the first lookup: none,
dare, ties)."""


def reference_tensor(tau: torch.Tensor, name: str, options: MergeOptions) -> torch.Tensor:
    """``T = F(τ_r)`` for one whole parameter, fixed for the run (dense float32), by the rule
    of ``options.method``."""
    term = MERGE_RULES.get(options.method).reference_term
    if term is None:
        raise UsageError(f"method {options.method!r} has no reference term T (no merging).")
    return term(tau.float(), name, options)


@dataclass(frozen=True)
class MergeOptions(MergeFields):
    """How updates are merged with the SFT task vector: the options declared in
    ``omotool.optim.options.MergeFields`` (default, help, allowed values, the methods that
    read each), with their checks; the equations are this module's docstring."""

    def validate(self) -> None:
        """Refuse an unknown method (naming the close ones), a value of the wrong type, or
        outside its declared choices or bounds."""
        MERGE_RULES.get(self.method)
        check_types(self)
        check_declared(self, keywords=True)

    @property
    def resolved_rescale(self) -> str:
        return self.rescale or MERGE_RULES.get(self.method).default_rescale

    @property
    def merges(self) -> bool:
        return MERGE_RULES.get(self.method).merges

    @classmethod
    def from_saved(
        cls, saved: Mapping[str, Any], unsaved: MergeOptions | None = None
    ) -> MergeOptions:
        """Options as ``dataclasses.asdict`` saved them with a checkpoint. Keys of older
        versions that were no merge options (``_RETIRED_OPTIONS``) are dropped; options older
        versions did not save (``missing``) are taken from ``unsaved`` (the resuming
        optimizer's: nothing to compare them with), else their defaults."""
        kept = {k: v for k, v in saved.items() if k not in _RETIRED_OPTIONS}
        if unsaved is not None:
            kept = {**dataclasses.asdict(unsaved), **kept}
        return cls(**kept)


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
        param, direction, cache, reference, MergeContext(name, step, options, stats, shard)
    )


def merge_update_(
    param: torch.Tensor,
    direction: Direction,
    cache: torch.Tensor | None,
    reference: FlatDelta | None,
    context: MergeContext,
) -> None:
    """Apply the update ``direction`` to ``param`` merged per ``context.options`` (the rule's
    reference ``merge``), with step-K (``step_k_``; ``cache`` is ``None`` when K = 1).

    Used by the ``reference`` and ``cpu`` backends (Adam's ``Δθ``) and ``OnlineMerging`` (any
    inner optimizer's ``Δθ``).
    """
    options = context.options
    if cache is not None:
        update = direction(None).view(-1)
        if not step_k_(param.view(-1), update, cache.view(-1), context.step, options.online_step):
            return

        def direction(index: torch.Tensor | None, update: torch.Tensor = update) -> torch.Tensor:
            return update if index is None else update[index]

    context.stats.merged = True
    merge = MERGE_RULES.get(options.method).merge
    assert merge is not None, "merge_update_ is called for merging rules only"
    merge(param, direction, reference, context)


def step_k_(
    flat: torch.Tensor,
    update: torch.Tensor,
    cache: torch.Tensor,
    step: int,
    online_step: int,
    keep: torch.Tensor | None = None,
) -> bool:
    """Step-K (Alg. 2) on flat ``θ``, ``Δθ`` and cache ``c``; whether this step merges.

    ``t mod K ≠ 0``: ``θ ← θ + Δθ``, ``c ← c + Δθ`` (plain step, applied update cached), no
    merge. ``t mod K = 0``: ``θ ← θ − c``, ``Δθ ← Δθ + c``, ``c ← 0`` (the K − 1 plain steps
    rolled back, their sum merged with this one). ``keep``: a 0-d bool on the device, false
    on a skipped step (``Δθ`` is then 0), which rolls nothing back and keeps ``c`` (no sync).
    """
    if step % online_step != 0:
        flat.add_(update)
        cache.add_(update)
        return False
    rolled = cache if keep is None else torch.where(keep, cache, 0.0)
    flat.sub_(rolled)
    update.add_(rolled)
    if keep is None:
        cache.zero_()
    else:  # emptied, or kept whole by a skipped step (cache is finite: × 1 is exact)
        cache.mul_((~keep).float())
    return True


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
