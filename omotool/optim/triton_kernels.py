"""Triton kernels of the ``triton`` backend (``optim.backends.triton`` launches them).

Each kernel makes one pass over a run of ``BLOCK`` entries per program; everything a kernel
decides (bias corrections from the device ``step``, the NaN-skip flag, the TIES threshold)
is read from device memory, so a step never waits on the host. The equations are those of
``omotool.optim.functional`` (Adam with ``torch.optim.AdamW``'s conventions; Eq. 2–7 of Lu et
al. 2024); the kernels are tested equal to the ``reference``/``torch`` backends under
``TRITON_INTERPRET=1``.

Written for the Triton releases torch's CUDA builds ship (3.6 with torch 2.11) and the
interpreter of triton 3.9: no ``histogram`` mask argument, no early returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl

from omotool.optim import triton_tables as tables

BLOCK = 1024
"""Entries per program."""


def _column(fields: Sequence[str], name: str) -> tl.constexpr:
    """The column of field ``name`` in a table of ``fields`` (``triton_tables``), as a
    compile-time constant (a global a kernel reads must be a ``tl.constexpr``)."""
    return tl.constexpr(fields.index(name))


# -- the tables' columns, from ``triton_tables`` (their docstrings say what each holds) ----------
# The leading columns of the OnDARE and OnTIES tables alike (``COL_``: a kernel's argument may
# bear a field's name, as ``DENSE_TAU``).
COL_THETA, COL_LOW, COL_GRAD, COL_EXP_AVG, COL_EXP_AVG_SQ, COL_STEP, COL_DENSE_TAU, COL_N = (
    _column(tables.ADAM_FIELDS, f)
    for f in ("theta", "low", "grad", "exp_avg", "exp_avg_sq", "step", "dense_tau", "n")
)
DARE_COLUMNS = tl.constexpr(len(tables.DARE_FIELDS))
DARE_OFFSET, DARE_KEY, DARE_FIRST = (
    _column(tables.DARE_FIELDS, f) for f in ("offset", "key", "first")
)
DARE_TAU_COLUMNS = tl.constexpr(len(tables.DARE_TAU_FIELDS))
DT_THETA, DT_LOW, DT_INDICES, DT_VALUES, DT_COUNT, DT_FIRST = (
    _column(tables.DARE_TAU_FIELDS, f)
    for f in ("theta", "low", "tau_indices", "tau_values", "tau_count", "tau_first")
)
TIES_COLUMNS = tl.constexpr(len(tables.TIES_FIELDS))
TIES_AT, TIES_FIRST, TIES_K, TIES_TAU_FORM = (
    _column(tables.TIES_FIELDS, f) for f in ("at", "first", "k", "tau_form")
)
TIES_TAU_INDICES, TIES_TAU_VALUES, TIES_TAU_COUNT, TIES_TAU_FIRST = (
    _column(tables.TIES_FIELDS, f) for f in ("tau_indices", "tau_values", "tau_count", "tau_first")
)
TAU_DENSE = tl.constexpr(tables.TAU_DENSE)
TAU_SPARSE = tl.constexpr(tables.TAU_SPARSE)
PARTIAL_COLUMNS = tl.constexpr(len(tables.PARTIAL_FIELDS))
P_KEPT, P_KEPT_SQ, P_OVERLAP, P_CONFLICTS, P_DROPPED_SQ, P_TAU_SQ = (
    _column(tables.PARTIAL_FIELDS, f)
    for f in ("kept", "kept_sq", "overlap", "conflicts", "dropped_sq", "tau_sq")
)


@triton.jit
def _store_partials(partial_ptr, pid, kept, kept_sq, overlap, conflicts, dropped_sq, tau_sq):
    """This program's row of a step's statistics (``triton_tables.PARTIAL_FIELDS``)."""
    row = partial_ptr + pid * PARTIAL_COLUMNS
    tl.store(row + P_KEPT, kept)
    tl.store(row + P_KEPT_SQ, kept_sq)
    tl.store(row + P_OVERLAP, overlap)
    tl.store(row + P_CONFLICTS, conflicts)
    tl.store(row + P_DROPPED_SQ, dropped_sq)
    tl.store(row + P_TAU_SQ, tau_sq)


@triton.jit
def _written(local, n, skip_ptr, HAS_SKIP: tl.constexpr):
    """Which entries a kernel writes: those below ``n``, or none when the step is skipped
    (``skip ≠ 0``)."""
    if HAS_SKIP:
        n = tl.where(tl.load(skip_ptr) == 0, n, 0)
    return local < n


@triton.jit
def _to_low(theta, low_ptr, LOW_BF16: tl.constexpr):
    """``θ`` in the low-precision parameter's type, rounded to nearest even. bf16 is rounded
    by hand into int16 bits (``low_ptr`` then points at the bf16 tensor viewed as int16):
    Triton's interpreter truncates where CUDA rounds."""
    if LOW_BF16:
        bits = theta.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
    return theta.to(low_ptr.dtype.element_ty)


