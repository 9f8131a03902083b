"""CPU kernels (numba) for the dense part of an online-merging AdamW step.

torch offers no single op that advances Adam's moments without also writing a parameter, and
the sparse part of OnDARE/OnTIES (Δθ at ~p·n entries) costs a random gather per moment and a
scatter per parameter when done with tensor ops. These kernels make one pass over ``g, m, v``:

- ``dare_step_``: ``m, v`` updated everywhere; at the kept (sorted) ``index``, computed in the
  same pass while ``m_i, v_i`` are in cache: ``θ_i += w · Δθ_i / d`` (``d = p`` for the
  inverse rescale, 1 otherwise; ``w = 1 − α``), then ``θ_j += α·T_j``. ``dare_steps_`` does
  it for all tensors of a step in one call (tensors passed by address), with the masks of
  all tensors drawn together by ``bernoulli_indices_many``: per-tensor Python overhead, not
  arithmetic, was most of the remaining cost of a step.
- ``ties_candidates_``: ``m, v`` updated everywhere; every ``(i, Δθ_i)`` with ``|Δθ_i| ≥ floor``
  collected (``floor`` from a sample, a little below the k-th largest ``|Δθ|``), so the exact
  top-k is then selected among ~1% of the entries; ``ties_merge_``: the TIES merge of the kept
  updates with ``T`` (a merge-join of two sorted index lists).
Both use float32 arithmetic in the order of ``functional.adam_moments_`` and
``functional.adam_direction`` (torch's single-tensor AdamW), and fixed-size chunks, so results
do not depend on the number of threads. They take contiguous float32 CPU tensors and are used
by ``functional.fused_online_merging_adamw_`` for large tensors when numba is importable
(``OMOTOOL_KERNELS=0`` turns them off); everything else takes the tensor-op path.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import numpy as np
import torch

CHUNK = 1 << 16  # entries per work item; fixed, so that results do not depend on threads
TIES_MIN_NUMEL = (1 << 16) + 1  # smaller tensors take no sample (sparsify.sample_positions)


@cache
def _compiled() -> Any:
    """The numba kernels, compiled on first use (cached on disk by numba), or None."""
    if os.environ.get("OMOTOOL_KERNELS", "1") == "0":
        return None
    try:
        from numba import carray, get_thread_id, njit, prange, types
        from numba.extending import intrinsic
    except ImportError:  # pragma: no cover - numba is a dependency, but optional at run time
        return None
    jit = njit(parallel=True, cache=True, boundscheck=False, nogil=True)

    @jit
    def dare_step(
        g, m, v, p, index, ref_index, ref_values, w1, b2, w2, bias2, eps, step_size, density, w,
        alpha, sq,
    ):  # fmt: skip
        n, chunks = g.size, sq.size
        for c in prange(chunks):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            gc, mc, vc = g[lo:hi], m[lo:hi], v[lo:hi]  # slices: the loop vectorizes
            for i in range(hi - lo):
                gi = gc[i]
                mc[i] = mc[i] + w1 * (gi - mc[i])  # lerp(m, g, 1 − β1), as torch for weight < ½
                vc[i] = vc[i] * b2 + w2 * gi * gi
            total = 0.0
            for j in range(np.searchsorted(index, lo), np.searchsorted(index, hi)):
                i = index[j]
                kept = (m[i] / (np.sqrt(v[i]) / bias2 + eps)) * step_size / density
                p[i] += kept * w
                total += float(kept) * float(kept)
            sq[c] = total
            for j in range(np.searchsorted(ref_index, lo), np.searchsorted(ref_index, hi)):
                p[ref_index[j]] += ref_values[j] * alpha

    @jit
    def ties_candidates(
        g, m, v, w1, b2, w2, bias2, eps, step_size, floor, out_i, out_v, counts, scratch, advance
    ):
        n, chunks = g.size, counts.size
        for c in prange(chunks):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            gc, mc, vc = g[lo:hi], m[lo:hi], v[lo:hi]
            update = scratch[get_thread_id()]  # stays in cache between the two loops
            if advance:
                for i in range(hi - lo):
                    gi = gc[i]
                    mi = mc[i] + w1 * (gi - mc[i])
                    vi = vc[i] * b2 + w2 * gi * gi
                    mc[i], vc[i] = mi, vi
                    update[i] = (mi / (np.sqrt(vi) / bias2 + eps)) * step_size
            else:  # the moments are this step's already
                for i in range(hi - lo):
                    update[i] = (mc[i] / (np.sqrt(vc[i]) / bias2 + eps)) * step_size
            found = 0
            for i in range(hi - lo):
                if abs(update[i]) >= floor:
                    out_i[lo + found] = lo + i
                    out_v[lo + found] = update[i]
                    found += 1
            counts[c] = found

    @jit
    def ties_merge(p, kept_index, kept, ref_index, ref_values, alpha, w, weighted, stats):
        n, chunks = p.size, stats.shape[0]
        for c in prange(chunks):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            a, a_end = np.searchsorted(kept_index, lo), np.searchsorted(kept_index, hi)
            b, b_end = np.searchsorted(ref_index, lo), np.searchsorted(ref_index, hi)
            overlap = conflicts = 0
            update_sq = tau_sq = 0.0
            while a < a_end or b < b_end:
                if b == b_end or (a < a_end and kept_index[a] < ref_index[b]):
                    u = kept[a]  # F_K(Δθ) alone: nothing to disagree with
                    p[kept_index[a]] += u * w
                    update_sq += float(u) * float(u)
                    a += 1
                    continue
                t = ref_values[b]
                u = kept[a] if a < a_end and kept_index[a] == ref_index[b] else np.float32(0)
                weighted_t, weighted_u = t * alpha, u * w
                basis_t, basis_u = (weighted_t, weighted_u) if weighted else (t, u)
                elected = np.float32(1) if basis_t + basis_u >= 0 else np.float32(-1)
                keep_t, keep_u = np.sign(basis_t) == elected, np.sign(basis_u) == elected
                zero = np.float32(0)  # a dropped term counts as 0, as (weighted * mask).sum()
                p[ref_index[b]] += (weighted_t if keep_t else zero) + (
                    weighted_u if keep_u else zero
                )
                if keep_t:
                    tau_sq += float(t) * float(t)
                if a < a_end and kept_index[a] == ref_index[b]:
                    overlap += 1
                    if keep_u:
                        update_sq += float(u) * float(u)
                    else:
                        conflicts += 1
                    a += 1
                b += 1
            stats[c, 0], stats[c, 1] = overlap, conflicts
            stats[c, 2], stats[c, 3] = update_sq, tau_sq

    @jit
    def compact(out_i, out_v, counts, offsets, index, values):
        for c in prange(counts.size):
            lo, at = c * CHUNK, offsets[c]
            for j in range(counts[c]):
                index[at + j] = out_i[lo + j]
                values[at + j] = out_v[lo + j]

    @njit(cache=True, boundscheck=False)
    def direction_at(g, m, v, positions, w1, b2, w2, bias2, eps, step_size, out):
        for j in range(positions.size):
            i = positions[j]
            gi = g[i]
            mi = m[i] + w1 * (gi - m[i])
            vi = v[i] * b2 + w2 * gi * gi
            out[j] = (mi / (np.sqrt(vi) / bias2 + eps)) * step_size

    def pointer_to(element):
        pointer = types.CPointer(element)

        @intrinsic
        def cast(typingctx, address):  # noqa: ARG001 - numba's intrinsic signature
            def codegen(context, builder, signature, args):  # noqa: ARG001
                return builder.inttoptr(args[0], context.get_value_type(pointer))

            return pointer(types.int64), codegen

        return cast

    # A tensor's data_ptr() as an array numba can index: one kernel call covers many tensors.
    float_pointer, int_pointer = pointer_to(types.float32), pointer_to(types.int32)

    @jit
    def dare_steps(
        g_at, m_at, v_at, p_at, sizes, item_tensor, item_start, index, index_start, index_count,
        ref_index_at, ref_value_at, ref_count, w1, b2, w2, bias2, eps, step_size, density, w,
        alpha, squares,
    ):  # fmt: skip
        for item in prange(item_tensor.size):
            t = item_tensor[item]
            n = sizes[t]
            g = carray(float_pointer(g_at[t]), (n,))
            m = carray(float_pointer(m_at[t]), (n,))
            v = carray(float_pointer(v_at[t]), (n,))
            p = carray(float_pointer(p_at[t]), (n,))
            lo = item_start[item]
            hi = min(n, lo + CHUNK)
            gc, mc, vc = g[lo:hi], m[lo:hi], v[lo:hi]
            a1, c2, a2 = w1[t], b2[t], w2[t]
            for i in range(hi - lo):
                gi = gc[i]
                mc[i] = mc[i] + a1 * (gi - mc[i])
                vc[i] = vc[i] * c2 + a2 * gi * gi
            kept_at = index[index_start[t] : index_start[t] + index_count[t]]
            scale, bias, tiny = step_size[t], bias2[t], eps[t]
            total = 0.0
            for j in range(np.searchsorted(kept_at, lo), np.searchsorted(kept_at, hi)):
                i = kept_at[j]
                kept = (m[i] / (np.sqrt(v[i]) / bias + tiny)) * scale / density
                p[i] += kept * w
                total += float(kept) * float(kept)
            squares[item] = total
            if ref_count[t] > 0:
                ref_at = carray(int_pointer(ref_index_at[t]), (ref_count[t],))
                ref_of = carray(float_pointer(ref_value_at[t]), (ref_count[t],))
                for j in range(np.searchsorted(ref_at, lo), np.searchsorted(ref_at, hi)):
                    p[ref_at[j]] += ref_of[j] * alpha

    @njit(cache=True, boundscheck=False, nogil=True)
    def gap_positions(gaps, gap_start, numels, positions, counts):
        """Per tensor ``t``: positions ``−1 + cumsum(gaps)`` below ``numels[t]``, written at
        ``gap_start[t]``; ``counts[t] = −1`` when the gaps end before the tensor does."""
        for t in range(numels.size):
            at, count, n = gap_start[t], 0, numels[t]
            position = -1
            for j in range(gap_start[t], gap_start[t + 1]):
                position += np.int64(gaps[j])
                if position >= n:
                    break
                positions[at + count] = position
                count += 1
            counts[t] = count if position >= n - 1 else -1

    return {
        "dare_step": dare_step,
        "ties_candidates": ties_candidates,
        "compact": compact,
        "direction_at": direction_at,
        "ties_merge": ties_merge,
        "dare_steps": dare_steps,
        "gap_positions": gap_positions,
    }


def usable(*tensors: torch.Tensor, min_numel: int = 1) -> bool:
    """Whether the kernels can run on these tensors (contiguous float32 on the CPU)."""
    first = tensors[0]
    return (
        first.numel() >= min_numel
        and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in tensors
        )
        and _compiled() is not None
    )


def _adam_scalars(
    step: int, lr: float, beta1: float, beta2: float, eps: float
) -> tuple[np.float32, ...]:
    """``(1 − β1, β2, 1 − β2, √(1 − β2ᵗ), ε, −η/(1 − β1ᵗ))`` as float32, as torch casts them."""
    values = (1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps, -lr / (1 - beta1**step))
    return tuple(np.float32(x) for x in values)


def _flat(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().view(-1).numpy()


def _match_torch_threads() -> None:
    """Use as many threads as torch (torchrun and users set torch's count, not numba's)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@cache
