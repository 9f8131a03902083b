"""The ``triton`` backend: one tensor's online-merging AdamW step in fused Triton kernels.

The step of ``torch_backend.sync_free_online_merging_adamw_`` (no host synchronisation; the
skip flag, the step count and the statistics stay on the device), in few passes:

- OnDARE: one kernel (``dare_adamw_kernel``) does the moments, the Philox mask keyed by
  ``(seed, step, name)`` and the global flat offset, the merge and the write-back to a
  bf16/fp16 parameter; a sparse ``T`` adds ``α·T`` at its entries in a second, small kernel.
  The mask follows the same law as the other backends' (i.i.d. Bernoulli(p)), drawn from
  another generator: the kept entries differ, their distribution does not.
- OnTIES: moments and ``Δθ`` into a scratch buffer with the histogram of the first radix
  digit of ``|Δθ|``, two more histogram passes (an exact radix select of the ``k``-th largest
  ``|Δθ|``: no sort, no ``nonzero``, cost independent of the values), one pass counting ties
  at the threshold, and the merge pass (kept = above the threshold or one of the first ties
  in index order, as ``merging.magnitude_mask``); a sparse ``T`` is merged at its entries in
  a small last kernel.

Under FSDP2 each rank steps its shard: DARE masks are keyed by global offsets, and the
OnTIES histograms are summed over the ranks (``distributed.all_reduce_on_device``) with ties
numbered across ranks, so the kept entries are those of the whole tensor.
Unsupported here, refused by name (``unsupported``): step-K (``online_step > 1``) and the
``l1`` rescale (whole-tensor norms). Tensors must be on a CUDA device,
or on the CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter: how tests run it).
"""

from __future__ import annotations

import math
import os

import torch

from omotool.errors import UsageError
from omotool.merging import kept_count, key_seed
from omotool.optim.distributed import Shard, all_reduce_on_device, sum_over_lower_ranks
from omotool.optim.functional import MergeOptions, StepStats, Workspace
from omotool.optim.task_vector import FlatDelta

_DIGIT_BITS = (11, 10, 10)  # radix-select digits of |Δθ|'s 31 bits, most significant first
_SHIFTS = tuple(31 - sum(_DIGIT_BITS[: i + 1]) for i in range(len(_DIGIT_BITS)))  # 20, 10, 0
RADIX_BINS = sum(1 << width for width in _DIGIT_BITS)


PARTIAL_FIELDS = ("kept", "kept_sq", "overlap", "conflicts", "dropped_sq", "tau_sq")


