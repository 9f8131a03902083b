"""The numba kernels of ``optim/cpu_kernels.py`` one by one, against plain numpy/torch."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from omotool.merging.consensus import disjoint_merge  # noqa: E402
from omotool.optim import kernels  # noqa: E402
from omotool.optim.cpu_kernels import (  # noqa: E402
    CHUNK,
    MAGNITUDE_BITS,
    chunk_kept,
    direction,
    mix64,
    moments,
    nonfinite_chunks,
    sample_floors,
    ties_entry,
    ties_thresholds,
    top_k_cut,
)

MASK64 = (1 << 64) - 1


def splitmix64_finaliser(z: int) -> int:
    """SplitMix64's finaliser on Python integers (Steele, Lea & Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def lowest_index_topk(values: np.ndarray, k: int) -> np.ndarray:
    """The reference: a mask of the k largest values, ties to lower indices (a stable sort,
    which ``torch.topk`` does not promise)."""
    order = torch.sort(torch.from_numpy(values), descending=True, stable=True).indices[:k]
    mask = np.zeros(values.size, dtype=bool)
    mask[order.numpy()] = True
    return mask


def test_importing_omotool_imports_no_numba() -> None:
    """numba loads (and compiles) on the first kernel call, not with ``import omotool``."""
    code = (
        "import sys, omotool, omotool.optim, omotool.optim.kernels; "
        "print(sorted(m for m in ('numba', 'llvmlite', 'omotool.optim.cpu_kernels') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(kernels._compiled() is None, reason="kernels turned off")
def test_kernels_hands_out_this_module() -> None:
    from omotool.optim import cpu_kernels

    assert kernels._compiled() is cpu_kernels and cpu_kernels.CHUNK == kernels.CHUNK


def test_mix64_is_splitmix64() -> None:
    """SplitMix64 seeded with 0 first outputs 0xE220A8397B1DCDAF; other inputs as the
    finaliser written out on Python integers."""
    golden = 0x9E3779B97F4A7C15
    assert int(mix64(np.uint64(golden))) == 0xE220A8397B1DCDAF
    inputs = np.random.default_rng(0).integers(0, 2**63, 200, dtype=np.uint64) * np.uint64(2)
    outputs = [int(mix64(z)) for z in inputs]
    assert outputs == [splitmix64_finaliser(int(z)) for z in inputs]
    assert len(set(outputs)) == inputs.size


def test_chunk_kept_is_a_deterministic_prefix_closed_mask() -> None:
    """Same (key, lo) → same offsets, ascending and inside the chunk; a shorter chunk draws a
    prefix of them; another key or another first entry draws another mask. (p = 0 divides by
    −0.0: only inside a kernel, under numpy's error model, as ``test_kernels`` checks.)"""

    def draw(key: int, lo: int, hi: int, p: float) -> np.ndarray:
        offsets = np.empty(CHUNK, dtype=np.int32)
        log_drop = math.log1p(-p) if p < 1 else -math.inf
        return offsets[: chunk_kept(key, lo, hi, log_drop, offsets)].copy()

    mask = draw(7, CHUNK, 2 * CHUNK, 0.1)
    assert np.array_equal(mask, draw(7, CHUNK, 2 * CHUNK, 0.1))
    assert np.all(np.diff(mask) > 0) and mask[0] >= 0 and mask[-1] < CHUNK
    assert abs(mask.size - 0.1 * CHUNK) < 5 * (CHUNK * 0.1 * 0.9) ** 0.5
    shorter = draw(7, CHUNK, CHUNK + 1000, 0.1)
    assert np.array_equal(shorter, mask[mask < 1000])
    assert not np.array_equal(draw(8, CHUNK, 2 * CHUNK, 0.1)[:20], mask[:20])
    assert not np.array_equal(draw(7, 0, CHUNK, 0.1)[:20], mask[:20])
    assert np.array_equal(draw(7, 0, 100, 1.0), np.arange(100))


def test_chunk_kept_is_the_mask_dare_kept_indices_gives() -> None:
    key, p, n = 12345, 0.05, 2 * CHUNK + 10
    parts = []
    for lo in range(0, n, CHUNK):
        offsets = np.empty(CHUNK, dtype=np.int32)
        count = chunk_kept(key, lo, min(n, lo + CHUNK), math.log1p(-p), offsets)
        parts.append(lo + offsets[:count].astype(np.int64))
    assert np.array_equal(np.concatenate(parts), kernels.dare_kept_indices(n, p, key).numpy())


def test_moments_and_direction_are_adam_in_torch_order() -> None:
    """Bit for bit the float32 formulas, one rounding per operation (no fused multiply-add)."""
    rng = np.random.default_rng(1)
    g, m = (rng.standard_normal(300).astype(np.float32) for _ in range(2))
    v = rng.random(300).astype(np.float32)
    w1, b2, w2 = np.float32(0.1), np.float32(0.999), np.float32(0.001)
    bias2, eps, size = np.float32(0.05), np.float32(1e-8), np.float32(-0.03)
    new_m, new_v = m + w1 * (g - m), v * b2 + w2 * g * g
    update = (new_m / (np.sqrt(new_v) / bias2 + eps)) * size
    for i in range(g.size):
        mi, vi = moments(g[i], m[i], v[i], w1, b2, w2)
        assert (mi, vi) == (new_m[i], new_v[i])
        assert direction(new_m[i], new_v[i], bias2, eps, size) == update[i]


@pytest.mark.parametrize("weighted", [False, True])
def test_ties_entry_is_the_disjoint_merge_of_two(weighted) -> None:
    """At each entry, (added, T kept, u kept) as ``disjoint_merge`` of ``[T, u]`` with weights
    ``[α, w]``; zeros never agree, a zero vote elects +."""
    alpha, w = np.float32(0.3), np.float32(0.7)
    values = np.array([0.0, 1.0, -1.0, 0.5, -0.5, 2.0, 0.3, -0.7], dtype=np.float32)
    t, u = (x.ravel() for x in np.meshgrid(values, values))
    election = "weighted" if weighted else "unweighted"
    stacked = torch.from_numpy(np.stack([t, u]))
    merged, mask = disjoint_merge(stacked, [alpha, w], election=election, return_mask=True)
    for i in range(t.size):
        added, keep_t, keep_u = ties_entry(t[i], u[i], alpha, w, weighted)
        expected = (merged[i].item(), mask[0, i].item(), mask[1, i].item())
        assert (added, keep_t, keep_u) == expected, (t[i], u[i])
    # the case that tells the two elections apart: T wins the plain vote, u the weighted one
    elected_u = ties_entry(np.float32(1.0), np.float32(-0.5), np.float32(0.1), w, weighted)
    assert elected_u[1:] == ((False, True) if weighted else (True, False))


@pytest.mark.parametrize("seed", range(6))
def test_top_k_cut_keeps_the_top_k_with_ties_to_lower_indices(seed) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 60))
    values = rng.integers(0, 6, size).astype(np.int32)  # many ties
    index = np.sort(rng.choice(1000, size, replace=False)).astype(np.int64)
    for k in range(1, size + 1):
        threshold, cutoff = top_k_cut(values, index, k)
        kept = (values > threshold) | ((values == threshold) & (index <= cutoff))
        assert np.array_equal(kept, lowest_index_topk(values, k)), k
        assert threshold == np.sort(values)[size - k]


