"""The ``triton`` backend: online-merging AdamW steps in fused Triton kernels, many tensors
per launch.

The step of the ``torch`` backend (``sync_free.sync_free_step_``) (no host synchronisation; the
skip flag, the step count and the statistics stay on the device), in few passes:

- OnDARE (``triton_dare_adamw_``): every tensor of a step in one launch
  (``dare_adamw_many_kernel``, reading each tensor's addresses from a table), which does the
  moments, the Philox mask keyed by ``(seed, step, name)`` and the global flat offset, the
  merge and the write-back to a bf16/fp16 parameter; the sparse ``T``s add ``α·T`` at their
  entries in a second launch. One launch per kind of tensor (parameter and gradient dtypes,
  dense or sparse ``T``), so the count does not grow with the number of tensors.
  The mask follows the same law as the other backends' (i.i.d. Bernoulli(p)), drawn from
  another generator: the kept entries differ, their distribution does not.
- OnTIES (``triton_ties_adamw_``): tensors in batches that fit one largest tensor of ``Δθ``
  scratch, each batch in about ten launches over all its tensors (tables as OnDARE's):
  moments and ``Δθ`` into the scratch with the histogram of the first radix digit of
  ``|Δθ|`` per tensor, two more histogram passes and a pick per digit (an exact radix
  select of each tensor's ``k``-th largest ``|Δθ|``: no sort, no ``nonzero``, cost
  independent of the values), one pass counting ties at the thresholds, and the merge pass
  (kept = above the threshold or one of the first ties in index order, as
  ``merging.magnitude_mask``); sparse ``T``s are merged at their entries in a small last
  launch.

Under FSDP2 each rank steps its shard: DARE masks are keyed by global offsets, and the
OnTIES histograms are summed over the ranks (``distributed.all_reduce_on_device``) with ties
numbered across ranks, so the kept entries are those of the whole tensor.
Unsupported here, refused by name at construction (``unsupported``): step-K
(``online_step > 1``) and the ``l1`` rescale (whole-tensor norms). Tensors without merging
(``missing="adamw"``, ``method="none"``) take the ``torch`` backend's step. Tensors must be on
a CUDA device, or on the CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter: how tests run
it).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch

from omotool.errors import UsageError
from omotool.merging import kept_count
from omotool.merging.sparsify import key_seed
from omotool.optim.backends.base import Backend, Keep, TensorStep, by_hyper_parameters, register
from omotool.optim.backends.sync_free import sync_free_step_
from omotool.optim.backends.triton_select import (
    DIGIT_BITS,
    DIGIT_SHIFTS,
    RADIX_BINS,
    launch_tables,
    radix_select_many_,
)
from omotool.optim.functional import MergeOptions, StepStats, Workspace
from omotool.optim.triton_tables import (
    DARE_FIELDS,
    DARE_TAU_FIELDS,
    PARTIAL_FIELDS,
    TAU_DENSE,
    TAU_SPARSE,
    TIES_FIELDS,
    table_row,
)


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
        total = dict(zip(PARTIAL_FIELDS, sums.unbind(), strict=True))
        stats.kept += total["kept"]
        stats.update_sq += (1 - alpha) ** 2 * (total["kept_sq"] - total["dropped_sq"])
        stats.overlap += total["overlap"]
        stats.conflicts += total["conflicts"]
        stats.tau_sq += alpha**2 * total["tau_sq"]


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


_GRAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _low_kind(low: torch.Tensor | None) -> tuple[bool, bool]:
    """``(HAS_LOW, LOW_BF16)`` of a tensor's low-precision parameter."""
    return low is not None, low is not None and low.dtype == torch.bfloat16


def _adam_scalars(lr: float, beta1: float, beta2: float, eps: float) -> dict[str, float]:
    """The kernels' Adam arguments: ``log β`` for the in-kernel bias corrections (``βᵗ =
    exp(t·log β)`` from the device step), and ``1 − β`` rounded from float64 on the host, as
    torch rounds its scalars."""
    return dict(
        lr=lr,
        log_beta1=math.log(beta1) if beta1 > 0 else -math.inf,
        log_beta2=math.log(beta2) if beta2 > 0 else -math.inf,
        beta2=beta2,
        one_minus_beta1=1.0 - beta1,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
    )