class StepPartials:
    """The kernels' per-program statistics of one step, in one device buffer (a row of
    ``PARTIAL_FIELDS`` per program), reduced once per step by ``fold``: no torch op per tensor.

    The buffer (``workspace_partials``) grows during the first step to the step's rows, about
    ``24 / BLOCK`` bytes per parameter.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace, self.rows, self.device = workspace, 0, None

    def take(self, rows: int, device: torch.device) -> torch.Tensor:
        """``rows`` fresh rows (contents undefined) for one kernel launch."""
        self.device = device
        width = len(PARTIAL_FIELDS)
        start, self.rows = self.rows, self.rows + rows
        buffer = self.workspace.take(
            "partials", self.rows * width, torch.float32, device, keep=start * width
        )
        return buffer[start * width :].view(rows, width)

    def fold(self, stats: StepStats, alpha: float) -> None:
        """Add the step's sums to ``stats`` (``update_sq`` and ``tau_sq`` weighted by
        ``(1 − α)²`` and ``α²``)."""
        if not self.rows:
            return
        width = len(PARTIAL_FIELDS)
        buffer = self.workspace.take("partials", self.rows * width, torch.float32, self.device)
        sums = buffer.view(self.rows, width).sum(dim=0, dtype=torch.float64)
        kept, kept_sq, overlap, conflicts, dropped_sq, tau_sq = sums.unbind()
        stats.kept += kept
        stats.update_sq += (1 - alpha) ** 2 * (kept_sq - dropped_sq)
        stats.overlap += overlap
        stats.conflicts += conflicts
        stats.tau_sq += alpha**2 * tau_sq


def triton_import_error() -> str | None:
    """Why ``import triton`` fails, or ``None`` when it works."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is in the dev and gpu extras
        return str(exc)
    return None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable_device(device: torch.device) -> bool:
    """Whether Triton kernels run on tensors of ``device`` in this process."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def unsupported(options: MergeOptions) -> str | None:
    """What of ``options`` this backend does not do (``None``: everything)."""
    if options.online_step > 1:
        return "step-K merging (online_step > 1)"
    if options.merges and options.resolved_rescale == "l1":
        return "rescale='l1'"
    return None


def why_not(options: MergeOptions, device: torch.device) -> str | None:
    """Why this backend cannot run ``options`` on tensors of ``device`` (a phrase that follows
    "backend triton"), or ``None`` when it can."""
    error = triton_import_error()
    if error is not None:
        return f"needs Triton ({error}): pip install triton"
    if not usable_device(device):
        return (
            "runs on CUDA GPUs (or on CPU tensors in Triton's interpreter, TRITON_INTERPRET=1, "
            f"slowly), not on {device}"
        )
    reason = unsupported(options)
    return None if reason is None else f"does not support {reason}"


def check_usable(options: MergeOptions, device: torch.device) -> None:
    """Raise ``UsageError`` naming why ``backend="triton"`` cannot run ``options`` on ``device``."""
    reason = why_not(options, device)
    if reason is not None:
        raise UsageError(f"backend='triton' {reason}; use backend='auto'.")


def triton_online_merging_adamw_(
    param: torch.Tensor,
    low: torch.Tensor | None,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    reference: FlatDelta | None,
    workspace: Workspace,
    *,
    host_step: int,
    found_inf: torch.Tensor | None,
    name: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    options: MergeOptions,
    stats: StepStats,
    partials: StepPartials,
    shard: Shard | None = None,
) -> None:
    """One merging step of one tensor (``options.method`` ``dare`` or ``ties``).

    ``param``: the float32 working copy (the parameter or its master); ``low``: the
    bf16/fp16 parameter the kernels also write, or ``None``. ``step`` (device) already counts
    this step unless it is skipped; ``host_step`` counts it in any case and keys the masks.
    ``found_inf``: a float32 0-d device tensor, non-zero to skip the step (``None``: never).
    The kernels' statistics go to ``partials`` (``StepPartials.fold`` adds them to ``stats``
    once the step is done); only host figures (entries, DARE's ``α²·‖T‖²``) go to ``stats``.
    """
    from omotool.optim import triton_kernels as tk

    n = param.numel()
    common = dict(
        lr=lr,
        log_beta1=math.log(beta1) if beta1 > 0 else -math.inf,
        log_beta2=math.log(beta2) if beta2 > 0 else -math.inf,
        beta2=beta2,
        one_minus_beta1=1.0 - beta1,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
    )
    skip = found_inf if found_inf is not None else step
    flags = dict(BLOCK=tk.BLOCK, HAS_SKIP=found_inf is not None)
    low_bf16 = low is not None and low.dtype == torch.bfloat16
    low_ptr = param if low is None else low.view(torch.int16) if low_bf16 else low
    writes = dict(flags, HAS_LOW=low is not None, LOW_BF16=low_bf16)  # kernels writing θ
    alpha, weight = options.alpha, 1.0 - options.alpha
    divisor = options.reserve_p if options.resolved_rescale == "inverse" else 1.0
    decay = 1.0 - lr * weight_decay
    # T enters OnTIES's sign election even with α = 0; OnDARE's term only with α > 0.
    with_tau = reference is not None and (alpha > 0 or options.method == "ties")
    sparse_tau = with_tau and reference.indices is not None
    dense_tau = with_tau and reference.indices is None
    programs = tk.grid(n)[0]
    stats.merged = True
    stats.entries += n
    if options.method == "dare":
        partial = partials.take(programs, param.device)
        tk.dare_adamw_kernel[(programs,)](
            param, low_ptr, grad, exp_avg, exp_avg_sq, step,
            reference.values if dense_tau else param, skip, partial, n,
            shard.offset if shard is not None else 0,
            key_seed(options.seed, "update", host_step, name),
            decay=decay, density=options.reserve_p, divisor=divisor, weight=weight, alpha=alpha,
            DENSE_TAU=dense_tau, **common, **writes,
        )  # fmt: skip
        if sparse_tau:
            count = reference.values.numel()
            tk.dare_tau_kernel[tk.grid(count)](
                param, low_ptr, reference.indices, reference.values, skip, count, alpha,
                **writes,
            )  # fmt: skip
        if reference is not None and alpha > 0:
            stats.tau_sq += alpha**2 * reference.sq_norm
        return
    if options.method != "ties":
        raise UsageError(f"the triton backend merges with dare or ties, not {options.method!r}.")
    device = param.device
    k = kept_count(shard.numel if shard is not None else n, options.reserve_p)
    update = workspace.get("update", param)
    hist = workspace.take("radix_histogram", RADIX_BINS, torch.int32, device)
    hist.zero_()
    first_counts = hist[: 1 << _DIGIT_BITS[0]]
    tk.adam_update_kernel[(programs,)](
        grad, exp_avg, exp_avg_sq, step, update, skip, first_counts, n,
        BINS=first_counts.numel(), SHIFT=_SHIFTS[0], **common, **flags,
    )  # fmt: skip
    select, tie_base = radix_select_(update, k, hist, workspace, shard)
    partial = partials.take(programs, device)
    tk.ties_merge_kernel[(programs,)](
        param, low_ptr, update,
        reference.values if dense_tau else param, skip, select, tie_base, partial, n,
        decay=decay, divisor=divisor, weight=weight, alpha=alpha,
        DENSE_TAU=dense_tau, SPARSE_TAU=sparse_tau,
        WEIGHTED=options.election == "weighted", **writes,
    )  # fmt: skip
    if sparse_tau:
        count = reference.values.numel()
        tau_programs = tk.grid(count)[0]
        tk.ties_tau_kernel[(tau_programs,)](
            param, low_ptr, update, reference.indices, reference.values, skip,
            partials.take(tau_programs, device), count, alpha, weight,
            WEIGHTED=options.election == "weighted", **writes,
        )  # fmt: skip


def radix_select_(
    update: torch.Tensor,
    k: int,
    hist: torch.Tensor,
    workspace: Workspace,
    shard: Shard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ``k``-th largest ``|update|`` by radix select on the device:
    ``(select, tie_base)`` for ``_selected`` in the kernels (see ``topk_mask``).

    ``hist`` holds the first digit's histogram already (``adam_update_kernel`` makes it in
    the same pass as ``Δθ``) and zeros for the other digits. With a ``shard``, ``update`` is
    this rank's part and ``k`` counts over the whole tensor: every histogram is summed over
    the ranks, and ``tie_base`` counts the ties of lower ranks too.
    """
    from omotool.optim import triton_kernels as tk

    n, device = update.numel(), update.device
    programs = tk.grid(n)[0]
    select = workspace.take("radix_select", 2, torch.int64, device)
    start = 0
    for digit, (width, shift) in enumerate(zip(_DIGIT_BITS, _SHIFTS, strict=True)):
        counts = hist[start : start + (1 << width)]
        start += 1 << width
        if digit > 0:
            tk.radix_histogram_kernel[(programs,)](
                update, counts, select, n, BLOCK=tk.BLOCK, BINS=counts.numel(), SHIFT=shift,
                HIGH=_SHIFTS[digit - 1],
            )  # fmt: skip
        if shard is not None:
            all_reduce_on_device(counts, shard.group)
        tk.radix_pick_kernel[(1,)](
            counts, select, k, BINS=counts.numel(), SHIFT=shift, FIRST=digit == 0
        )
    ties = workspace.take("tie_counts", programs, torch.int64, device)
    tk.tie_count_kernel[(programs,)](update, select, ties, n, BLOCK=tk.BLOCK)
    tie_base = torch.cumsum(ties, dim=0).sub_(ties)
    if shard is not None:
        tie_base += sum_over_lower_ranks(ties.sum(), shard.group)
    return select, tie_base


def topk_mask(update: torch.Tensor, density: float) -> torch.Tensor:
    """``merging.magnitude_mask`` of the 1-D ``update`` by this backend's radix select (the
    entries ``F_K`` keeps; for tests and inspection)."""
    from omotool.optim import triton_kernels as tk

    workspace, n = Workspace(), update.numel()
    hist = torch.zeros(RADIX_BINS, dtype=torch.int32, device=update.device)
    bits = update.abs().view(torch.int32) & 0x7FFFFFFF
    hist[: 1 << _DIGIT_BITS[0]] = torch.bincount(
        bits >> _SHIFTS[0], minlength=1 << _DIGIT_BITS[0]
    ).to(torch.int32)
    select, tie_base = radix_select_(update, kept_count(n, density), hist, workspace)
    out = torch.empty(n, dtype=torch.int8, device=update.device)
    tk.topk_mask_kernel[tk.grid(n)](update, select, tie_base, out, n, BLOCK=tk.BLOCK)
    return out.bool()