def candidates(x: np.ndarray, floor: float) -> dict[str, np.ndarray]:
    """``ties_candidates_many``'s outputs for one tensor ``x`` (entries above ``floor``
    written, those equal counted), computed with numpy."""
    chunks = -(-x.size // CHUNK)
    out_i, out_v = np.zeros(x.size, dtype=np.int64), np.zeros(x.size, dtype=np.float32)
    counts, ties = np.zeros(chunks, dtype=np.int64), np.zeros(chunks, dtype=np.int64)
    lows = np.full(chunks, MAGNITUDE_BITS, dtype=np.int32)
    highs = np.zeros(chunks, dtype=np.int32)
    for c in range(chunks):
        lo, hi = c * CHUNK, min(x.size, (c + 1) * CHUNK)
        part = x[lo:hi]
        above = np.flatnonzero(np.abs(part) > floor)
        counts[c], ties[c] = above.size, np.count_nonzero(np.abs(part) == floor)
        out_i[lo : lo + above.size], out_v[lo : lo + above.size] = lo + above, part[above]
        if above.size:
            bits = np.abs(part[above]).view(np.int32)
            lows[c], highs[c] = bits.min(), bits.max()
    return dict(out_i=out_i, out_v=out_v, counts=counts, ties=ties, lows=lows, highs=highs)


def thresholds_of(x: np.ndarray, floor: float, k: int) -> tuple[int, int, bool, np.ndarray]:
    """``ties_thresholds`` on one tensor: (threshold bits, cutoff, short, tie_keep)."""
    found = candidates(x, floor)
    chunks = found["counts"].size
    item_start = np.arange(chunks, dtype=np.int64) * CHUNK
    outputs = dict(
        short=np.zeros(1, dtype=np.bool_),
        thresholds=np.zeros(1, dtype=np.int32),
        cutoffs=np.zeros(1, dtype=np.int64),
        tie_keep=np.full(chunks, 99, dtype=np.int64),
    )
    ties_thresholds(
        found["out_i"], found["out_v"], found["counts"], found["ties"], found["lows"],
        found["highs"], np.array([floor], dtype=np.float32), np.array([0, chunks]),
        item_start, np.zeros(1, dtype=np.int64), np.array([k]), *outputs.values(),
    )  # fmt: skip
    o = outputs
    return int(o["thresholds"][0]), int(o["cutoffs"][0]), bool(o["short"][0]), o["tie_keep"]


@pytest.mark.parametrize("k", [1, 7, 100, 2500])
def test_ties_thresholds_select_the_lowest_index_top_k(k) -> None:
    """Candidates over three chunks spanning six decades (the histogram's bins are wide) with
    many equal magnitudes: the kept set is the reference top-k, ties to lower indices."""
    rng = np.random.default_rng(k)
    levels = np.float32(10.0) ** rng.integers(-3, 3, 2 * CHUNK + 500).astype(np.float32)
    x = (levels * rng.integers(1, 4, levels.size) * rng.choice([-1, 1], levels.size)).astype(
        np.float32
    )
    threshold, cutoff, short, _ = thresholds_of(x, 0.0, k)
    bits, index = np.abs(x).view(np.int32), np.arange(x.size)
    kept = (bits > threshold) | ((bits == threshold) & (index <= cutoff))
    assert not short and np.array_equal(kept, lowest_index_topk(np.abs(x), k))


def test_ties_thresholds_take_the_floor_and_its_first_equal_entries() -> None:
    """Too few candidates above the floor: the threshold is the floor, and the first entries
    equal to it in index order make up k, counted per chunk; fewer still: short."""
    x = np.zeros(2 * CHUNK + 50, dtype=np.float32)
    x[[3, 9, CHUNK + 5]] = [5.0, -6.0, 7.0]  # above the floor
    x[[4, 10, 2 * CHUNK + 1, 2 * CHUNK + 2]] = [-1.0, 1.0, 1.0, -1.0]  # at the floor
    threshold, cutoff, short, tie_keep = thresholds_of(x, 1.0, 6)
    assert threshold == np.float32(1.0).view(np.int32) and cutoff == -1 and not short
    assert tie_keep.tolist() == [2, 0, 1]
    *_, short, tie_keep = thresholds_of(x, 1.0, 8)
    assert short and tie_keep.tolist() == [0, 0, 0]


def test_sample_floors_are_the_ranked_largest() -> None:
    rng = np.random.default_rng(3)
    sizes = [50, 0, 7]
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    samples = rng.standard_normal(start[-1]).astype(np.float32)
    ranks = np.array([5, 1, 7], dtype=np.int64)
    floors = np.full(3, -1.0, dtype=np.float32)
    expected = [np.sort(samples[start[t] : start[t + 1]])[::-1][ranks[t] - 1] for t in (0, 2)]
    sample_floors(samples.copy(), start, ranks, floors)
    assert floors.tolist() == [expected[0], -1.0, expected[1]]


def test_nonfinite_chunks_flags_the_chunks_that_hold_nan_or_inf() -> None:
    tensors = [torch.zeros(5), torch.full((2 * CHUNK + 3,), 3.0e38)]
    tensors[1][CHUNK + 17] = float("inf")
    tensors[1][-1] = float("nan")
    tensors[0][2] = -float("inf")
    sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
    addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    item_tensor = np.array([0, 1, 1, 1], dtype=np.int64)
    item_start = np.array([0, 0, CHUNK, 2 * CHUNK], dtype=np.int64)
    bad = np.zeros(4, dtype=np.bool_)
    nonfinite_chunks(addresses, sizes, item_tensor, item_start, bad)
    assert bad.tolist() == [True, False, True, True]
