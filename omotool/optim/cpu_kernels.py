"""The numba kernels of the CPU fast path; ``optim.kernels`` is their host side.

Importing this module imports numba (``kernels`` does so on first use only, so that ``import
omotool`` does not); each kernel compiles at its first call, cached on disk by numba.

Conventions shared by the kernels (``kernels`` prepares the arrays):
- tensors are passed by address (``data_ptr()``) in int64 arrays, ``*_at[t]`` for tensor t of
  ``sizes[t]`` float32 entries, so one call covers every tensor of a step;
- the work is split into items of ``CHUNK`` entries, ``item_tensor[item]`` and
  ``item_start[item]`` (its first entry), so results do not depend on the number of threads;
- Adam's scalars are float32 rows per tensor, ``w1 = 1 − β1``, ``b2 = β2``, ``w2 = 1 − β2``,
  ``bias2 = √(1 − β2ᵗ)``, ``eps``, ``size = −η/(1 − β1ᵗ)`` (``kernels._adam_scalars``);
- magnitudes are compared as float32 bits without the sign (integers in the same order);
- per-thread scratch rows (indexed by ``get_thread_id``) are ``kernels.THREAD_ROWS``.
"""

from __future__ import annotations

# First: importing cpu_layout sets numba's threading layer, which numba reads when imported.
from omotool.optim.cpu_layout import BINS, CHUNK, SAMPLE_AHEAD, SAMPLE_RUN

# isort: split
import numpy as np
from llvmlite import ir
from numba import carray, get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

kernel = njit(parallel=True, cache=True, boundscheck=False, nogil=True)
"""A kernel: its ``prange`` loops run on numba's threads."""
inlined = njit(cache=True, boundscheck=False, nogil=True, inline="always")
"""A piece of a kernel, inlined into it (in numba's IR, so the kernel's loops still vectorise)."""

MAGNITUDE_BITS = np.int32(0x7FFFFFFF)  # a float32's bits without the sign: |x| in order
EXPONENT_BITS = np.int32(0x7F800000)  # all ones in a float32's exponent: ±inf or NaN
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
MIX_A, MIX_B = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
UNIT = 2.0**-53  # 53 random bits → [0, 1)


def pointer_to(element: types.Type):
    """An intrinsic ``address (int64) → pointer to element``, for ``carray``."""
    pointer = types.CPointer(element)

    @intrinsic
    def cast(typingctx, address):  # noqa: ARG001 - numba's intrinsic signature
        def codegen(context, builder, signature, args):  # noqa: ARG001
            return builder.inttoptr(args[0], context.get_value_type(pointer))

        return pointer(types.int64), codegen

    return cast


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


@inlined
def floats(address, n):
    """The ``n`` float32 entries at ``address`` as an array."""
    return carray(float_pointer(address), (n,))


@inlined
def ints(address, n):
    """The ``n`` int32 entries (or float32 bits) at ``address`` as an array."""
    return carray(int_pointer(address), (n,))


@inlined
def chunk_of(item, item_tensor, item_start, sizes):
    """Work item ``item`` as ``(t, n, lo, hi)``: tensor t of n entries, its entries [lo, hi)."""
    t = item_tensor[item]
    n = sizes[t]
    lo = item_start[item]
    return t, n, lo, min(n, lo + CHUNK)


@inlined
def moments(g, m, v, w1, b2, w2):
    """Adam's moments after gradient g: ``(m + (1 − β1)·(g − m), β2·v + (1 − β2)·g²)``, in
    torch's order (``functional.adam_moments_``)."""
    return m + w1 * (g - m), v * b2 + w2 * g * g


@inlined
def direction(m, v, bias2, eps, size):
    """Adam's update ``Δθ = (m / (√v / √(1 − β2ᵗ) + ε))·(−η/(1 − β1ᵗ))`` from the updated
    moments, in torch's order (``functional.adam_direction``)."""
    return (m / (np.sqrt(v) / bias2 + eps)) * size


@inlined
def reference_run(ref_index_at, ref_value_at, ref_count, t, lo, hi):
    """T of tensor t (sorted int32 indices, float32 values) and the run of its entries in
    [lo, hi), as ``(indices, values, first, stop)``."""
    ref_at = ints(ref_index_at[t], ref_count[t])
    ref_of = floats(ref_value_at[t], ref_count[t])
    return ref_at, ref_of, np.searchsorted(ref_at, lo), np.searchsorted(ref_at, hi)