@triton.jit
def _bias_corrections(step_ptr, log_beta1, log_beta2, lr):
    """``(η / (1 − β1ᵗ), √(1 − β2ᵗ))`` in float64 from the device step ``t``, as float32."""
    t = tl.load(step_ptr).to(tl.float64)
    correction1 = 1.0 - tl.exp(t * log_beta1)
    correction2 = 1.0 - tl.exp(t * log_beta2)
    return (lr / correction1).to(tl.float32), tl.sqrt(correction2).to(tl.float32)


@triton.jit
def _adam(grad, exp_avg, exp_avg_sq, beta2, one_minus_beta1, one_minus_beta2, eps, step_size,
          correction2_sqrt):  # fmt: skip
    """New moments and ``Δθ = −η/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε)`` (float32), with
    ``m ← m + (1 − β1)·(g − m)`` and ``v ← β2·v + (1 − β2)·g²`` as torch's AdamW (``1 − β``
    rounded from float64 on the host, as torch rounds its scalars)."""
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (grad * grad)
    denom = tl.sqrt(exp_avg_sq) / correction2_sqrt + eps
    return exp_avg, exp_avg_sq, (exp_avg / denom) * -step_size


@triton.jit
def _adam_moments(
    grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, local, inside, write, lr, log_beta1,
    log_beta2, beta2, one_minus_beta1, one_minus_beta2, eps,
):  # fmt: skip
    """Load ``g, m, v`` at ``local``, store the new moments where ``write``; return ``Δθ``."""
    step_size, correction2_sqrt = _bias_corrections(step_ptr, log_beta1, log_beta2, lr)
    grad = tl.load(grad_ptr + local, mask=inside, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + local, mask=inside, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + local, mask=inside, other=0.0)
    exp_avg, exp_avg_sq, update = _adam(
        grad, exp_avg, exp_avg_sq, beta2, one_minus_beta1, one_minus_beta2, eps, step_size,
        correction2_sqrt,
    )  # fmt: skip
    tl.store(exp_avg_ptr + local, exp_avg, mask=write)
    tl.store(exp_avg_sq_ptr + local, exp_avg_sq, mask=write)
    return update


@triton.jit
def dare_keep(key, offsets, density):
    """OnDARE's mask ``F_R``: entry at global flat offset ``o`` is kept iff
    ``Philox(key, o) < p`` (counter-based: no mask tensor, independent of sharding)."""
    return tl.rand(key, offsets) < density


@triton.jit
def _magnitude_bits(update):
    """``|Δθ|`` as its 31 float bits: ordered as the magnitudes are (non-negative floats)."""
    return tl.abs(update).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _selected(update, inside, select_ptr, tie_base_ptr, pid):
    """``F_K``'s mask on this program's entries: ``|Δθ|`` above the threshold, or equal to it
    and among the first ``r`` such entries in index order (``select = (threshold bits, r)``,
    ``tie_base[pid]``: entries equal to it in earlier programs)."""
    bits = _magnitude_bits(update)
    threshold = tl.load(select_ptr).to(tl.int32)
    tie = inside & (bits == threshold)
    rank = tl.load(tie_base_ptr + pid) + tl.cumsum(tie.to(tl.int64), axis=0)
    return inside & ((bits > threshold) | (tie & (rank <= tl.load(select_ptr + 1))))


