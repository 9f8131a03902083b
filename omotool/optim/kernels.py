"""The host side of the CPU kernels (numba) for a whole online-merging AdamW step, all tensors
at once: this module prepares their arrays (addresses, work items, Adam scalars, per-thread
rows) and calls them; the kernels live in ``optim.cpu_kernels``, imported on first use.

torch offers no single op that advances Adam's moments without also writing a parameter, and
the sparse part of OnDARE/OnTIES (Δθ at ~p·n entries) costs a random gather per moment and a
scatter per parameter when done with tensor ops; over a model's hundreds of tensors, the
per-tensor Python overhead of doing it op by op was most of the cost. So each kernel runs
over every tensor of a step at once (tensors passed by address, work split into fixed chunks
of ``CHUNK`` entries, so results do not depend on the number of threads):

- ``dare_steps_``: per chunk, the kept offsets of its DARE mask drawn in the kernel
  (``chunk_kept``: geometric gaps from a counter-based stream keyed by the tensor's key and
  the chunk's first entry, so no mask exists in memory and the mask depends neither on the
  threads nor on the other tensors), ``m, v`` advanced everywhere, then, while ``m_i, v_i``
  are in cache, ``θ_i += (1 − α)·Δθ_i / d`` at the kept entries (``d = p`` for the inverse
  rescale, 1 otherwise) and ``θ_j += α·T_j``.
- ``ties_steps_``: a floor from a strided sample of this step's ``|Δθ|`` a little below the
  k-th largest (as ``sparsify.magnitude_topk_indices``), one pass that advances ``m, v``,
  computes ``Δθ`` everywhere, collects the entries above the floor and counts those equal to
  it (so that a pile of equal values, as in Adam's first steps, costs no writes), the exact
  top-k (a histogram of the candidates' float32 bits, then a partition of one bin; or the
  floor itself, with the first equal entries in index order; ties to lower indices), and the
  TIES merge with ``T`` per chunk (``ties_apply``: a per-thread map from chunk offset to kept
  update).
Arithmetic is float32 in the order of ``functional.adam_moments_`` and
``functional.adam_direction`` (torch's single-tensor AdamW). The kernels take contiguous
float32 CPU tensors; ``OnlineMergingAdamW`` batches those when numba is importable
(``OMOTOOL_KERNELS=0`` turns them off), everything else takes the tensor-op path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Protocol

import numpy as np
import torch

from omotool.errors import UsageError
from omotool.optim.cpu_layout import (  # noqa: F401 (kernels.CHUNK, ... stay public)
    BINS,
    CHUNK,
    SAMPLE,
    SAMPLE_AHEAD,
    SAMPLE_RUN,
)


@cache
def _compiled() -> ModuleType | None:
    """The kernels (``optim.cpu_kernels``, imported on first use so that ``import omotool``
    imports no numba; each compiles at its first call, cached on disk by numba), or None:
    turned off (``OMOTOOL_KERNELS=0``) or numba not importable."""
    if os.environ.get("OMOTOOL_KERNELS", "1") == "0":
        return None
    try:
        import llvmlite  # noqa: F401 - only whether it imports
        import numba  # noqa: F401
    except ImportError:  # pragma: no cover - numba is a dependency, but optional at run time
        return None
    from omotool.optim import cpu_kernels

    return cpu_kernels


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors (contiguous float32 on the CPU)."""
    return (
        all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and _compiled() is not None
    )


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of these contiguous float32 CPU tensors is finite (``usable``)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
    addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    item_tensor, item_start, _ = _items(sizes)
    bad = np.zeros(item_tensor.size, dtype=np.bool_)
    _match_torch_threads()
    _compiled().nonfinite_chunks(addresses, sizes, item_tensor, item_start, bad)
    return not bad.any()


def _adam_scalars(
    step: int, lr: float, beta1: float, beta2: float, eps: float
) -> tuple[np.float32, ...]:
    """``(1 − β1, β2, 1 − β2, √(1 − β2ᵗ), ε, −η/(1 − β1ᵗ))`` as float32, as torch casts them."""
    values = (1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps, -lr / (1 - beta1**step))
    return tuple(np.float32(x) for x in values)