@inlined
def ties_entry(t, u, alpha, w, weighted):
    """TIES at one entry of T (``u`` the kept update there, or 0): (added to θ, T kept,
    u kept), as ``omotool.merging.disjoint_merge`` (a dropped term counts as 0): the sign
    of ``t + u`` (``α·t + w·u`` when ``weighted``; ≥ 0 elects +) is elected, and each term
    of that sign adds ``α·t`` or ``w·u``."""
    weighted_t, weighted_u = t * alpha, u * w
    basis_t, basis_u = (weighted_t, weighted_u) if weighted else (t, u)
    elected = np.float32(1) if basis_t + basis_u >= 0 else np.float32(-1)
    keep_t, keep_u = np.sign(basis_t) == elected, np.sign(basis_u) == elected
    zero = np.float32(0)
    return (weighted_t if keep_t else zero) + (weighted_u if keep_u else zero), keep_t, keep_u


@inlined
def mix64(z):
    """SplitMix64's finaliser: a bijection of uint64 whose outputs pass BigCrush."""
    z = (z ^ (z >> np.uint64(30))) * MIX_A
    z = (z ^ (z >> np.uint64(27))) * MIX_B
    return z ^ (z >> np.uint64(31))


@inlined
def chunk_kept(key, lo, hi, log_drop, offsets):
    """Offsets from ``lo`` of the entries of ``[lo, hi)`` kept by a Bernoulli(p) mask,
    ascending, written to ``offsets``; returns their count. ``log_drop = log(1 − p)``.

    Gaps between kept entries are i.i.d. Geometric(p), ``⌊log(1 − U)/log(1 − p)⌋ + 1``
    (as ``sparsify.bernoulli_indices``), with ``U`` the top 53 bits of SplitMix64 over a
    counter started at ``mix64(key ⊕ mix64(lo + γ))``: the mask of a chunk depends only on
    the tensor's key and the chunk's first entry. ``p = 0`` (``log_drop = −0.0``) keeps
    nothing inside a kernel (numpy's error model: an infinite gap); a call from Python raises
    ZeroDivisionError there."""
    state = mix64(np.uint64(key) ^ mix64(np.uint64(lo) + GOLDEN))
    position, count = lo - 1, 0
    while True:
        state += GOLDEN
        u = np.float64(mix64(state) >> np.uint64(11)) * UNIT
        gap = np.floor(np.log1p(-u) / log_drop) + 1.0
        if gap >= hi - position:  # also an infinite gap (p = 0)
            return count
        position += np.int64(gap)
        offsets[count] = position - lo
        count += 1


@kernel
def dare_kept(key, n, first_chunk, log_drop, counts, starts, out, rows):
    """``chunk_kept`` over chunks ``first_chunk + c`` of a tensor of ``n`` entries (the
    mask ``dare_steps`` applies): with ``starts`` empty, their counts into ``counts[c]``;
    else their flat indices into ``out[starts[c] :]``. ``rows``: int32 per thread."""
    for c in prange(counts.size):
        lo = (first_chunk + c) * CHUNK
        hi = min(n, lo + CHUNK)
        if starts.size == 0:
            counts[c] = chunk_kept(key, lo, hi, log_drop, rows[get_thread_id()])
        else:
            at = starts[c]
            for j in range(chunk_kept(key, lo, hi, log_drop, out[at:])):
                out[at + j] += lo