@triton.jit
def topk_mask_kernel(update_ptr, select_ptr, tie_base_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``out[i] = 1`` where ``F_K`` keeps entry ``i`` (for tests and inspection)."""
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = local < n
    update = tl.load(update_ptr + local, mask=inside, other=0.0)
    selected = _selected(update, inside, select_ptr, tie_base_ptr, pid)
    tl.store(out_ptr + local, selected.to(tl.int8), mask=inside)


@triton.jit
def _elect(tau, update, alpha, weight, WEIGHTED: tl.constexpr):
    """TIES disjoint merge of ``α·T`` and ``(1 − α)·u`` (``merging.disjoint_merge``).

    Returns ``(merged, T agrees, u agrees)``; the sign is elected on ``T + u`` (unweighted, the
    released code) or ``α·T + (1 − α)·u`` (weighted); a zero vote elects +1, zeros never agree.
    """
    weighted_tau = tau * alpha
    weighted_update = update * weight
    if WEIGHTED:  # noqa: SIM108 - a static branch on a constexpr
        vote = weighted_tau + weighted_update
    else:
        vote = tau + update
    positive = vote >= 0
    tau_agrees = tl.where(positive, tau > 0, tau < 0)
    update_agrees = tl.where(positive, update > 0, update < 0)
    merged = tl.where(tau_agrees, weighted_tau, 0.0) + tl.where(update_agrees, weighted_update, 0.0)
    return merged, tau_agrees, update_agrees


@triton.jit
def dare_mask_kernel(out_ptr, n, offset, key, density, BLOCK: tl.constexpr):
    """``out[i] = 1`` where ``dare_keep`` keeps local entry ``i`` (for tests and inspection)."""
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = local < n
    keep = dare_keep(key, local + offset, density)
    tl.store(out_ptr + local, keep.to(tl.int8), mask=inside)


def grid(n: int) -> tuple[int]:
    """Programs for ``n`` entries."""
    return (max(1, triton.cdiv(n, BLOCK)),)


# -- several tensors in one launch ---------------------------------------------------------------
# A launch over many tensors reads each tensor's addresses and sizes from a table (int64 rows of
# the fields of ``triton_tables``, ``backends.triton._launch_tables``); ``owner[pid]`` is the row
# of program ``pid``'s tensor, whose programs are numbered from the row's first block.


@triton.jit
def _low_pointer(address, theta_ptr, HAS_LOW: tl.constexpr, LOW_BF16: tl.constexpr):
    """The low-precision parameter's pointer (bf16 as int16 bits, see ``_to_low``), or θ's."""
    if HAS_LOW:
        if LOW_BF16:
            return address.to(tl.pointer_type(tl.int16))
        return address.to(tl.pointer_type(tl.float16))
    return theta_ptr


@triton.jit
def _grad_pointer(address, GRAD_KIND: tl.constexpr):
    """The gradient's pointer: float32 (0), bfloat16 (1) or float16 (2)."""
    if GRAD_KIND == 1:
        return address.to(tl.pointer_type(tl.bfloat16))
    if GRAD_KIND == 2:
        return address.to(tl.pointer_type(tl.float16))
    return address.to(tl.pointer_type(tl.float32))


@triton.jit
def _row_adam_moments(
    row, local, n, skip_ptr, lr, log_beta1, log_beta2, beta2, one_minus_beta1, one_minus_beta2,
    eps, HAS_SKIP: tl.constexpr, GRAD_KIND: tl.constexpr,
):  # fmt: skip
    """``(inside, write, Δθ)``: ``_adam_moments`` of the tensor of a table row (``g, m, v,
    step``: columns of ``triton_tables.ADAM_FIELDS``, which both the OnDARE and the OnTIES
    tables start with) at ``local``, the entries below ``n`` (``inside``), written unless the
    step is skipped (``write``, see ``_written``)."""
    inside = local < n
    write = _written(local, n, skip_ptr, HAS_SKIP)
    grad_ptr = _grad_pointer(tl.load(row + COL_GRAD), GRAD_KIND)
    exp_avg_ptr = tl.load(row + COL_EXP_AVG).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(row + COL_EXP_AVG_SQ).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + COL_STEP).to(tl.pointer_type(tl.float32))
    update = _adam_moments(
        grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, local, inside, write, lr, log_beta1,
        log_beta2, beta2, one_minus_beta1, one_minus_beta2, eps,
    )  # fmt: skip
    return inside, write, update


@triton.jit
def _index_pointer(address, INDEX_64: tl.constexpr):
    """A sparse ``T``'s indices: int64 or int32."""
    if INDEX_64:
        return address.to(tl.pointer_type(tl.int64))
    return address.to(tl.pointer_type(tl.int32))