@dataclass
class GroupStep:
    """What the launches of one param group's step share: the merge ``options``, the group's
    ``adam`` settings (lr, beta1, beta2, eps, weight_decay), ``found_inf`` (a float32 0-d
    device tensor, non-zero to skip the step; ``None``: never), the statistics (counts in
    ``stats``, the kernels' sums in ``partials``) and the scratch buffers."""

    options: MergeOptions
    adam: Mapping[str, float]
    found_inf: torch.Tensor | None
    stats: StepStats
    partials: StepPartials
    workspace: Workspace

    def adam_scalars(self) -> dict[str, float]:
        """The kernels' Adam arguments (``_adam_scalars``)."""
        a = self.adam
        return _adam_scalars(a["lr"], a["beta1"], a["beta2"], a["eps"])

    @property
    def decay(self) -> float:
        """``1 − ηλ``, computed on the host in float64 (as torch rounds its scalars)."""
        return 1.0 - self.adam["lr"] * self.adam["weight_decay"]

    @property
    def divisor(self) -> float:
        """``s``: the kept updates are divided by ``p`` (inverse rescale) or by 1."""
        options = self.options
        return options.reserve_p if options.resolved_rescale == "inverse" else 1.0


def triton_dare_adamw_(tensors: list[TensorStep], group: GroupStep) -> None:
    """One OnDARE step of ``tensors`` (one param group's hyper-parameters): one launch of
    ``dare_adamw_many_kernel`` per kind of tensor (parameter and gradient dtypes, dense ``T``
    or not) and one of ``dare_tau_many_kernel`` per kind of sparse ``T``; the statistics go to
    ``group.partials``."""
    from omotool.optim import triton_kernels as tk

    if not tensors:
        return
    options, stats, found_inf = group.options, group.stats, group.found_inf
    alpha, partials = options.alpha, group.partials
    kinds: dict[tuple, list[TensorStep]] = defaultdict(list)
    tau_kinds: dict[tuple, list[TensorStep]] = defaultdict(list)
    for t in tensors:
        stats.merged = True
        stats.entries += t.work.numel()
        dense = t.reference is not None and alpha > 0 and t.reference.indices is None
        kinds[(*_low_kind(t.low), dense, _GRAD_KINDS[t.grad.dtype])].append(t)
        if t.reference is not None and alpha > 0:
            stats.tau_sq += alpha**2 * t.reference.sq_norm
            if t.reference.indices is not None and t.reference.values.numel():
                index_64 = t.reference.indices.dtype == torch.int64
                tau_kinds[(*_low_kind(t.low), index_64)].append(t)
    device = tensors[0].work.device
    skip = found_inf if found_inf is not None else tensors[0].step
    scalars = dict(
        group.adam_scalars(),
        decay=group.decay,
        density=options.reserve_p,
        divisor=group.divisor,
        weight=1.0 - alpha,
        alpha=alpha,
    )
    for (has_low, low_bf16, dense, grad_kind), same_kind in kinds.items():
        rows, blocks, first = [], [], 0
        for t in same_kind:
            n = t.work.numel()
            tau = t.reference.values if dense else t.work
            rows.append(table_row(DARE_FIELDS, dict(
                _adam_columns(t, has_low), dense_tau=tau.data_ptr(), n=n,
                offset=t.shard.offset if t.shard else 0,
                key=key_seed(options.seed, "update", t.host_step, t.name), first=first,
            )))  # fmt: skip
            blocks.append(tk.grid(n)[0])
            first += blocks[-1]
        table, owner, programs = launch_tables(rows, blocks, device)
        tk.dare_adamw_many_kernel[(programs,)](
            table, owner, skip, partials.take(programs, device), **scalars, BLOCK=tk.BLOCK,
            HAS_LOW=has_low, LOW_BF16=low_bf16, DENSE_TAU=dense, HAS_SKIP=found_inf is not None,
            GRAD_KIND=grad_kind,
        )  # fmt: skip
    for (has_low, low_bf16, index_64), same_kind in tau_kinds.items():
        rows, blocks, first = [], [], 0
        for t in same_kind:
            count = t.reference.values.numel()
            rows.append(table_row(DARE_TAU_FIELDS, dict(
                theta=t.work.data_ptr(), low=(t.low if has_low else t.work).data_ptr(),
                tau_indices=t.reference.indices.data_ptr(),
                tau_values=t.reference.values.data_ptr(), tau_count=count, tau_first=first,
            )))  # fmt: skip
            blocks.append(tk.grid(count)[0])
            first += blocks[-1]
        table, owner, programs = launch_tables(rows, blocks, device)
        tk.dare_tau_many_kernel[(programs,)](
            table, owner, skip, alpha, BLOCK=tk.BLOCK, HAS_LOW=has_low, LOW_BF16=low_bf16,
            HAS_SKIP=found_inf is not None, INDEX_64=index_64,
        )  # fmt: skip