@kernel
def dare_steps(
    g_at, m_at, v_at, p_at, sizes, origins, item_tensor, item_start, keys, log_drop,
    ref_index_at, ref_value_at, ref_count, w1, b2, w2, bias2, eps, step_size, density, w, alpha,
    squares, kept_counts, offset_rows,
):  # fmt: skip
    """OnDARE per chunk: ``m, v`` advanced everywhere, then, while they are in cache,
    ``θ_i += w·Δθ_i/density`` at the chunk's ``chunk_kept(keys[t], …)`` entries and ``θ_j +=
    α·T_j``. ``squares[item]``: ``Σ (Δθ_i/density)²`` over the kept entries,
    ``kept_counts[item]`` their count; ``offset_rows``: int32 per thread.

    ``origins[t]``: where tensor t's entry 0 sits in its whole tensor (a shard's offset; 0
    for a whole tensor). Items are the whole tensor's chunks (``kernels._items``): a chunk's
    mask is drawn from the whole chunk's first entry and cut to the shard, so a shard keeps
    exactly the entries the whole tensor's mask keeps there."""
    for item in prange(item_tensor.size):
        t, n, lo, _ = chunk_of(item, item_tensor, item_start, sizes)
        origin = origins[t]
        start = (origin + lo) // CHUNK * CHUNK  # the whole tensor's chunk holding entry lo
        hi = min(n, start + CHUNK - origin)
        gc, mc = floats(g_at[t], n)[lo:hi], floats(m_at[t], n)[lo:hi]
        vc, pc = floats(v_at[t], n)[lo:hi], floats(p_at[t], n)[lo:hi]
        offsets = offset_rows[get_thread_id()]
        count = chunk_kept(keys[t], start, origin + hi, log_drop, offsets)
        skip = origin + lo - start  # the chunk's entries before this shard
        a1, c2, a2 = w1[t], b2[t], w2[t]
        for i in range(hi - lo):
            mc[i], vc[i] = moments(gc[i], mc[i], vc[i], a1, c2, a2)
        scale, bias, tiny = step_size[t], bias2[t], eps[t]
        total = 0.0
        kept = 0
        for j in range(count):
            i = offsets[j] - skip
            if i < 0:
                continue
            kept += 1
            update = direction(mc[i], vc[i], bias, tiny, scale) / density
            pc[i] += update * w
            total += float(update) * float(update)
        squares[item], kept_counts[item] = total, kept
        if ref_count[t] > 0:
            ref_at, ref_of, first, stop = reference_run(
                ref_index_at, ref_value_at, ref_count, t, lo, hi
            )
            for b in range(first, stop):
                pc[ref_at[b] - lo] += ref_of[b] * alpha


@kernel
def nonfinite_chunks(g_at, sizes, item_tensor, item_start, bad):
    """bad[item]: whether the chunk holds a NaN or ±inf (an integer max over the
    exponent bits, which vectorises, unlike a float test)."""
    for item in prange(item_tensor.size):
        t, n, lo, hi = chunk_of(item, item_tensor, item_start, sizes)
        g = ints(g_at[t], n)[lo:hi]
        worst = np.int32(0)
        for i in range(g.size):  # from 0: no negative-index wraparound, so it vectorises
            worst = max(worst, g[i] & EXPONENT_BITS)
        bad[item] = worst == EXPONENT_BITS