@triton.jit
def dare_adamw_many_kernel(
    table_ptr, owner_ptr, skip_ptr, partial_ptr, lr, log_beta1, log_beta2, beta2,
    one_minus_beta1, one_minus_beta2, eps, decay, density, divisor, weight, alpha,
    BLOCK: tl.constexpr, HAS_LOW: tl.constexpr, LOW_BF16: tl.constexpr, DENSE_TAU: tl.constexpr,
    HAS_SKIP: tl.constexpr, GRAD_KIND: tl.constexpr,
):  # fmt: skip
    """OnDARE in one pass (Eq. 3, 4) over every tensor of the table: for each, moments, the
    mask ``Philox(key, global offset) < p``, ``θ ← θ·(1 − ηλ) + w·F_R(Δθ)/s (+ α·T if T is
    dense)``, and the write-back to the low-precision parameter.

    ``w = 1 − α`` and ``decay = 1 − ηλ`` are computed on the host in float64 (as torch rounds
    its scalars); ``s`` (``divisor``) is ``p`` (inverse rescale) or 1. Per program, a row of
    statistics: kept entries and ``Σ (Δθ/s)²`` over them. With ``HAS_SKIP``, a non-zero
    ``skip`` changes nothing.
    """
    pid = tl.program_id(0)
    row = table_ptr + tl.load(owner_ptr + pid).to(tl.int64) * DARE_COLUMNS
    theta_ptr = tl.load(row + COL_THETA).to(tl.pointer_type(tl.float32))
    low_ptr = _low_pointer(tl.load(row + COL_LOW), theta_ptr, HAS_LOW, LOW_BF16)
    n, offset, key = tl.load(row + COL_N), tl.load(row + DARE_OFFSET), tl.load(row + DARE_KEY)
    local = (pid - tl.load(row + DARE_FIRST)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside, write, update = _row_adam_moments(
        row, local, n, skip_ptr, lr, log_beta1, log_beta2, beta2, one_minus_beta1,
        one_minus_beta2, eps, HAS_SKIP, GRAD_KIND,
    )  # fmt: skip
    theta = tl.load(theta_ptr + local, mask=inside, other=0.0)
    keep = dare_keep(key, local + offset, density) & write
    kept = tl.where(keep, update / divisor, 0.0)
    theta = theta * decay + weight * kept
    if DENSE_TAU:
        tau_ptr = tl.load(row + COL_DENSE_TAU).to(tl.pointer_type(tl.float32))
        theta = theta + alpha * tl.load(tau_ptr + local, mask=inside, other=0.0)
    tl.store(theta_ptr + local, theta, mask=write)
    if HAS_LOW:
        tl.store(low_ptr + local, _to_low(theta, low_ptr, LOW_BF16), mask=write)
    _store_partials(
        partial_ptr, pid, tl.sum(keep.to(tl.float32), axis=0), tl.sum(kept * kept, axis=0),
        0.0, 0.0, 0.0, 0.0,
    )  # fmt: skip


@triton.jit
def _sparse_tau_entries(
    table_ptr, owner_ptr, skip_ptr, BLOCK: tl.constexpr, HAS_LOW: tl.constexpr,
    LOW_BF16: tl.constexpr, HAS_SKIP: tl.constexpr, INDEX_64: tl.constexpr,
    COLUMNS: tl.constexpr, THETA: tl.constexpr, LOW: tl.constexpr, INDICES: tl.constexpr,
    VALUES: tl.constexpr, COUNT: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    """``(row, θ pointer, low θ pointer, flat indices, T's values, inside, write)`` of this
    program's run of the entries of a sparse ``T``: its tensor's row of a table of
    ``COLUMNS``, read at the given columns (OnDARE's and OnTIES's tables keep them in
    different places)."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(owner_ptr + pid).to(tl.int64) * COLUMNS
    theta_ptr = tl.load(row + THETA).to(tl.pointer_type(tl.float32))
    low_ptr = _low_pointer(tl.load(row + LOW), theta_ptr, HAS_LOW, LOW_BF16)
    index_ptr = _index_pointer(tl.load(row + INDICES), INDEX_64)
    tau_ptr = tl.load(row + VALUES).to(tl.pointer_type(tl.float32))
    count = tl.load(row + COUNT)
    j = (pid - tl.load(row + FIRST)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < count
    write = _written(j, count, skip_ptr, HAS_SKIP)
    index = tl.load(index_ptr + j, mask=inside, other=0).to(tl.int64)
    tau = tl.load(tau_ptr + j, mask=inside, other=0.0)
    return row, theta_ptr, low_ptr, index, tau, inside, write


@triton.jit
def dare_tau_many_kernel(
    table_ptr, owner_ptr, skip_ptr, alpha,
    BLOCK: tl.constexpr, HAS_LOW: tl.constexpr, LOW_BF16: tl.constexpr, HAS_SKIP: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """OnDARE's second term at the entries of every sparse ``T`` of the table:
    ``θ[i] += α·T[i]`` (Eq. 4)."""
    row, theta_ptr, low_ptr, index, tau, inside, write = _sparse_tau_entries(
        table_ptr, owner_ptr, skip_ptr, BLOCK, HAS_LOW, LOW_BF16, HAS_SKIP, INDEX_64,
        DARE_TAU_COLUMNS, DT_THETA, DT_LOW, DT_INDICES, DT_VALUES, DT_COUNT, DT_FIRST,
    )  # fmt: skip
    theta = tl.load(theta_ptr + index, mask=inside, other=0.0) + alpha * tau
    tl.store(theta_ptr + index, theta, mask=write)
    if HAS_LOW:
        tl.store(low_ptr + index, _to_low(theta, low_ptr, LOW_BF16), mask=write)


@triton.jit
def _ties_row(table_ptr, owner_ptr, pid, BLOCK: tl.constexpr):
    """``(row, tensor, local offsets, n, update offset)`` of program ``pid`` of a launch over
    the entries of a TIES table's tensors."""
    tensor = tl.load(owner_ptr + pid).to(tl.int64)
    row = table_ptr + tensor * TIES_COLUMNS
    local = (pid - tl.load(row + TIES_FIRST)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return row, tensor, local, tl.load(row + COL_N), tl.load(row + TIES_AT)


@triton.jit
def _add_histogram(digit, counted, hist_ptr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """Add the histogram of ``digit`` over the ``counted`` entries into ``hist``: the others
    are given digit 0 and taken out of bin 0 again (``tl.histogram`` takes no mask in the
    Triton releases supported)."""
    counts = tl.histogram(tl.where(counted, digit, 0), BINS)
    outside = BLOCK - tl.sum(counted.to(tl.int32), axis=0)
    counts = counts - tl.where(tl.arange(0, BINS) == 0, outside, 0)
    tl.atomic_add(hist_ptr + tl.arange(0, BINS), counts)


@triton.jit
def ties_adam_many_kernel(
    table_ptr, owner_ptr, update_ptr, skip_ptr, hist_ptr, lr, log_beta1, log_beta2, beta2,
    one_minus_beta1, one_minus_beta2, eps,
    BLOCK: tl.constexpr, BINS: tl.constexpr, SHIFT: tl.constexpr, HAS_SKIP: tl.constexpr,
    GRAD_KIND: tl.constexpr,
):  # fmt: skip
    """Moments and ``Δθ`` (0 on a skipped step) of every tensor of the table, ``Δθ`` stored at
    the tensor's offset in ``update``, plus the histogram of the first radix digit of ``|Δθ|``
    (bits ``SHIFT`` and up) added into the tensor's row of ``hist`` (``BINS`` per row)."""
    pid = tl.program_id(0)
    row, tensor, local, n, at = _ties_row(table_ptr, owner_ptr, pid, BLOCK)
    inside, write, update = _row_adam_moments(
        row, local, n, skip_ptr, lr, log_beta1, log_beta2, beta2, one_minus_beta1,
        one_minus_beta2, eps, HAS_SKIP, GRAD_KIND,
    )  # fmt: skip
    update = tl.where(write, update, 0.0)
    tl.store(update_ptr + at + local, update, mask=inside)
    digit = _magnitude_bits(update) >> SHIFT
    _add_histogram(digit, inside, hist_ptr + tensor * BINS, BLOCK, BINS)


@triton.jit
def radix_histogram_many_kernel(
    table_ptr, owner_ptr, update_ptr, hist_ptr, select_ptr,
    BLOCK: tl.constexpr, BINS: tl.constexpr, SHIFT: tl.constexpr, HIGH: tl.constexpr,
):  # fmt: skip
    """Per tensor of the table, the histogram of the digit of ``|Δθ|`` at bits ``[SHIFT,
    HIGH)`` over the entries whose bits from ``HIGH`` up equal those of the tensor's threshold
    prefix chosen so far (``select[tensor, 0]``; ``HIGH = 31``: every entry), added into the
    tensor's row of ``hist``."""
    pid = tl.program_id(0)
    row, tensor, local, n, at = _ties_row(table_ptr, owner_ptr, pid, BLOCK)
    inside = local < n
    bits = _magnitude_bits(tl.load(update_ptr + at + local, mask=inside, other=0.0))
    prefix = tl.load(select_ptr + tensor * 2).to(tl.int32)
    match = inside & ((bits >> HIGH) == (prefix >> HIGH))
    _add_histogram((bits >> SHIFT) & (BINS - 1), match, hist_ptr + tensor * BINS, BLOCK, BINS)


@triton.jit
def radix_pick_many_kernel(
    table_ptr, hist_ptr, select_ptr, BINS: tl.constexpr, SHIFT: tl.constexpr,
    FIRST: tl.constexpr,
):  # fmt: skip
    """One program per tensor of the table: the digit ``d`` of the ``r``-th largest magnitude
    among the entries that match the prefix (``r = select[tensor, 1]``, or the tensor's ``k``
    on the first digit): the largest ``d`` with ``count(digit ≥ d) ≥ r``. Then ``prefix |= d
    << SHIFT`` and ``r -= count(digit > d)``.

    ``select[tensor] = (prefix, r)`` (int64). After the last digit, ``prefix`` is the bits of
    the threshold ``|Δθ|`` and ``r`` the number of entries equal to it that are kept.
    """
    tensor = tl.program_id(0).to(tl.int64)
    counts = tl.load(hist_ptr + tensor * BINS + tl.arange(0, BINS)).to(tl.int64)
    select = select_ptr + tensor * 2
    if FIRST:  # select holds last step's values: only its type is used here
        prefix = tl.load(select) * 0
        rank = prefix + tl.load(table_ptr + tensor * TIES_COLUMNS + TIES_K)
    else:
        prefix = tl.load(select)
        rank = tl.load(select + 1)
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    digits = tl.arange(0, BINS)
    digit = tl.max(tl.where(at_or_above >= rank, digits, 0), axis=0)
    above = tl.sum(tl.where(digits > digit, counts, 0), axis=0)
    tl.store(select, prefix | (digit.to(tl.int64) << SHIFT))
    tl.store(select + 1, rank - above)


@triton.jit
def tie_count_many_kernel(
    table_ptr, owner_ptr, update_ptr, select_ptr, ties_ptr, BLOCK: tl.constexpr
):
    """``ties[pid]``: entries of program ``pid`` whose ``|Δθ|`` equals its tensor's
    threshold."""
    pid = tl.program_id(0)
    row, tensor, local, n, at = _ties_row(table_ptr, owner_ptr, pid, BLOCK)
    inside = local < n
    bits = _magnitude_bits(tl.load(update_ptr + at + local, mask=inside, other=0.0))
    tie = inside & (bits == tl.load(select_ptr + tensor * 2).to(tl.int32))
    tl.store(ties_ptr + pid, tl.sum(tie.to(tl.int64), axis=0))


@triton.jit
def ties_merge_many_kernel(
    table_ptr, owner_ptr, update_ptr, skip_ptr, select_ptr, tie_base_ptr, partial_ptr,
    decay, divisor, weight, alpha,
    BLOCK: tl.constexpr, HAS_LOW: tl.constexpr, LOW_BF16: tl.constexpr, WEIGHTED: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):  # fmt: skip
    """OnTIES's merge (Eq. 5–7) in one pass over every tensor of the table: ``F_K`` = entries
    above the tensor's threshold plus its first ``r`` ties in index order (``tie_base[pid]``:
    the tensor's ties in earlier programs), divided by ``s``.

    ``θ ← θ·(1 − ηλ) + disjoint merge of α·T and (1 − α)·F_K(Δθ)`` with ``T`` read where it is
    dense and 0 elsewhere (the merge with ``T = 0`` is ``(1 − α)·F_K(Δθ)``, to the bit); for a
    sparse ``T`` the kept values are written back over ``update`` for
    ``ties_tau_many_kernel``, which merges at ``T``'s entries.

    Per program, a row of statistics: kept entries, ``Σ kept²``, and for a dense ``T`` the
    overlap, conflicts, ``Σ dropped²`` and ``Σ agreeing T²``.
    """
    pid = tl.program_id(0)
    row, tensor, local, n, at = _ties_row(table_ptr, owner_ptr, pid, BLOCK)
    theta_ptr = tl.load(row + COL_THETA).to(tl.pointer_type(tl.float32))
    low_ptr = _low_pointer(tl.load(row + COL_LOW), theta_ptr, HAS_LOW, LOW_BF16)
    form = tl.load(row + TIES_TAU_FORM)
    inside = local < n
    # As masks, per-row flags must be blocks: entries below n, or below 0 when the flag is off.
    dense = local < tl.where((form & TAU_DENSE) != 0, n, 0)
    sparse = local < tl.where((form & TAU_SPARSE) != 0, n, 0)
    write = _written(local, n, skip_ptr, HAS_SKIP)
    update = tl.load(update_ptr + at + local, mask=inside, other=0.0)
    selected = _selected(update, inside, select_ptr + tensor * 2, tie_base_ptr, pid)
    kept = tl.where(selected, update / divisor, 0.0)
    theta = tl.load(theta_ptr + local, mask=inside, other=0.0) * decay
    tau_ptr = tl.load(row + COL_DENSE_TAU).to(tl.pointer_type(tl.float32))
    tau = tl.load(tau_ptr + local, mask=dense, other=0.0)
    merged, tau_agrees, update_agrees = _elect(tau, kept, alpha, weight, WEIGHTED)
    theta = theta + merged
    dropped = selected & ~update_agrees & dense
    overlap = tl.sum((selected & dense).to(tl.float32), axis=0)
    conflicts = tl.sum(dropped.to(tl.float32), axis=0)
    dropped_sq = tl.sum(tl.where(dropped, kept * kept, 0.0), axis=0)
    tau_sq = tl.sum(tl.where(tau_agrees, tau * tau, 0.0), axis=0)
    tl.store(update_ptr + at + local, kept, mask=sparse)
    tl.store(theta_ptr + local, theta, mask=write)
    if HAS_LOW:
        tl.store(low_ptr + local, _to_low(theta, low_ptr, LOW_BF16), mask=write)
    _store_partials(
        partial_ptr, pid, tl.sum(selected.to(tl.float32), axis=0), tl.sum(kept * kept, axis=0),
        overlap, conflicts, dropped_sq, tau_sq,
    )  # fmt: skip


@triton.jit
def ties_tau_many_kernel(
    table_ptr, owner_ptr, update_ptr, skip_ptr, partial_ptr, alpha, weight,
    BLOCK: tl.constexpr, HAS_LOW: tl.constexpr, LOW_BF16: tl.constexpr, WEIGHTED: tl.constexpr,
    HAS_SKIP: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """OnTIES at the entries of every sparse ``T`` of the table (after
    ``ties_merge_many_kernel``, which added ``(1 − α)·u`` there): ``θ[i] += merge(α·T,
    (1 − α)·u) − (1 − α)·u`` with ``u`` the kept value at ``i`` (0 if not kept).

    Per program, a row of statistics: overlap, conflicts, ``Σ dropped²``, ``Σ agreeing T²``;
    an entry of ``F_K`` is present where ``u ≠ 0``.
    """
    row, theta_ptr, low_ptr, index, tau, inside, write = _sparse_tau_entries(
        table_ptr, owner_ptr, skip_ptr, BLOCK, HAS_LOW, LOW_BF16, HAS_SKIP, INDEX_64,
        TIES_COLUMNS, COL_THETA, COL_LOW, TIES_TAU_INDICES, TIES_TAU_VALUES, TIES_TAU_COUNT,
        TIES_TAU_FIRST,
    )  # fmt: skip
    at = tl.load(row + TIES_AT)
    update = tl.load(update_ptr + at + index, mask=inside, other=0.0)
    merged, tau_agrees, update_agrees = _elect(tau, update, alpha, weight, WEIGHTED)
    theta = tl.load(theta_ptr + index, mask=inside, other=0.0)
    theta = theta + (merged - weight * update)
    tl.store(theta_ptr + index, theta, mask=write)
    if HAS_LOW:
        tl.store(low_ptr + index, _to_low(theta, low_ptr, LOW_BF16), mask=write)
    present = inside & (update != 0)
    dropped = present & ~update_agrees
    _store_partials(
        partial_ptr, tl.program_id(0), 0.0, 0.0, tl.sum(present.to(tl.float32), axis=0),
        tl.sum(dropped.to(tl.float32), axis=0),
        tl.sum(tl.where(dropped, update * update, 0.0), axis=0),
        tl.sum(tl.where(inside & tau_agrees, tau * tau, 0.0), axis=0),
    )  # fmt: skip