def triton_ties_adamw_(tensors: list[TensorStep], group: GroupStep) -> None:
    """One OnTIES step of ``tensors`` (one param group's hyper-parameters), many tensors per
    launch.

    The tensors of one kind (parameter and gradient dtypes, process group) go in batches
    whose entries fit one largest tensor of ``Δθ`` scratch (the update buffer; ``T``'s form,
    dense or sparse, is read per tensor by the kernels): per batch about ten launches
    (``_ties_batch``), so the launch count grows with the parameters' total size over the
    largest tensor's, not with the number of tensors.
    Each tensor's ``step`` (device) already counts this step unless it is skipped. The
    kernels' statistics go to ``group.partials`` (``StepPartials.fold`` adds them to
    ``stats``); only the entry counts go to ``group.stats``.
    """
    if not tensors:
        return
    # Batches must be the same on every rank (the select's collectives run per batch): they
    # are cut by the kinds and whole-tensor sizes, which every rank knows alike.
    kinds: dict[tuple, list[TensorStep]] = defaultdict(list)
    stats = group.stats
    for t in tensors:
        stats.merged = True
        stats.entries += t.work.numel()
        process_group = None if t.shard is None else t.shard.group
        kinds[(*_low_kind(t.low), _GRAD_KINDS[t.grad.dtype], id(process_group))].append(t)
    limit = max(_whole_numel(t) for t in tensors)
    batches: list[list[TensorStep]] = []
    for same_kind in kinds.values():
        batch: list[TensorStep] = []
        filled = 0
        for t in same_kind:
            if batch and filled + _whole_numel(t) > limit:
                batches.append(batch)
                batch, filled = [], 0
            batch.append(t)
            filled += _whole_numel(t)
        batches.append(batch)
    capacity = max(sum(t.work.numel() for t in batch) for batch in batches)
    update = group.workspace.take("update", capacity, torch.float32, tensors[0].work.device)
    for batch in batches:
        _ties_batch(batch, update, group)


def _whole_numel(t: TensorStep) -> int:
    """Entries of the whole tensor (all shards)."""
    return t.shard.numel if t.shard is not None else t.work.numel()


def _adam_columns(t: TensorStep, has_low: bool) -> dict[str, int]:
    """A row's ``triton_tables.ADAM_FIELDS`` but ``dense_tau`` and ``n``: the addresses of
    θ, the low-precision θ (or θ again), g, m, v and the device step."""
    exp_avg, exp_avg_sq = t.moments
    low = t.low if has_low and t.low is not None else t.work
    return dict(
        theta=t.work.data_ptr(), low=low.data_ptr(), grad=t.grad.data_ptr(),
        exp_avg=exp_avg.data_ptr(), exp_avg_sq=exp_avg_sq.data_ptr(), step=t.step.data_ptr(),
    )  # fmt: skip


def _number_blocks(rows: list[dict[str, int]], blocks: list[int], key: str) -> None:
    """``row[key]``: the first program of each row that has ``blocks`` in one launch (the
    programs of a launch are numbered row after row)."""
    first = 0
    for row, count in zip(rows, blocks, strict=True):
        if count:
            row[key] = first
            first += count


