"""Sparsifiers ``F(·)``: which entries of a delta survive, and how survivors are rescaled.

- DARE (Yu et al. 2024), ``F_R``: keep each entry independently with probability ``p``
  (Bernoulli), zero the rest; rescale the survivors (``1/p`` by default, so ``E[F_R(x)] = x``).
- Magnitude top-k (the TIES trim, Yadav et al. 2023), ``F_K``: keep the ``k = kept_count(n, p)``
  entries of largest ``|x|``, exactly ``k`` of them, ties broken toward lower flat indices.

Randomness always comes from an explicit ``torch.Generator`` (see ``keyed_generator``), never
from the global RNG, so data-parallel ranks and resumed runs draw identical masks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from omotool.errors import UsageError
from omotool.registry import Registry

RESCALES = ("none", "inverse", "l1")
"""Rescale modes: ``none``; ``inverse`` multiplies survivors by ``1/p`` (DARE, and the released
optimizer's dropout); ``l1`` scales survivors so ``‖F(x)‖₁ = ‖x‖₁`` (mergekit's DARE)."""

_EXACT_BELOW = 1 << 16  # below this many entries a plain kthvalue is already fast
_SAMPLE = 1 << 14  # sample size for the threshold estimate of large tensors


def kept_count(numel: int, density: float) -> int:
    """``k = ⌊p·n⌋`` entries kept by magnitude top-k, at least 1 for ``p > 0`` and ``n > 0``.

    mergekit uses ``⌊p·n⌋`` and refuses ``k = 0``; the released OnTIES code leaves a tensor
    dense when ``k < 1``. Keeping one entry never erases a tensor and never keeps it whole.
    """
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return min(numel, max(1, int(density * numel)))


def key_seed(seed: int, *key: object) -> int:
    """A 63-bit seed derived from ``(seed, *key)``, e.g. ``(seed, "update", step, name)``.

    The same key gives the same number on every process and in every run, with no
    communication and independent of the order in which tensors are visited.
    """
    digest = hashlib.sha256(repr((int(seed), *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_generator(seed: int, *key: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with ``key_seed(seed, *key)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(key_seed(seed, *key))
    return generator


def bernoulli_indices(
    numel: int,
    density: float,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Sorted flat indices kept by a Bernoulli(``density``) mask over ``numel`` entries.

    Sampled by geometric skips: the gaps between kept entries are i.i.d. Geometric(p), drawn as
    ``⌊E / λ⌋ + 1`` from exponentials ``E ~ Exp(1)`` with ``λ = −log(1 − p)`` (the same law as
    ``rand(n) < p``) in O(p·n) work instead of O(n). Same generator state, same indices, on
    every process and however the tensor is sharded.
    """
    if numel <= 0 or density <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if density >= 1:
        return torch.arange(numel, device=device)
    chunk = gap_chunk(numel, density)
    pieces, last = [], -1.0
    while last < numel - 1:
        gaps = torch.empty(chunk, device=device, dtype=gap_dtype(density))
        geometric_gaps_(gaps.uniform_(generator=generator), density)
        positions = torch.cumsum(gaps, dim=0, dtype=torch.float64).add_(last)  # exact to 2**53
        pieces.append(positions)
        last = float(positions[-1])
    positions = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    inside = int(torch.searchsorted(positions, float(numel)))  # positions are increasing
    return positions[:inside].to(torch.long)


def gap_chunk(numel: int, density: float) -> int:
    """Gaps drawn at once: the expected count plus six standard deviations (rarely short)."""
    expected = numel * density
    return int(expected + 6.0 * math.sqrt(expected) + 16)


def gap_dtype(density: float) -> torch.dtype:
    """float32 gaps are exact integers below 2**24; tiny densities draw longer gaps."""
    return torch.float32 if density >= 1e-4 else torch.float64


def geometric_gaps_(uniforms: torch.Tensor, density: float) -> torch.Tensor:
    """``U ~ U[0, 1)`` → Geometric(p) gaps ``⌊E/λ⌋ + 1``, ``E = −log(1 − U)``, in place.

    (Drawing ``E`` this way is a few times faster than ``exponential_()`` here.)
    """
    rate = -math.log1p(-density)
    return uniforms.neg_().log1p_().div_(-rate, rounding_mode="floor").add_(1)


def sample_positions(n: int) -> torch.Tensor | None:
    """Flat positions of a strided sample of ``n`` entries, or None when ``n`` is small.

    The stride is coprime with ``n``, hence with the row length, so the sample visits every
    column.
    """
    stride = sample_stride(n)
    return None if stride is None else torch.arange(0, n, stride)


def sample_stride(n: int, size: int = _SAMPLE) -> int | None:
    """The stride of a ``size``-entry sample of ``n`` (None: small enough to select exactly)."""
    if n <= _EXACT_BELOW:
        return None
    stride = n // size
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


