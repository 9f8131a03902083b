"""CPU kernels (numba) for a whole online-merging AdamW step, all tensors at once.

torch offers no single op that advances Adam's moments without also writing a parameter, and
the sparse part of OnDARE/OnTIES (Δθ at ~p·n entries) costs a random gather per moment and a
scatter per parameter when done with tensor ops; over a model's hundreds of tensors, the
per-tensor Python overhead of doing it op by op was most of the cost. So each kernel here runs
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
from functools import cache
from typing import Any

import numpy as np
import torch

from omotool.errors import UsageError

# numba's OpenMP layer loads a second libgomp beside torch's, whose threads spin-wait after
# each parallel region and starve torch's: one kernel call made every later training step
# 10-30x slower on a busy 2-core machine. The workqueue layer's threads do not spin. Set
# before numba is first imported (it reads the environment then); a user's choice stands.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

CHUNK = 1 << 14  # entries per work item; fixed, so that results do not depend on threads
SAMPLE = 1 << 12  # OnTIES floor: |Δθ| sampled at about this many entries per tensor
SAMPLE_RUN = 16  # ... in runs of this many neighbours (one 64-byte line of float32)
SAMPLE_AHEAD = 4  # ... the lines of the run this many runs on asked for in advance
BINS = 1 << 12  # OnTIES selection: histogram bins of the candidates' |Δθ| (float32 bits)


@cache
def _compiled() -> Any:
    """The numba kernels, compiled on first use (cached on disk by numba), or None."""
    if os.environ.get("OMOTOOL_KERNELS", "1") == "0":
        return None
    try:
        from llvmlite import ir
        from numba import carray, get_thread_id, njit, prange, types
        from numba.core import cgutils
        from numba.extending import intrinsic
    except ImportError:  # pragma: no cover - numba is a dependency, but optional at run time
        return None
    jit = njit(parallel=True, cache=True, boundscheck=False, nogil=True)

    @njit(cache=True, boundscheck=False, nogil=True, inline="always")
    def ties_entry(t, u, alpha, w, weighted):
        """TIES at one entry of T (``u`` the kept update there, or 0): (added to θ, T kept,
        u kept), as ``omotool.merging.disjoint_merge`` (a dropped term counts as 0)."""
        weighted_t, weighted_u = t * alpha, u * w
        basis_t, basis_u = (weighted_t, weighted_u) if weighted else (t, u)
        elected = np.float32(1) if basis_t + basis_u >= 0 else np.float32(-1)
        keep_t, keep_u = np.sign(basis_t) == elected, np.sign(basis_u) == elected
        zero = np.float32(0)
        return (weighted_t if keep_t else zero) + (weighted_u if keep_u else zero), keep_t, keep_u

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

    @intrinsic
    def prefetch(typingctx, array, index):  # noqa: ARG001 - numba's intrinsic signature
        """Ask for the cache line of ``array[index]`` (LLVM's prefetch for reading; values
        unchanged): ``ties_sample`` asks for the lines of runs ahead while it computes one."""

        def codegen(context, builder, signature, args):
            kind = signature.args[0]
            data = context.make_array(kind)(context, builder, args[0])
            address = cgutils.get_item_pointer(
                context, builder, kind, data, [args[1]], wraparound=False, boundscheck=False
            )
            i32 = ir.IntType(32)
            function = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
                "llvm.prefetch.p0",
            )
            builder.call(function, [address, i32(0), i32(3), i32(1)])  # read, keep, data
            return context.get_dummy_value()

        return types.void(array, index), codegen

    golden = np.uint64(0x9E3779B97F4A7C15)
    mix_a, mix_b = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    unit = 2.0**-53

    @njit(cache=True, boundscheck=False, nogil=True, inline="always")
    def mix64(z):
        """SplitMix64's finaliser: a bijection of uint64 whose outputs pass BigCrush."""
        z = (z ^ (z >> np.uint64(30))) * mix_a
        z = (z ^ (z >> np.uint64(27))) * mix_b
        return z ^ (z >> np.uint64(31))

    @njit(cache=True, boundscheck=False, nogil=True, inline="always")
    def chunk_kept(key, lo, hi, log_drop, offsets):
        """Offsets from ``lo`` of the entries of ``[lo, hi)`` kept by a Bernoulli(p) mask,
        ascending, written to ``offsets``; returns their count. ``log_drop = log(1 − p)``.

        Gaps between kept entries are i.i.d. Geometric(p), ``⌊log(1 − U)/log(1 − p)⌋ + 1``
        (as ``sparsify.bernoulli_indices``), with ``U`` the top 53 bits of SplitMix64 over a
        counter started at ``mix64(key ⊕ mix64(lo + γ))``: the mask of a chunk depends only on
        the tensor's key and the chunk's first entry."""
        state = mix64(np.uint64(key) ^ mix64(np.uint64(lo) + golden))
        position, count = lo - 1, 0
        while True:
            state += golden
            u = np.float64(mix64(state) >> np.uint64(11)) * unit
            gap = np.floor(np.log1p(-u) / log_drop) + 1.0
            if gap >= hi - position:  # also an infinite gap (p = 0)
                return count
            position += np.int64(gap)
            offsets[count] = position - lo
            count += 1

    @jit
    def dare_kept(key, n, first_chunk, log_drop, counts, starts, out, rows):
        """``chunk_kept`` over chunks ``first_chunk + c`` of a tensor of ``n`` entries (the
        mask ``dare_steps`` applies): with ``starts`` empty, their counts into ``counts[c]``;
        else their flat indices into ``out[starts[c] :]``."""
        for c in prange(counts.size):
            lo = (first_chunk + c) * CHUNK
            hi = min(n, lo + CHUNK)
            if starts.size == 0:
                counts[c] = chunk_kept(key, lo, hi, log_drop, rows[get_thread_id()])
            else:
                at = starts[c]
                for j in range(chunk_kept(key, lo, hi, log_drop, out[at:])):
                    out[at + j] += lo

    @jit
    def dare_steps(
        g_at, m_at, v_at, p_at, sizes, item_tensor, item_start, keys, log_drop, ref_index_at,
        ref_value_at, ref_count, w1, b2, w2, bias2, eps, step_size, density, w, alpha, squares,
        kept_counts, offset_rows,
    ):  # fmt: skip
        for item in prange(item_tensor.size):
            t = item_tensor[item]
            n = sizes[t]
            lo = item_start[item]
            hi = min(n, lo + CHUNK)
            gc = carray(float_pointer(g_at[t]), (n,))[lo:hi]
            mc = carray(float_pointer(m_at[t]), (n,))[lo:hi]
            vc = carray(float_pointer(v_at[t]), (n,))[lo:hi]
            pc = carray(float_pointer(p_at[t]), (n,))[lo:hi]
            offsets = offset_rows[get_thread_id()]
            count = chunk_kept(keys[t], lo, hi, log_drop, offsets)
            a1, c2, a2 = w1[t], b2[t], w2[t]
            for i in range(hi - lo):
                gi = gc[i]
                mc[i] = mc[i] + a1 * (gi - mc[i])
                vc[i] = vc[i] * c2 + a2 * gi * gi
            scale, bias, tiny = step_size[t], bias2[t], eps[t]
            total = 0.0
            for j in range(count):
                i = offsets[j]
                kept = (mc[i] / (np.sqrt(vc[i]) / bias + tiny)) * scale / density
                pc[i] += kept * w
                total += float(kept) * float(kept)
            squares[item], kept_counts[item] = total, count
            if ref_count[t] > 0:
                ref_at = carray(int_pointer(ref_index_at[t]), (ref_count[t],))
                ref_of = carray(float_pointer(ref_value_at[t]), (ref_count[t],))
                for b in range(np.searchsorted(ref_at, lo), np.searchsorted(ref_at, hi)):
                    pc[ref_at[b] - lo] += ref_of[b] * alpha

    @jit
    def ties_sample(g_at, m_at, v_at, sizes, stride, start, w1, b2, w2, bias2, eps, size, out):
        """|Δθ| after this step's moment update at as many entries of tensor t as one in
        ``stride[t]``: runs of ``SAMPLE_RUN`` neighbours (a cache line) ``SAMPLE_RUN·stride``
        apart, so that a sample costs a line read per run rather than per entry; the lines of
        the run ``SAMPLE_AHEAD`` runs on are asked for before a run is computed (the reads
        are scattered: waiting for each in turn was most of the time)."""
        for t in prange(sizes.size):
            n = sizes[t]
            g = carray(float_pointer(g_at[t]), (n,))
            m = carray(float_pointer(m_at[t]), (n,))
            v = carray(float_pointer(v_at[t]), (n,))
            count, gap = start[t + 1] - start[t], SAMPLE_RUN * stride[t]
            for run in range(-(-count // SAMPLE_RUN)):
                for edge in (0, SAMPLE_RUN - 1):  # a run may straddle two lines
                    ahead = min(n - 1, (run + SAMPLE_AHEAD) * gap + edge)
                    prefetch(g, ahead)
                    prefetch(m, ahead)
                    prefetch(v, ahead)
                for j in range(run * SAMPLE_RUN, min(count, (run + 1) * SAMPLE_RUN)):
                    i = min(n - 1, run * gap + j - run * SAMPLE_RUN)
                    gi = g[i]
                    mi = m[i] + w1[t] * (gi - m[i])
                    vi = v[i] * b2[t] + w2[t] * gi * gi
                    out[start[t] + j] = abs((mi / (np.sqrt(vi) / bias2[t] + eps[t])) * size[t])

    @jit
    def sample_floors(samples, start, rank, floors):
        """floors[t]: the rank[t]-th largest of tensor t's sample (0 without a sample)."""
        for t in prange(floors.size):
            count = start[t + 1] - start[t]
            if count > 0:
                ordered = np.partition(samples[start[t] : start[t + 1]], count - rank[t])
                floors[t] = ordered[count - rank[t]]

    magnitude_bits = np.int32(0x7FFFFFFF)  # a float32's bits without the sign: |x| in order

    @jit
    def ties_candidates_many(
        g_at, m_at, v_at, sizes, item_tensor, item_start, base, w1, b2, w2, bias2, eps, size,
        floors, out_i, out_v, counts, ties, lows, highs, scratch, flag_rows,
    ):  # fmt: skip
        """Moments and ``Δθ`` everywhere (one loop that vectorises: on a memory-bound pass the
        √ and ÷ cost little); entries with ``|Δθ| > floor`` written as candidates, those equal
        to the floor only counted (``ties[item]``): however many entries share the floor's
        value (Adam's first steps pile |Δθ| onto a few values), the candidates stay about as
        many as the sample put above the floor. The candidates are found from a byte flag per
        entry, read eight at a time: the ~99% of entries below the floor cost a test per eight.
        ``lows``/``highs``: the least and largest candidate magnitude per chunk, float32 bits."""
        for item in prange(item_tensor.size):
            t = item_tensor[item]
            n = sizes[t]
            lo = item_start[item]
            hi = min(n, lo + CHUNK)
            gc = carray(float_pointer(g_at[t]), (n,))[lo:hi]
            mc = carray(float_pointer(m_at[t]), (n,))[lo:hi]
            vc = carray(float_pointer(v_at[t]), (n,))[lo:hi]
            a1, c2, a2, bias, tiny, scale = w1[t], b2[t], w2[t], bias2[t], eps[t], size[t]
            floor = floors[t]
            row, flags = scratch[get_thread_id()], flag_rows[get_thread_id()]
            equal = 0
            for i in range(hi - lo):
                gi = gc[i]
                mi = mc[i] + a1 * (gi - mc[i])
                vi = vc[i] * c2 + a2 * gi * gi
                mc[i], vc[i] = mi, vi
                update = (mi / (np.sqrt(vi) / bias + tiny)) * scale
                row[i] = update
                magnitude = abs(update)
                equal += magnitude == floor
                flags[i] = magnitude > floor
            words = (hi - lo + 7) // 8
            for i in range(hi - lo, words * 8):
                flags[i] = 0
            at, found = base[t] + lo, 0
            low, high, magnitudes = magnitude_bits, np.int32(0), row.view(np.int32)
            for word, bits in enumerate(flags.view(np.uint64)[:words]):
                if bits != 0:
                    for i in range(word * 8, word * 8 + 8):
                        if flags[i]:
                            out_i[at + found] = lo + i
                            out_v[at + found] = row[i]
                            found += 1
                            magnitude = magnitudes[i] & magnitude_bits
                            low, high = min(low, magnitude), max(high, magnitude)
            counts[item], ties[item], lows[item], highs[item] = found, equal, low, high

    @jit
    def ties_thresholds(
        out_i, out_v, counts, ties, lows, highs, floors, item_first, item_start, base, k, short,
        thresholds, cutoffs, tie_keep,
    ):  # fmt: skip
        """Tensor t's k[t]-th largest |Δθ|, as float32 bits, and the highest index admitted
        at exactly that magnitude among the candidates (ties go to lower indices).

        When the candidates (all above the floor) hold fewer than k, the threshold is the
        floor itself: every candidate is kept, and the first ``k − candidates`` entries equal
        to the floor in index order, counted per chunk in ``tie_keep`` (``ties_apply`` finds
        them). Otherwise a histogram of the candidates' bits (``BINS`` equal bins from the
        least to the largest) finds the bin holding the k-th largest; only that bin is
        partitioned.
        """
        out_u, floor_bits = out_v.view(np.int32), floors.view(np.int32)
        for t in prange(k.size):
            total, equal = 0, 0
            for item in range(item_first[t], item_first[t + 1]):
                total += counts[item]
                equal += ties[item]
                tie_keep[item] = 0
            if total < k[t] and total + equal >= k[t] and k[t] > 0:
                left = k[t] - total
                for item in range(item_first[t], item_first[t + 1]):
                    tie_keep[item] = min(ties[item], left)
                    left -= tie_keep[item]
                thresholds[t] = floor_bits[t] & magnitude_bits
                cutoffs[t] = -1  # no candidate equals the floor: they are all above it
                continue
            if total < k[t] or k[t] <= 0:
                short[t] = total + equal < k[t]
                thresholds[t], cutoffs[t] = magnitude_bits, -1  # nothing is kept
                continue
            low, high = magnitude_bits, np.int32(0)
            for item in range(item_first[t], item_first[t + 1]):
                low, high = min(low, lows[item]), max(high, highs[item])
            shift = 0
            while (high - low) >> shift >= BINS:
                shift += 1
            histogram = np.zeros(BINS, dtype=np.int64)
            for item in range(item_first[t], item_first[t + 1]):
                first = base[t] + item_start[item]
                for j in range(first, first + counts[item]):
                    histogram[((out_u[j] & magnitude_bits) - low) >> shift] += 1
            above, b = 0, BINS - 1
            while above + histogram[b] < k[t]:
                above += histogram[b]
                b -= 1
            size = histogram[b]
            bin_u = np.empty(size, dtype=np.int32)
            bin_i = np.empty(size, dtype=np.int64)
            at = 0
            for item in range(item_first[t], item_first[t + 1]):
                first = base[t] + item_start[item]
                for j in range(first, first + counts[item]):
                    u = out_u[j] & magnitude_bits
                    if (u - low) >> shift == b:
                        bin_u[at], bin_i[at] = u, out_i[j]
                        at += 1
            need = k[t] - above  # the need-th largest of the bin is the k-th largest
            threshold = np.partition(bin_u.copy(), size - need)[size - need]
            equal_left = k[t] - above
            for j in range(size):
                equal_left -= bin_u[j] > threshold
            cutoff = -1
            for j in range(size):  # bin_i ascends: the first equal_left ties are kept
                if bin_u[j] == threshold and equal_left > 0:
                    cutoff = bin_i[j]
                    equal_left -= 1
            thresholds[t], cutoffs[t] = threshold, cutoff

    @jit
    def ties_apply(
        p_at, m_at, v_at, bias2, eps, size, floors, sizes, item_tensor, item_start, base, out_i,
        out_v, counts, tie_keep, thresholds, cutoffs, density, ref_index_at, ref_value_at,
        ref_count, alpha, w, weighted, short, stats, slots, scratch,
    ):  # fmt: skip
        """Per chunk: keep the candidates at or above the threshold (compacted in place,
        rescaled by 1/density), then the TIES merge with T into the parameter: at T's
        entries ``ties_entry``, at the other kept entries ``θ_i += (1 − α)·u_i``.

        ``slots`` (one chunk-sized int32 row per thread, all −1 between calls) maps a kept
        entry's offset in the chunk to its place in the kept list, so that T's entries find
        the update there without a branchy merge of the two sorted lists. A chunk with
        ``tie_keep[item] > 0`` also keeps that many of its entries equal to the threshold (the
        floor), found by recomputing ``Δθ`` from the updated moments, in index order."""
        out_u = out_v.view(np.int32)
        for item in prange(item_tensor.size):
            t = item_tensor[item]
            if short[t]:
                continue
            n = sizes[t]
            p = carray(float_pointer(p_at[t]), (n,))
            lo = item_start[item]
            hi = min(n, lo + CHUNK)
            first = base[t] + lo
            threshold, cutoff, found = thresholds[t], cutoffs[t], first
            slot = slots[get_thread_id()]
            for j in range(first, first + counts[item]):
                u, i = out_u[j] & magnitude_bits, out_i[j]
                if u > threshold or (u == threshold and i <= cutoff):
                    out_i[found], out_v[found] = i, out_v[j] / density
                    slot[i - lo] = found
                    found += 1
            if tie_keep[item] > 0:
                mc = carray(float_pointer(m_at[t]), (n,))[lo:hi]
                vc = carray(float_pointer(v_at[t]), (n,))[lo:hi]
                bias, tiny, scale, left = bias2[t], eps[t], size[t], tie_keep[item]
                floor, row = floors[t], scratch[get_thread_id()]
                for i in range(hi - lo):  # vectorises; the search below then only compares
                    row[i] = (mc[i] / (np.sqrt(vc[i]) / bias + tiny)) * scale
                for i in range(hi - lo):
                    if abs(row[i]) == floor:
                        out_i[found], out_v[found] = lo + i, row[i] / density
                        slot[i] = found
                        found += 1
                        left -= 1
                        if left == 0:
                            break
            overlap = conflicts = 0
            update_sq = tau_sq = 0.0
            if ref_count[t] > 0:
                ref_at = carray(int_pointer(ref_index_at[t]), (ref_count[t],))
                ref_of = carray(float_pointer(ref_value_at[t]), (ref_count[t],))
                for b in range(np.searchsorted(ref_at, lo), np.searchsorted(ref_at, hi)):
                    at, tau = ref_at[b], ref_of[b]
                    a = slot[at - lo]
                    u = out_v[a] if a >= 0 else np.float32(0)
                    added, keep_t, keep_u = ties_entry(tau, u, alpha, w, weighted)
                    p[at] += added
                    if keep_t:
                        tau_sq += float(tau) * float(tau)
                    if a >= 0:
                        slot[at - lo] = -2  # merged here
                        overlap += 1
                        if keep_u:
                            update_sq += float(u) * float(u)
                        else:
                            conflicts += 1
            for a in range(first, found):
                i = out_i[a]
                alone = slot[i - lo] >= 0
                slot[i - lo] = -1
                if alone:
                    u = out_v[a]
                    p[i] += u * w
                    update_sq += float(u) * float(u)
            stats[item, 0], stats[item, 1] = overlap, conflicts
            stats[item, 2], stats[item, 3] = update_sq, tau_sq

    exponent_bits = np.int32(0x7F800000)  # all ones in a float32's exponent: ±inf or NaN

    @jit
    def nonfinite_chunks(g_at, sizes, item_tensor, item_start, bad):
        """bad[item]: whether the chunk holds a NaN or ±inf (an integer max over the
        exponent bits, which vectorises, unlike a float test)."""
        for item in prange(item_tensor.size):
            t = item_tensor[item]
            n = sizes[t]
            lo = item_start[item]
            g = carray(int_pointer(g_at[t]), (n,))[lo : min(n, lo + CHUNK)]
            worst = np.int32(0)
            for i in range(g.size):  # from 0: no negative-index wraparound, so it vectorises
                worst = max(worst, g[i] & exponent_bits)
            bad[item] = worst == exponent_bits

    return {
        "dare_kept": dare_kept,
        "dare_steps": dare_steps,
        "nonfinite_chunks": nonfinite_chunks,
        "ties_sample": ties_sample,
        "sample_floors": sample_floors,
        "ties_candidates_many": ties_candidates_many,
        "ties_thresholds": ties_thresholds,
        "ties_apply": ties_apply,
    }


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
    _compiled()["nonfinite_chunks"](addresses, sizes, item_tensor, item_start, bad)
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


@cache
def _thread_scratch() -> np.ndarray:
    """One chunk-sized float32 row per numba thread (rows indexed by ``get_thread_id``)."""
    import numba

    return np.empty((numba.config.NUMBA_NUM_THREADS, CHUNK), dtype=np.float32)


@cache
def _thread_slots() -> np.ndarray:
    """One chunk-sized int32 row of −1 per numba thread (``ties_apply`` restores the −1s)."""
    import numba

    return np.full((numba.config.NUMBA_NUM_THREADS, CHUNK), -1, dtype=np.int32)


@cache
def _thread_flags() -> np.ndarray:
    """One chunk-sized uint8 row per numba thread (``ties_candidates_many``'s flags)."""
    import numba

    return np.zeros((numba.config.NUMBA_NUM_THREADS, CHUNK), dtype=np.uint8)


@cache
def _thread_offsets() -> np.ndarray:
    """One chunk-sized int32 row per numba thread (``dare_steps``: a chunk's kept offsets)."""
    import numba

    return np.empty((numba.config.NUMBA_NUM_THREADS, CHUNK), dtype=np.int32)


def scratch_bytes() -> int:
    """Bytes of the per-thread scratch rows allocated so far (shared by the whole process)."""
    rows = [
        f()
        for f in (_thread_scratch, _thread_slots, _thread_offsets, _thread_flags)
        if f.cache_info().currsize
    ]
    return sum(row.nbytes for row in rows)


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
    kernel, log_drop = compiled["dare_kept"], _log_drop(density)
    counts = np.zeros(last - first, dtype=np.int64)
    empty, rows = np.empty(0, dtype=np.int64), _thread_offsets()
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


def _items(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Work items (tensor, first entry) of ``CHUNK`` entries, and each tensor's first item."""
    chunks = (sizes + CHUNK - 1) // CHUNK
    item_tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), chunks)
    item_first = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(chunks, out=item_first[1:])
    item_start = (np.arange(item_tensor.size, dtype=np.int64) - item_first[item_tensor]) * CHUNK
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
) -> tuple[float, np.ndarray]:
    """OnDARE over many tensors in one call: moments, a fresh mask, ``θ += w·Δθ/d + α·T``.

    ``tensors[t] = (param, grad, exp_avg, exp_avg_sq)``; ``keys[t]`` keys tensor t's mask,
    which keeps each entry with probability ``keep`` (``dare_kept_indices`` gives its
    indices); ``density``: the rescale divisor ``d``; ``references[t] = (int32 sorted indices,
    values)`` of ``T`` or None; ``adam[t] = (step, lr, beta1, beta2, eps)``. Returns
    ``Σ (Δθ[i]/density)²`` over all kept entries and the kept count per tensor.
    """
    (param_at, grad_at, m_at, v_at), sizes, scalars = _batch(tensors, adam)
    item_tensor, item_start, _ = _items(sizes)
    ref_index_at, ref_value_at, ref_count = _references(references)
    w1, b2, w2, bias2, eps, step_size = scalars
    squares = np.zeros(item_tensor.size)
    kept = np.zeros(item_tensor.size, dtype=np.int64)
    _match_torch_threads()
    _compiled()["dare_steps"](
        grad_at, m_at, v_at, param_at, sizes, item_tensor, item_start,
        np.asarray(keys, dtype=np.int64), _log_drop(keep), ref_index_at, ref_value_at,
        ref_count, w1, b2, w2, bias2, eps, step_size, np.float32(density), np.float32(weight),
        np.float32(alpha), squares, kept, _thread_offsets(),
    )  # fmt: skip
    per_tensor = np.bincount(item_tensor, weights=kept, minlength=sizes.size)
    return float(squares.sum()), per_tensor.astype(np.int64)


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
    """
    from omotool.merging.sparsify import sample_rank, sample_stride

    kernels = _compiled()
    (param_at, grad_at, m_at, v_at), sizes, scalars = _batch(tensors, adam)
    count = sizes.size
    strides = [sample_stride(int(n), SAMPLE) for n in sizes]
    sample_sizes = [
        0 if s is None else -(-int(n) // s) for n, s in zip(sizes, strides, strict=True)
    ]
    sample_start = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(sample_sizes, out=sample_start[1:])
    samples = np.empty(int(sample_start[-1]), dtype=np.float32)
    _match_torch_threads()
    kernels["ties_sample"](
        grad_at, m_at, v_at, sizes, np.array([s or 1 for s in strides], dtype=np.int64),
        sample_start, *scalars, samples,
    )  # fmt: skip
    ranks = np.array(
        [
            sample_rank(k, int(n), z) if z else 1
            for k, n, z in zip(keep, sizes, sample_sizes, strict=True)
        ],
        dtype=np.int64,
    )
    floors = np.zeros(count, dtype=np.float32)
    kernels["sample_floors"](samples, sample_start, ranks, floors)
    item_tensor, item_start, item_first = _items(sizes)
    base = np.zeros(count, dtype=np.int64)
    np.cumsum(sizes[:-1], out=base[1:])
    out_i, out_v = (buffer.numpy() for buffer in buffers)
    counts = np.zeros(item_tensor.size, dtype=np.int64)
    ties = np.zeros(item_tensor.size, dtype=np.int64)
    lows, highs = np.empty(item_tensor.size, dtype=np.int32), np.empty_like(counts, np.int32)
    kernels["ties_candidates_many"](
        grad_at, m_at, v_at, sizes, item_tensor, item_start, base, *scalars, floors,
        out_i, out_v, counts, ties, lows, highs, _thread_scratch(), _thread_flags(),
    )  # fmt: skip
    keep_array = np.asarray(keep, dtype=np.int64)
    short = np.zeros(count, dtype=np.bool_)
    thresholds = np.empty(count, dtype=np.int32)
    cutoffs = np.empty(count, dtype=np.int64)
    tie_keep = np.zeros(item_tensor.size, dtype=np.int64)
    kernels["ties_thresholds"](
        out_i, out_v, counts, ties, lows, highs, floors, item_first, item_start, base,
        keep_array, short, thresholds, cutoffs, tie_keep,
    )  # fmt: skip
    ref_index_at, ref_value_at, ref_count = _references(references)
    stats = np.zeros((item_tensor.size, 4))
    _, _, _, bias2, eps, step_size = scalars
    kernels["ties_apply"](
        param_at, m_at, v_at, bias2, eps, step_size, floors, sizes, item_tensor, item_start,
        base, out_i, out_v, counts, tie_keep, thresholds, cutoffs, np.float32(density),
        ref_index_at, ref_value_at, ref_count, np.float32(alpha), np.float32(1 - alpha),
        weighted, short, stats, _thread_slots(), _thread_scratch(),
    )  # fmt: skip
    return short, stats.sum(axis=0)