def _match_torch_threads() -> None:
    """Use as many threads as torch (torchrun and users set torch's count, not numba's)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


THREAD_ROWS = {  # kind: (dtype, initial value or None), one chunk-sized row per numba thread
    "scratch": (np.float32, None),  # a chunk's Δθ (ties_candidates_many, ties_apply)
    "offsets": (np.int32, None),  # a chunk's kept offsets (dare_kept, dare_steps)
    "slots": (np.int32, -1),  # offset → place in the kept list (ties_apply restores the −1s)
    "flags": (np.uint8, 0),  # a chunk's byte flags (ties_candidates_many)
}
_thread_rows_made: dict[str, np.ndarray] = {}  # per process: the kernels reuse them every call


def _thread_rows(kind: str) -> np.ndarray:
    """The ``THREAD_ROWS[kind]`` rows, one per numba thread (indexed by ``get_thread_id``),
    allocated on first use."""
    if kind not in _thread_rows_made:
        import numba

        dtype, fill = THREAD_ROWS[kind]
        shape = (numba.config.NUMBA_NUM_THREADS, CHUNK)
        rows = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
        _thread_rows_made[kind] = rows
    return _thread_rows_made[kind]


def scratch_bytes() -> int:
    """Bytes of the per-thread scratch rows allocated so far (shared by the whole process)."""
    return sum(rows.nbytes for rows in _thread_rows_made.values())


def dare_kept_indices(
    numel: int, density: float, key: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """The flat indices in ``[start, stop)`` that ``dare_steps_`` keeps in a tensor of
    ``numel`` entries whose mask key is ``key`` (``sparsify.key_seed(seed, "update", step,
    name)``): ascending, int64; drawn from the chunks that meet the range only, so a shard
    draws its own part of the whole tensor's mask."""
    stop = numel if stop is None else stop
    if stop <= start:
        return torch.empty(0, dtype=torch.long)
    compiled = _compiled()
    if compiled is None:
        raise UsageError(
            "OnDARE masks drawn by chunks (dare_draw='chunks') come from the numba kernels, "
            "which are off here (OMOTOOL_KERNELS=0, or numba cannot be imported); use "
            "dare_draw='generator'."
        )
    first, last = start // CHUNK, -(-stop // CHUNK)
    kernel, log_drop = compiled.dare_kept, _log_drop(density)
    counts = np.zeros(last - first, dtype=np.int64)
    empty, rows = np.empty(0, dtype=np.int64), _thread_rows("offsets")
    _match_torch_threads()
    kernel(key, numel, first, log_drop, counts, empty, empty, rows)
    starts = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    out = np.zeros(int(starts[-1]), dtype=np.int64)
    kernel(key, numel, first, log_drop, counts, starts[:-1], out, rows)
    index = torch.from_numpy(out)
    return index[(index >= start) & (index < stop)] if start % CHUNK or stop < numel else index


def _log_drop(density: float) -> float:
    """``log(1 − p)``, the rate of a DARE mask's geometric gaps (−inf keeps everything)."""
    return math.log1p(-density) if density < 1 else -math.inf


def _items(
    sizes: np.ndarray, origins: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Work items (tensor, first entry) of ``CHUNK`` entries, and each tensor's first item.
    With ``origins`` (where each tensor's entry 0 sits in its whole tensor: a shard's
    offset), the items are the parts of the whole tensor's chunks that the tensor holds."""
    if origins is None:
        origins = np.zeros_like(sizes)
    head = origins % CHUNK  # entries of the first whole chunk before the tensor
    chunks = np.where(sizes > 0, (head + sizes + CHUNK - 1) // CHUNK, 0)
    item_tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), chunks)
    item_first = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(chunks, out=item_first[1:])
    item_start = (np.arange(item_tensor.size, dtype=np.int64) - item_first[item_tensor]) * CHUNK
    item_start = np.maximum(item_start - head[item_tensor], 0)
    return item_tensor, item_start, item_first