def _thread_scratch() -> np.ndarray:
    """One chunk-sized float32 row per numba thread (rows indexed by ``get_thread_id``)."""
    import numba

    return np.empty((numba.config.NUMBA_NUM_THREADS, CHUNK), dtype=np.float32)


def dare_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    index: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor, float] | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    density: float,
    weight: float,
) -> float:
    """Moments everywhere; ``θ[i] += weight·Δθ[i]/density`` at the sorted ``index``, then
    ``θ[j] += α·T[j]`` for ``reference = (sorted indices j, values T[j], α)``.

    Returns ``Σ (Δθ[i]/density)²`` over ``index`` (for the update norm).
    """
    dare_step = _compiled()["dare_step"]
    n = param.numel()
    if reference is None:
        reference = (_NO_INDEX, _NO_VALUES, 0.0)
    ref_index, ref_values, alpha = reference
    squares = np.zeros((n + CHUNK - 1) // CHUNK)
    _match_torch_threads()
    dare_step(
        _flat(grad), _flat(exp_avg), _flat(exp_avg_sq), _flat(param), index.numpy(),
        ref_index.numpy(), ref_values.numpy(), *_adam_scalars(step, lr, beta1, beta2, eps),
        np.float32(density), np.float32(weight), np.float32(alpha), squares,
    )  # fmt: skip
    return float(squares.sum())


_NO_INDEX, _NO_VALUES = torch.empty(0, dtype=torch.long), torch.empty(0)


def ties_candidates_(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    floor: float,
    scratch: tuple[torch.Tensor, torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    advance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments everywhere (``advance``; else they are taken as this step's already);
    ``(index, Δθ[index])`` of every entry with ``|Δθ| ≥ floor``.

    ``scratch``: an int64 and a float32 buffer of at least ``n`` entries (only the pages that
    receive candidates are ever touched). ``index`` comes out sorted.
    """
    ties_candidates, compact = _compiled()["ties_candidates"], _compiled()["compact"]
    n = grad.numel()
    out_i, out_v = (buffer[:n].numpy() for buffer in scratch)
    counts = np.zeros((n + CHUNK - 1) // CHUNK, dtype=np.int64)
    _match_torch_threads()
    ties_candidates(
        _flat(grad), _flat(exp_avg), _flat(exp_avg_sq),
        *_adam_scalars(step, lr, beta1, beta2, eps), np.float32(floor), out_i, out_v, counts,
        _thread_scratch(), advance,
    )  # fmt: skip
    offsets = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=offsets[1:])
    index = np.empty(int(counts.sum()), dtype=np.int64)
    values = np.empty(index.size, dtype=np.float32)
    compact(out_i, out_v, counts, offsets, index, values)
    return torch.from_numpy(index), torch.from_numpy(values)


def direction_at(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    positions: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """``Δθ`` at ``positions`` after this step's moment update, without writing the moments."""
    direction = _compiled()["direction_at"]
    out = np.empty(positions.numel(), dtype=np.float32)
    direction(
        _flat(grad), _flat(exp_avg), _flat(exp_avg_sq), positions.numpy(),
        *_adam_scalars(step, lr, beta1, beta2, eps), out,
    )  # fmt: skip
    return torch.from_numpy(out)


def ties_merge_(
    param: torch.Tensor,
    kept_index: torch.Tensor,
    kept: torch.Tensor,
    ref_index: torch.Tensor,
    ref_values: torch.Tensor,
    *,
    alpha: float,
    weighted: bool,
) -> tuple[int, int, float, float]:
    """``θ += (1 − α)·F_K(Δθ) ⊕ α·T`` from sorted ``kept_index``/``kept`` (rescaled ``F_K``)
    and sorted ``ref_index``/``ref_values`` (``T``), as ``functional.apply_ties_``.

    Returns ``(overlap, conflicts, Σ kept² of surviving updates, Σ T² of surviving T)``.
    """
    ties_merge = _compiled()["ties_merge"]
    n = param.numel()
    stats = np.zeros(((n + CHUNK - 1) // CHUNK, 4))
    _match_torch_threads()
    ties_merge(
        _flat(param), kept_index.numpy(), kept.numpy(), ref_index.numpy(), ref_values.numpy(),
        np.float32(alpha), np.float32(1 - alpha), weighted, stats,
    )  # fmt: skip
    totals = stats.sum(axis=0)
    return int(totals[0]), int(totals[1]), float(totals[2]), float(totals[3])


def bernoulli_indices_many(
    numels: list[int], density: float, generators: list[torch.Generator]
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``sparsify.bernoulli_indices`` for many tensors at once (same generators, same indices).

    Returns ``(positions, start, count)``: tensor ``t``'s indices are
    ``positions[start[t] : start[t] + count[t]]``; ``count[t] = −1`` means its gaps ran out
    before the tensor did (rare: draw that one with ``bernoulli_indices``).
    """
    from omotool.merging.sparsify import gap_chunk, gap_dtype, geometric_gaps_

    start = np.zeros(len(numels) + 1, dtype=np.int64)
    np.cumsum([gap_chunk(n, density) for n in numels], out=start[1:])
    gaps = torch.empty(int(start[-1]), dtype=gap_dtype(density))
    for t, generator in enumerate(generators):
        gaps[start[t] : start[t + 1]].uniform_(generator=generator)
    geometric_gaps_(gaps, density)
    positions = np.empty(gaps.numel(), dtype=np.int64)
    counts = np.empty(len(numels), dtype=np.int64)
    _compiled()["gap_positions"](
        gaps.numpy(), start, np.asarray(numels, dtype=np.int64), positions, counts
    )
    return torch.from_numpy(positions), start[:-1], counts


def dare_steps_(
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    kept: tuple[torch.Tensor, np.ndarray, np.ndarray],
    references: list[tuple[torch.Tensor, torch.Tensor] | None],
    adam: list[tuple[int, float, float, float, float]],
    *,
    density: float,
    weight: float,
    alpha: float,
) -> float:
    """``dare_step_`` over many tensors in one call.

    ``tensors[t] = (param, grad, exp_avg, exp_avg_sq)``; ``kept`` as ``bernoulli_indices_many``
    returns it; ``references[t] = (int32 sorted indices, values)`` of ``T`` or None;
    ``adam[t] = (step, lr, beta1, beta2, eps)``. Returns ``Σ (Δθ[i]/density)²`` over all.
    """
    count = len(tensors)
    addresses = np.array([[x.data_ptr() for x in group] for group in tensors], dtype=np.int64)
    param_at, grad_at, m_at, v_at = np.ascontiguousarray(addresses.T)
    sizes = np.array([group[0].numel() for group in tensors], dtype=np.int64)
    chunks = (sizes + CHUNK - 1) // CHUNK
    item_tensor = np.repeat(np.arange(count, dtype=np.int64), chunks)
    first_item = np.concatenate(([0], np.cumsum(chunks)[:-1]))
    item_start = (np.arange(item_tensor.size, dtype=np.int64) - first_item[item_tensor]) * CHUNK
    ref_at = np.zeros((2, count), dtype=np.int64)
    ref_count = np.zeros(count, dtype=np.int64)
    for t, reference in enumerate(references):
        if reference is not None:
            ref_at[0, t], ref_at[1, t] = reference[0].data_ptr(), reference[1].data_ptr()
            ref_count[t] = reference[0].numel()
    scalars = np.array([_adam_scalars(*settings) for settings in adam], dtype=np.float32).T
    w1, b2, w2, bias2, eps, step_size = scalars
    index, index_start, index_count = kept
    squares = np.zeros(item_tensor.size)
    _match_torch_threads()
    _compiled()["dare_steps"](
        grad_at, m_at, v_at, param_at, sizes, item_tensor,
        item_start, index.numpy(), index_start, index_count, ref_at[0], ref_at[1], ref_count,
        w1, b2, w2, bias2, eps, step_size, np.float32(density), np.float32(weight),
        np.float32(alpha), squares,
    )  # fmt: skip
    return float(squares.sum())