def sample_floor(sample: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """A value a few standard errors below the ``k``-th largest of ``n`` entries.

    ``sample`` holds magnitudes at ``sample_positions(n)``; about ``k`` entries (slightly
    more) of the whole lie at or above the floor.
    """
    size = sample.numel()
    return torch.kthvalue(sample, size - sample_rank(k, n, size) + 1).values


def sample_rank(k: int, n: int, size: int) -> int:
    """Which largest of a ``size``-entry sample serves as the floor for the ``k``-th of ``n``."""
    above = k / n
    margin = 4.0 * math.sqrt(above * (1.0 - above) / size) + 2.0 / size
    return max(1, math.ceil(min(1.0, above + margin) * size))


def _candidates(
    magnitudes: torch.Tensor, k: int, mask_out: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(indices, values)`` of a subset of the 1-D ``magnitudes`` holding its ``k`` largest.

    Large inputs avoid a full selection: a strided sample gives a floor a few standard errors
    below the k-th largest, and only entries at or above it are kept (about ``k`` of them).
    ``indices is None`` means all entries (small inputs, or an unlucky sample).
    """
    n = magnitudes.numel()
    positions = sample_positions(n)
    if positions is None:
        return None, magnitudes
    floor = sample_floor(magnitudes[positions], k, n)
    mask = (
        torch.ge(magnitudes, floor, out=mask_out) if mask_out is not None else magnitudes >= floor
    )
    indices = torch.nonzero(mask).flatten()
    if indices.numel() < k:
        return None, magnitudes
    return indices, magnitudes.index_select(0, indices)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest entry of the 1-D float tensor ``values`` (1 ≤ k ≤ n).

    Selection runs on the sampled candidate set (see ``_candidates``), so the result is
    exact and only the speed depends on the sample. Inputs must be finite.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise UsageError(f"k={k} is outside 1..{n}")
    _, candidates = _candidates(values, k)
    return torch.kthvalue(candidates, candidates.numel() - k + 1).values


def magnitude_topk_indices(
    tensor: torch.Tensor,
    density: float,
    magnitudes_out: torch.Tensor | None = None,
    mask_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted flat indices of exactly ``kept_count(n, density)`` entries of largest ``|x|``.

    Ties at the threshold go to the lowest indices. ``magnitudes_out`` (float32) and
    ``mask_out`` (bool), of at least ``n`` entries, are optional scratch buffers: reusing them
    spares the page faults of fresh full-size temporaries on every call.
    """
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    k = kept_count(n, density)
    if k >= n:
        return torch.arange(n, device=flat.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if magnitudes_out is not None and flat.dtype == torch.float32:
        magnitudes = torch.abs(flat, out=magnitudes_out[:n])
    else:
        magnitudes = flat.abs().float()
    indices, values = _candidates(magnitudes, k, None if mask_out is None else mask_out[:n])
    return select_largest(indices, values, k)


def select_largest(indices: torch.Tensor | None, magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` entries of largest ``magnitudes`` (1-D, at least ``k``), ties to lower indices.

    ``indices`` (sorted) are the flat positions of ``magnitudes``, or None for ``0..n-1``;
    returns the chosen positions, sorted.
    """
    threshold = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values
    selected = magnitudes >= threshold
    surplus = int(selected.sum()) - k
    if surplus > 0:  # more entries equal the threshold than places: the lowest indices win
        ties = torch.nonzero(magnitudes == threshold).flatten()
        selected[ties[ties.numel() - surplus :]] = False
    chosen = torch.nonzero(selected).flatten()
    return chosen if indices is None else indices.index_select(0, chosen)


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``kept_count(n, density)`` entries of largest ``|tensor|``."""
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[magnitude_topk_indices(tensor, density)] = True
    return mask.view(tensor.shape)


def rescale(kept: torch.Tensor, original: torch.Tensor, mode: str, density: float) -> torch.Tensor:
    """Rescale the survivors ``kept = mask ⊙ original`` (see ``RESCALES``)."""
    if mode == "none":
        return kept
    if mode == "inverse":
        return kept / density
    if mode == "l1":
        before, after = original.abs().sum(), kept.abs().sum()
        if before < 1e-12 or after < 1e-12:
            return kept
        return kept * (before / after)
    raise UsageError(f"unknown rescale mode {mode!r}; choose one of {', '.join(RESCALES)}")


def dare(
    tensor: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale_mode: str = "inverse",
) -> torch.Tensor:
    """DARE drop-and-rescale ``F_R``: ``rescale(m ⊙ x)`` with ``m_i ~ Bernoulli(p)`` i.i.d."""
    if density >= 1:
        return tensor.clone()
    flat = tensor.reshape(-1)
    kept = bernoulli_indices(flat.numel(), density, generator, device=tensor.device)
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return rescale(out.view_as(tensor), tensor, rescale_mode, density)


def magnitude(tensor: torch.Tensor, density: float, rescale_mode: str = "none") -> torch.Tensor:
    """Magnitude trim ``F_K``: ``rescale(m ⊙ x)`` with ``m`` the exact top-k of ``|x|``."""
    if density >= 1:
        return tensor.clone()
    mask = magnitude_mask(tensor, density)
    return rescale(torch.where(mask, tensor, 0), tensor, rescale_mode, density)


@dataclass(frozen=True)
class Sparsifier:
    """A registry entry: ``apply(tensor, density, generator, rescale_mode) -> tensor``."""

    apply: Callable[[torch.Tensor, float, torch.Generator, str], torch.Tensor]
    default_rescale: str


SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier")
SPARSIFIERS.register("none", help="keep every entry")(
    Sparsifier(lambda x, p, g, r: x, default_rescale="none")
)
SPARSIFIERS.register("dare", help="random drop with probability 1-density, rescale (DARE)")(
    Sparsifier(dare, default_rescale="inverse")
)
SPARSIFIERS.register("magnitude", help="keep the top density fraction by |value| (TIES trim)")(
    Sparsifier(lambda x, p, g, r: magnitude(x, p, r), default_rescale="none")
)
