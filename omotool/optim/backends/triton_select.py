"""The ``triton`` backend's launch tables and its exact top-k: a radix select of every
tensor's ``k``-th largest ``|Δθ|`` on the device (no sort, no ``nonzero``, nothing read on the
host), in launches over many tensors at once.
"""

from __future__ import annotations

import torch

from omotool.merging import kept_count
from omotool.optim.distributed import all_reduce_on_device, sum_over_lower_ranks
from omotool.optim.functional import Workspace
from omotool.optim.triton_tables import TIES_FIELDS, table_row

DIGIT_BITS = (11, 10, 10)  # radix-select digits of |Δθ|'s 31 bits, most significant first
DIGIT_SHIFTS = tuple(31 - sum(DIGIT_BITS[: i + 1]) for i in range(len(DIGIT_BITS)))  # 20, 10, 0
RADIX_BINS = sum(1 << width for width in DIGIT_BITS)


def device_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The int64 table of a launch on ``device``: built on the host, copied without waiting
    (from pinned memory on CUDA)."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def launch_tables(
    rows: list[list[int]],
    blocks: list[int],
    device: torch.device,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(table, owner, programs)`` of one launch over several tensors: the rows on the
    device (``table``, when already there), and each program's row index (computed there
    from the rows' block counts, which the host knows: nothing is read back)."""
    table = device_table(rows, device) if table is None else table
    programs = sum(blocks)
    counts = device_table([blocks], device)[0]
    owner = torch.repeat_interleave(
        torch.arange(len(rows), device=device, dtype=torch.int32), counts, output_size=programs
    )
    return table, owner, programs


def radix_select_many_(
    table: torch.Tensor,
    owner: torch.Tensor,
    programs: int,
    update: torch.Tensor,
    hist: torch.Tensor,
    workspace: Workspace,
    group: object | None = None,
    *,
    counted_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ``k``-th largest ``|Δθ|`` of every tensor of a TIES ``table`` (its entries at
    their offsets in ``update``) by radix select on the device: ``(select, tie_base)`` for
    ``_selected`` in the kernels (``select[tensor] = (threshold bits, ties kept)``,
    ``tie_base[pid]``: the tensor's ties in its earlier programs).

    ``hist``: zeros, ``RADIX_BINS`` per tensor, laid out digit by digit (each digit's
    histograms one contiguous ``(tensors, bins)`` block); with ``counted_first`` the first
    digit's are already made (``ties_adam_many_kernel`` makes them in the same pass as ``Δθ``).
    With a process ``group`` (FSDP2 shards), every histogram is summed over the ranks in one
    all-reduce per digit and ``tie_base`` counts the ties of lower ranks too.
    """
    from omotool.optim import triton_kernels as tk

    tensors, device = table.shape[0], update.device
    select = workspace.take("radix_select", 2 * tensors, torch.int64, device)
    if not counted_first:  # the first digit's histogram matches every entry (HIGH = 31)
        select.zero_()
    start, high = 0, 31
    for digit, (width, shift) in enumerate(zip(DIGIT_BITS, DIGIT_SHIFTS, strict=True)):
        counts = hist[start : start + (tensors << width)]
        start += tensors << width
        if digit > 0 or not counted_first:
            tk.radix_histogram_many_kernel[(programs,)](
                table, owner, update, counts, select, BLOCK=tk.BLOCK, BINS=1 << width,
                SHIFT=shift, HIGH=high,
            )  # fmt: skip
        if group is not None:
            all_reduce_on_device(counts, group)
        tk.radix_pick_many_kernel[(tensors,)](
            table, counts, select, BINS=1 << width, SHIFT=shift, FIRST=digit == 0
        )
        high = shift
    ties = workspace.take("tie_counts", programs, torch.int64, device)
    tk.tie_count_many_kernel[(programs,)](table, owner, update, select, ties, BLOCK=tk.BLOCK)
    # Each tensor's ties before each of its programs: an exclusive running sum that starts
    # again at each tensor's first program (owner: the programs' tensors, in order).
    before = torch.cumsum(ties, dim=0).sub_(ties)
    first_program = table[:, TIES_FIELDS.index("first")]
    tie_base = before - before[first_program][owner]
    if group is not None:
        per_tensor = torch.zeros(tensors, dtype=torch.int64, device=device)
        per_tensor.index_add_(0, owner, ties)
        tie_base += sum_over_lower_ranks(per_tensor, group)[owner]
    return select, tie_base


def topk_mask(update: torch.Tensor, density: float) -> torch.Tensor:
    """``merging.magnitude_mask`` of the 1-D ``update`` by this backend's radix select (the
    entries ``F_K`` keeps; for tests and inspection)."""
    from omotool.optim import triton_kernels as tk

    workspace, n = Workspace(), update.numel()
    row = table_row(TIES_FIELDS, dict(n=n, k=kept_count(n, density)))
    table, owner, programs = launch_tables([row], [tk.grid(n)[0]], update.device)
    hist = torch.zeros(RADIX_BINS, dtype=torch.int32, device=update.device)
    select, tie_base = radix_select_many_(table, owner, programs, update, hist, workspace)
    out = torch.empty(n, dtype=torch.int8, device=update.device)
    tk.topk_mask_kernel[tk.grid(n)](update, select, tie_base, out, n, BLOCK=tk.BLOCK)
    return out.bool()