def _references(
    references: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Addresses of each T's int32 indices and float32 values, and their counts (0: none)."""
    index_at = np.zeros(len(references), dtype=np.int64)
    value_at = np.zeros(len(references), dtype=np.int64)
    count = np.zeros(len(references), dtype=np.int64)
    for t, reference in enumerate(references):
        if reference is not None:
            index_at[t], value_at[t] = reference[0].data_ptr(), reference[1].data_ptr()
            count[t] = reference[0].numel()
    return index_at, value_at, count


def _batch(
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    adam: list[tuple[int, float, float, float, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(addresses of param, grad, m, v as rows; sizes; Adam scalars as rows per tensor)."""
    addresses = np.array([[x.data_ptr() for x in group] for group in tensors], dtype=np.int64)
    sizes = np.array([group[0].numel() for group in tensors], dtype=np.int64)
    unique = {settings: _adam_scalars(*settings) for settings in set(adam)}  # one per group
    scalars = np.array([unique[settings] for settings in adam], dtype=np.float32)
    return np.ascontiguousarray(addresses.T), sizes, np.ascontiguousarray(scalars.T)


def dare_steps_(
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    keys: list[int],
    references: list[tuple[torch.Tensor, torch.Tensor] | None],
    adam: list[tuple[int, float, float, float, float]],
    *,
    keep: float,
    density: float,
    weight: float,
    alpha: float,
    origins: list[int] | None = None,
) -> tuple[float, np.ndarray]:
    """OnDARE over many tensors in one call: moments, a fresh mask, ``θ += w·Δθ/d + α·T``.

    ``tensors[t] = (param, grad, exp_avg, exp_avg_sq)``; ``keys[t]`` keys tensor t's mask,
    which keeps each entry with probability ``keep`` (``dare_kept_indices`` gives its
    indices); ``density``: the rescale divisor ``d``; ``references[t] = (int32 sorted indices,
    values)`` of ``T`` or None; ``adam[t] = (step, lr, beta1, beta2, eps)``; ``origins[t]``:
    where tensor t starts in its whole tensor (a shard's offset; default 0), whose mask it
    keeps its part of. Returns ``Σ (Δθ[i]/density)²`` over all kept entries and the kept
    count per tensor.
    """
    (param_at, grad_at, m_at, v_at), sizes, scalars = _batch(tensors, adam)
    starts = np.zeros_like(sizes) if origins is None else np.asarray(origins, dtype=np.int64)
    item_tensor, item_start, _ = _items(sizes, starts)
    ref_index_at, ref_value_at, ref_count = _references(references)
    w1, b2, w2, bias2, eps, step_size = scalars
    squares = np.zeros(item_tensor.size)
    kept = np.zeros(item_tensor.size, dtype=np.int64)
    _match_torch_threads()
    _compiled().dare_steps(
        grad_at, m_at, v_at, param_at, sizes, starts, item_tensor, item_start,
        np.asarray(keys, dtype=np.int64), _log_drop(keep), ref_index_at, ref_value_at,
        ref_count, w1, b2, w2, bias2, eps, step_size, np.float32(density), np.float32(weight),
        np.float32(alpha), squares, kept, _thread_rows("offsets"),
    )  # fmt: skip
    per_tensor = np.bincount(item_tensor, weights=kept, minlength=sizes.size)
    return float(squares.sum()), per_tensor.astype(np.int64)


def _coprime_stride(n: int, size: int = SAMPLE // 4) -> int:
    """A stride for a ``size``-entry sample of ``n`` entries, coprime to ``n`` (as
    ``sparsify.sample_stride``, for any ``n``). A small shard's sample is smaller than a large
    tensor's: its floor only bounds the candidates, which an exact selection then ranks."""
    stride = max(1, n // size)
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


@dataclass(frozen=True)
class Candidates:
    """``ties_candidates_many``'s outputs: tensor t's items are ``item_first[t] :
    item_first[t + 1]``; item a's candidates (flat index, ``Δθ``) are ``out_i``/``out_v``
    from ``base[t] + item_start[a]``, ``counts[a]`` of them; ``ties[a]`` entries equal the
    floor."""

    out_i: np.ndarray
    out_v: np.ndarray
    counts: np.ndarray
    ties: np.ndarray
    floors: np.ndarray
    item_first: np.ndarray
    item_start: np.ndarray
    base: np.ndarray


@dataclass(frozen=True)
class Selection:
    """``ties_thresholds``'s outputs, per tensor: ``short``, the ``thresholds`` (float32
    bits) and ``cutoffs`` (the last index kept at the threshold among candidates); per item:
    ``tie_keep`` (how many entries equal to the floor it keeps)."""

    short: np.ndarray
    thresholds: np.ndarray
    cutoffs: np.ndarray
    tie_keep: np.ndarray


class SharedTopK(Protocol):
    """How the ranks holding shards of the same tensors agree on each whole tensor's top-k
    inside ``ties_steps_`` (``backends.cpu_shards``)."""

    def floor_keep(self, keep: list[int], sizes: np.ndarray) -> list[int]:
        """The k each tensor's sampled floor is drawn for (a shard: its share of k)."""

    def floors_(self, floors: np.ndarray, sizes: np.ndarray) -> None:
        """Make the shards' floors their whole tensors' (the same on every rank)."""

    def mask(self, count: int) -> np.ndarray:
        """Which of the ``count`` tensors are shards (bool)."""

    def select_(self, candidates: Candidates, selection: Selection) -> None:
        """The shards' entries of ``selection`` from their whole tensors' top-k."""


def ties_steps_(
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    references: list[tuple[torch.Tensor, torch.Tensor] | None],
    adam: list[tuple[int, float, float, float, float]],
    keep: list[int],
    buffers: tuple[torch.Tensor, torch.Tensor],
    *,
    density: float,
    alpha: float,
    weighted: bool,
    shared: SharedTopK | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OnTIES for many tensors: moments, exact top-``keep[t]`` of ``|Δθ|``, TIES merge with T.

    Per tensor: a floor from a strided sample of this step's ``|Δθ|`` (as
    ``sparsify.magnitude_topk_indices``; small tensors take every entry), one pass that
    advances the moments and collects the entries at or above it, the exact selection among
    them (ties to lower indices) rescaled by ``1/density``, and the TIES merge with T.
    ``buffers``: int64 and float32, at least the total number of entries (only pages that
    receive candidates are touched). Returns ``(short, stats)``: ``short[t]`` when the floor
    was above the k-th largest (moments advanced, nothing applied: select from the whole
    ``Δθ``), and the totals (overlap, conflicts, Σ kept², Σ T² kept).
    ``shared``: where some tensors are shards of whole tensors, how their ranks agree on the
    whole tensor's top-k (``keep[t]`` is then the whole tensor's k).
    """
    from omotool.merging.sparsify import sample_rank, sample_stride

    kernels = _compiled()
    (param_at, grad_at, m_at, v_at), sizes, scalars = _batch(tensors, adam)
    count = sizes.size
    strides = [sample_stride(int(n), SAMPLE) for n in sizes]
    if shared is not None:  # a small shard samples too: its floor is its whole tensor's
        small = shared.mask(count) & (sizes > 0) & np.array([s is None for s in strides])
        strides = [
            _coprime_stride(int(n)) if is_small else s
            for n, s, is_small in zip(sizes, strides, small, strict=True)
        ]
    sample_sizes = [
        0 if s is None else -(-int(n) // s) for n, s in zip(sizes, strides, strict=True)
    ]
    sample_start = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(sample_sizes, out=sample_start[1:])
    samples = np.empty(int(sample_start[-1]), dtype=np.float32)
    _match_torch_threads()
    kernels.ties_sample(
        grad_at, m_at, v_at, sizes, np.array([s or 1 for s in strides], dtype=np.int64),
        sample_start, *scalars, samples,
    )  # fmt: skip
    floor_keep = keep if shared is None else shared.floor_keep(keep, sizes)
    ranks = np.array(
        [
            sample_rank(k, int(n), z) if z else 1
            for k, n, z in zip(floor_keep, sizes, sample_sizes, strict=True)
        ],
        dtype=np.int64,
    )
    floors = np.zeros(count, dtype=np.float32)
    kernels.sample_floors(samples, sample_start, ranks, floors)
    if shared is not None:
        shared.floors_(floors, sizes)
    item_tensor, item_start, item_first = _items(sizes)
    base = np.zeros(count, dtype=np.int64)
    np.cumsum(sizes[:-1], out=base[1:])
    out_i, out_v = (buffer.numpy() for buffer in buffers)
    counts = np.zeros(item_tensor.size, dtype=np.int64)
    ties = np.zeros(item_tensor.size, dtype=np.int64)
    lows, highs = np.empty(item_tensor.size, dtype=np.int32), np.empty_like(counts, np.int32)
    kernels.ties_candidates_many(
        grad_at, m_at, v_at, sizes, item_tensor, item_start, base, *scalars, floors,
        out_i, out_v, counts, ties, lows, highs, _thread_rows("scratch"), _thread_rows("flags"),
    )  # fmt: skip
    keep_array = np.asarray(keep, dtype=np.int64)
    if shared is not None:  # the shards' selection is the whole tensors': made below
        keep_array = np.where(shared.mask(count), 0, keep_array)
    short = np.zeros(count, dtype=np.bool_)
    thresholds = np.empty(count, dtype=np.int32)
    cutoffs = np.empty(count, dtype=np.int64)
    tie_keep = np.zeros(item_tensor.size, dtype=np.int64)
    kernels.ties_thresholds(
        out_i, out_v, counts, ties, lows, highs, floors, item_first, item_start, base,
        keep_array, short, thresholds, cutoffs, tie_keep,
    )  # fmt: skip
    if shared is not None:
        shared.select_(
            Candidates(out_i, out_v, counts, ties, floors, item_first, item_start, base),
            Selection(short, thresholds, cutoffs, tie_keep),
        )
    ref_index_at, ref_value_at, ref_count = _references(references)
    stats = np.zeros((item_tensor.size, 4))
    _, _, _, bias2, eps, step_size = scalars
    kernels.ties_apply(
        param_at, m_at, v_at, bias2, eps, step_size, floors, sizes, item_tensor, item_start,
        base, out_i, out_v, counts, tie_keep, thresholds, cutoffs, np.float32(density),
        ref_index_at, ref_value_at, ref_count, np.float32(alpha), np.float32(1 - alpha),
        weighted, short, stats, _thread_rows("slots"), _thread_rows("scratch"),
    )  # fmt: skip
    return short, stats.sum(axis=0)