def _ties_batch(batch: list[TensorStep], update: torch.Tensor, group: GroupStep) -> None:
    """One batch of ``triton_ties_adamw_`` (one kind, entries within ``update``): the moments
    and ``Δθ`` with the first digit's histograms (``ties_adam_many_kernel``), the radix
    select of every tensor's threshold (``radix_select_many_``), the merge, and the sparse
    ``T``s' entries (one launch per index dtype)."""
    from omotool.optim import triton_kernels as tk

    workspace, found_inf, partials = group.workspace, group.found_inf, group.partials
    alpha, density = group.options.alpha, group.options.reserve_p
    weighted = group.options.election == "weighted"
    first = batch[0]
    device = first.work.device
    has_low, low_bf16 = _low_kind(first.low)
    fields: list[dict[str, int]] = []
    blocks: list[int] = []
    tau_blocks: dict[torch.dtype, list[int]] = defaultdict(lambda: [0] * len(batch))
    at = 0
    for i, t in enumerate(batch):
        n, tau = t.work.numel(), t.reference
        dense = tau is not None and tau.indices is None
        sparse = tau is not None and tau.indices is not None
        row = dict(
            _adam_columns(t, has_low), dense_tau=(tau.values if dense else t.work).data_ptr(),
            n=n, at=at, k=kept_count(_whole_numel(t), density),
            tau_form=(TAU_DENSE if dense else 0) | (TAU_SPARSE if sparse else 0),
        )  # fmt: skip
        if sparse:
            row.update(
                tau_indices=tau.indices.data_ptr(), tau_values=tau.values.data_ptr(),
                tau_count=tau.values.numel(),
            )  # fmt: skip
            tau_blocks[tau.indices.dtype][i] = tk.grid(tau.values.numel())[0]
        fields.append(row)
        blocks.append(tk.grid(n)[0])
        at += n
    _number_blocks(fields, blocks, "first")
    for counts in tau_blocks.values():  # a row's T has one index dtype: one launch numbers it
        _number_blocks(fields, counts, "tau_first")
    rows = [table_row(TIES_FIELDS, row) for row in fields]
    table, owner, programs = launch_tables(rows, blocks, device)
    skip = found_inf if found_inf is not None else first.step
    flags = dict(BLOCK=tk.BLOCK, HAS_SKIP=found_inf is not None)
    hist = workspace.take("radix_histogram", len(batch) * RADIX_BINS, torch.int32, device)
    hist.zero_()
    first_counts = hist[: len(batch) << DIGIT_BITS[0]]
    tk.ties_adam_many_kernel[(programs,)](
        table, owner, update, skip, first_counts, **group.adam_scalars(), BINS=1 << DIGIT_BITS[0],
        SHIFT=DIGIT_SHIFTS[0], GRAD_KIND=_GRAD_KINDS[first.grad.dtype], **flags,
    )  # fmt: skip
    process_group = first.shard.group if first.shard is not None else None
    select, tie_base = radix_select_many_(
        table, owner, programs, update, hist, workspace, process_group, counted_first=True
    )
    writes = dict(flags, HAS_LOW=has_low, LOW_BF16=low_bf16, WEIGHTED=weighted)
    tk.ties_merge_many_kernel[(programs,)](
        table, owner, update, skip, select, tie_base, partials.take(programs, device),
        decay=group.decay, divisor=group.divisor, weight=1.0 - alpha, alpha=alpha, **writes,
    )  # fmt: skip
    for index_dtype, counts in tau_blocks.items():  # rows of the other dtype: no programs
        _, tau_owner, tau_programs = launch_tables(rows, counts, device, table=table)
        tk.ties_tau_many_kernel[(tau_programs,)](
            table, tau_owner, update, skip, partials.take(tau_programs, device), alpha,
            1.0 - alpha, INDEX_64=index_dtype == torch.int64, **writes,
        )  # fmt: skip


RULES = {"dare": triton_dare_adamw_, "ties": triton_ties_adamw_}
"""Each merging method's batched step (``TritonBackend.rules``)."""


@register("triton", help="fused Triton kernels, many tensors per launch (CUDA)")
class TritonBackend(Backend):
    sync_free = True
    rules = tuple(RULES)

    def __init__(self, options: MergeOptions, devices: Collection[torch.device]) -> None:
        super().__init__(options, devices)
        for device in devices:
            check_usable(options, device)

    def step(
        self, tensors: list[TensorStep], *, keep: Keep, stats: StepStats, workspace: Workspace
    ) -> None:
        merging = []
        for t in tensors:
            if t.options.merges:  # the kernels read the gradients' memory: contiguous
                merging.append(replace(t, grad=t.grad.contiguous()))
            else:
                sync_free_step_(t, t.grad.float(), keep, stats, workspace)
                t.write_back()
        found_inf = None if keep is None else (~keep).float()
        partials = StepPartials(workspace)
        for group in by_hyper_parameters(merging).values():
            shared = GroupStep(self.options, group[0].adam, found_inf, stats, partials, workspace)
            RULES[self.options.method](group, shared)
        partials.fold(stats, self.options.alpha)