@kernel
def ties_sample(g_at, m_at, v_at, sizes, stride, start, w1, b2, w2, bias2, eps, size, out):
    """|Δθ| after this step's moment update at as many entries of tensor t as one in
    ``stride[t]``, into ``out[start[t] : start[t + 1]]`` (moments not written): runs of
    ``SAMPLE_RUN`` neighbours (a cache line) ``SAMPLE_RUN·stride`` apart, so that a sample
    costs a line read per run rather than per entry; the lines of the run ``SAMPLE_AHEAD``
    runs on are asked for before a run is computed (the reads are scattered: waiting for each
    in turn was most of the time)."""
    for t in prange(sizes.size):
        n = sizes[t]
        g, m, v = floats(g_at[t], n), floats(m_at[t], n), floats(v_at[t], n)
        count, gap = start[t + 1] - start[t], SAMPLE_RUN * stride[t]
        for run in range(-(-count // SAMPLE_RUN)):
            for edge in (0, SAMPLE_RUN - 1):  # a run may straddle two lines
                ahead = min(n - 1, (run + SAMPLE_AHEAD) * gap + edge)
                prefetch(g, ahead)
                prefetch(m, ahead)
                prefetch(v, ahead)
            for j in range(run * SAMPLE_RUN, min(count, (run + 1) * SAMPLE_RUN)):
                i = min(n - 1, run * gap + j - run * SAMPLE_RUN)
                mi, vi = moments(g[i], m[i], v[i], w1[t], b2[t], w2[t])
                out[start[t] + j] = abs(direction(mi, vi, bias2[t], eps[t], size[t]))


@kernel
def sample_floors(samples, start, rank, floors):
    """floors[t]: the rank[t]-th largest of tensor t's sample (left as it is without one)."""
    for t in prange(floors.size):
        count = start[t + 1] - start[t]
        if count > 0:
            ordered = np.partition(samples[start[t] : start[t + 1]], count - rank[t])
            floors[t] = ordered[count - rank[t]]


@kernel
def ties_candidates_many(
    g_at, m_at, v_at, sizes, item_tensor, item_start, base, w1, b2, w2, bias2, eps, size,
    floors, out_i, out_v, counts, ties, lows, highs, scratch, flag_rows,
):  # fmt: skip
    """Moments and ``Δθ`` everywhere (one loop that vectorises: on a memory-bound pass the
    √ and ÷ cost little); entries with ``|Δθ| > floor`` written as candidates (flat index
    into ``out_i``, ``Δθ`` into ``out_v``, from ``base[t] + lo`` on; their count into
    ``counts[item]``), those equal to the floor only counted (``ties[item]``): however many
    entries share the floor's value (Adam's first steps pile |Δθ| onto a few values), the
    candidates stay about as many as the sample put above the floor. The candidates are found
    from a byte flag per entry, read eight at a time: the ~99% of entries below the floor
    cost a test per eight. ``lows``/``highs``: the least and largest candidate magnitude per
    chunk, float32 bits (``MAGNITUDE_BITS`` and 0 without candidates)."""
    for item in prange(item_tensor.size):
        t, n, lo, hi = chunk_of(item, item_tensor, item_start, sizes)
        gc, mc = floats(g_at[t], n)[lo:hi], floats(m_at[t], n)[lo:hi]
        vc = floats(v_at[t], n)[lo:hi]
        a1, c2, a2, bias, tiny, scale = w1[t], b2[t], w2[t], bias2[t], eps[t], size[t]
        floor = floors[t]
        row, flags = scratch[get_thread_id()], flag_rows[get_thread_id()]
        equal = 0
        for i in range(hi - lo):
            mi, vi = moments(gc[i], mc[i], vc[i], a1, c2, a2)
            mc[i], vc[i] = mi, vi
            update = direction(mi, vi, bias, tiny, scale)
            row[i] = update
            magnitude = abs(update)
            equal += magnitude == floor
            flags[i] = magnitude > floor
        words = (hi - lo + 7) // 8
        for i in range(hi - lo, words * 8):
            flags[i] = 0
        at, found = base[t] + lo, 0
        low, high, magnitudes = MAGNITUDE_BITS, np.int32(0), row.view(np.int32)
        for word, bits in enumerate(flags.view(np.uint64)[:words]):
            if bits != 0:
                for i in range(word * 8, word * 8 + 8):
                    if flags[i]:
                        out_i[at + found] = lo + i
                        out_v[at + found] = row[i]
                        found += 1
                        magnitude = magnitudes[i] & MAGNITUDE_BITS
                        low, high = min(low, magnitude), max(high, magnitude)
        counts[item], ties[item], lows[item], highs[item] = found, equal, low, high


@inlined
def share_in_order(counts, quota, shares):
    """``shares[c]``: how many of ``counts[c]`` the first ``quota`` take, in order (so that
    ``Σ shares = min(quota, Σ counts)``): ties kept by lower index, group by group."""
    for c in range(counts.size):
        shares[c] = min(counts[c], quota)
        quota -= shares[c]


@inlined
def top_k_cut(values, index, k):
    """The top ``k`` of ``values`` (1 ≤ k ≤ size; ``index`` ascending), ties to lower indices,
    as ``(threshold, cutoff)``: kept are ``values > threshold`` and ``values == threshold`` at
    ``index ≤ cutoff``; ``threshold`` is the k-th largest value."""
    size = values.size
    threshold = np.partition(values.copy(), size - k)[size - k]
    equal_left = k
    for j in range(size):
        equal_left -= values[j] > threshold
    cutoff = -1
    for j in range(size):  # index ascends: the first equal_left ties are kept
        if values[j] == threshold and equal_left > 0:
            cutoff = index[j]
            equal_left -= 1
    return threshold, cutoff


@inlined
def candidate_bin(out_u, out_i, firsts, counts, low, shift, k):
    """The candidates (``out_u[firsts[c] : firsts[c] + counts[c]]``, magnitudes as bits) in
    the bin that holds their k-th largest, of ``BINS`` bins of ``2^shift`` bits from ``low``:
    ``(bits, flat indices, how many lie in higher bins)``, in candidate order."""
    histogram = np.zeros(BINS, dtype=np.int64)
    for c in range(counts.size):
        for j in range(firsts[c], firsts[c] + counts[c]):
            histogram[((out_u[j] & MAGNITUDE_BITS) - low) >> shift] += 1
    above, b = 0, BINS - 1
    while above + histogram[b] < k:
        above += histogram[b]
        b -= 1
    bin_u = np.empty(histogram[b], dtype=np.int32)
    bin_i = np.empty(histogram[b], dtype=np.int64)
    at = 0
    for c in range(counts.size):
        for j in range(firsts[c], firsts[c] + counts[c]):
            u = out_u[j] & MAGNITUDE_BITS
            if (u - low) >> shift == b:
                bin_u[at], bin_i[at] = u, out_i[j]
                at += 1
    return bin_u, bin_i, above


@kernel
def ties_thresholds(
    out_i, out_v, counts, ties, lows, highs, floors, item_first, item_start, base, k, short,
    thresholds, cutoffs, tie_keep,
):  # fmt: skip
    """Tensor t's k[t]-th largest |Δθ|, as float32 bits, and the highest index admitted
    at exactly that magnitude among the candidates (ties go to lower indices), from
    ``ties_candidates_many``'s outputs; tensor t's items are ``item_first[t] :
    item_first[t + 1]``.

    When the candidates (all above the floor) hold fewer than k, the threshold is the
    floor itself: every candidate is kept, and the first ``k − candidates`` entries equal
    to the floor in index order, counted per chunk in ``tie_keep`` (``ties_apply`` finds
    them). Otherwise a histogram of the candidates' bits (``BINS`` equal bins from the
    least to the largest) finds the bin holding the k-th largest; only that bin is
    partitioned. ``short[t]``: even the entries equal to the floor do not reach k (nothing
    kept: the caller selects from the whole ``Δθ``).
    """
    out_u, floor_bits = out_v.view(np.int32), floors.view(np.int32)
    for t in prange(k.size):
        a, z = item_first[t], item_first[t + 1]
        total, equal = counts[a:z].sum(), ties[a:z].sum()
        tie_keep[a:z] = 0
        if total < k[t] and total + equal >= k[t] and k[t] > 0:
            share_in_order(ties[a:z], k[t] - total, tie_keep[a:z])
            thresholds[t] = floor_bits[t] & MAGNITUDE_BITS
            cutoffs[t] = -1  # no candidate equals the floor: they are all above it
            continue
        if total < k[t] or k[t] <= 0:
            short[t] = total + equal < k[t]
            thresholds[t], cutoffs[t] = MAGNITUDE_BITS, -1  # nothing is kept
            continue
        low, high = lows[a:z].min(), highs[a:z].max()
        shift = 0
        while (high - low) >> shift >= BINS:
            shift += 1
        firsts = base[t] + item_start[a:z]
        bin_u, bin_i, above = candidate_bin(out_u, out_i, firsts, counts[a:z], low, shift, k[t])
        thresholds[t], cutoffs[t] = top_k_cut(bin_u, bin_i, k[t] - above)


@kernel
def ties_apply(
    p_at, m_at, v_at, bias2, eps, size, floors, sizes, item_tensor, item_start, base, out_i,
    out_v, counts, tie_keep, thresholds, cutoffs, density, ref_index_at, ref_value_at,
    ref_count, alpha, w, weighted, short, stats, slots, scratch,
):  # fmt: skip
    """Per chunk: keep the candidates at or above the threshold (compacted in place,
    rescaled by 1/density), then the TIES merge with T into the parameter: at T's
    entries ``ties_entry``, at the other kept entries ``θ_i += (1 − α)·u_i`` (``w = 1 − α``).
    ``stats[item]``: (overlap with T, conflicts there, Σ kept u², Σ kept T²).

    ``slots`` (one chunk-sized int32 row per thread, all −1 between calls) maps a kept
    entry's offset in the chunk to its place in the kept list, so that T's entries find
    the update there without a branchy merge of the two sorted lists. A chunk with
    ``tie_keep[item] > 0`` also keeps that many of its entries equal to the threshold (the
    floor), found by recomputing ``Δθ`` from the updated moments, in index order."""
    out_u = out_v.view(np.int32)
    for item in prange(item_tensor.size):
        t, n, lo, hi = chunk_of(item, item_tensor, item_start, sizes)
        if short[t]:
            continue
        p = floats(p_at[t], n)
        first = base[t] + lo
        threshold, cutoff, found = thresholds[t], cutoffs[t], first
        slot = slots[get_thread_id()]
        for j in range(first, first + counts[item]):
            u, i = out_u[j] & MAGNITUDE_BITS, out_i[j]
            if u > threshold or (u == threshold and i <= cutoff):
                out_i[found], out_v[found] = i, out_v[j] / density
                slot[i - lo] = found
                found += 1
        if tie_keep[item] > 0:
            mc, vc = floats(m_at[t], n)[lo:hi], floats(v_at[t], n)[lo:hi]
            bias, tiny, scale, left = bias2[t], eps[t], size[t], tie_keep[item]
            floor, row = floors[t], scratch[get_thread_id()]
            for i in range(hi - lo):  # vectorises; the search below then only compares
                row[i] = direction(mc[i], vc[i], bias, tiny, scale)
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
            ref_at, ref_of, first_ref, stop_ref = reference_run(
                ref_index_at, ref_value_at, ref_count, t, lo, hi
            )
            for b in range(first_ref, stop_ref):
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
