"""Offline merge methods as registry entries, composed from ``sparsify`` and ``consensus``.

Each method merges tensors ``θ_1..θ_n`` (with weights ``w_i``) of one parameter, optionally
around a base ``θ_b``, following mergekit's definitions:

- ``linear``: ``Σ w_i·θ_i / Σ w_i`` (no base).
- ``task_arithmetic``: ``θ_b + Σ w_i·τ_i`` with ``τ_i = θ_i − θ_b`` (``normalize``: ``/ Σ w_i``).
- ``ties``: ``θ_b + Σ m_i·w_i·F_K(τ_i) / Σ m_i·w_i``: magnitude trim, sign election on the
  weighted trimmed deltas, disjoint (normalised) mean.
- ``dare_linear``: ``θ_b + Σ w_i·F_R(τ_i)`` with DARE drop and rescale.
- ``dare_ties``: DARE drop and rescale, then TIES sign election, not normalised.

Differences from mergekit: DARE masks come from keyed generators (reproducible per tensor
name and model index), so results equal mergekit's in law, not entry by entry; our default DARE
rescale is ``1/density`` (DARE's), mergekit's recent versions match the L1 norm (``l1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from omotool.merging.consensus import disjoint_merge
from omotool.merging.sparsify import dare, magnitude
from omotool.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry; ``needs_base`` says whether ``θ_b`` is required."""

    merge: Callable[..., torch.Tensor]
    needs_base: bool
    sparsifier: str | None  # "dare" | "magnitude" | None
    default_normalize: bool


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def _weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(weights), dtype=like.dtype, device=like.device).view(
        -1, *([1] * like.dim())
    )


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True, **_: object
) -> torch.Tensor:
    """``Σ w_i·θ_i / Σ w_i`` (``normalize=False``: ``Σ w_i·θ_i``).

    Accumulated in one new tensor (no stack: memory stays one tensor beyond the inputs).
    Weights ``(1, 0)`` or ``(0, 1)`` give an input back exactly.
    """
    merged = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        merged.add_(tensor, alpha=weight)
    total = float(sum(weights))
    if normalize and abs(total) >= 1e-8 and total != 1.0:
        merged.div_(total)
    return merged


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsifier: str | None,
    election: str | None,
    normalize: bool,
    density: float = 1.0,
    rescale_mode: str | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """``θ_b + ⊕_i w_i·F(θ_i − θ_b)`` (see module docstring for each method's F and ⊕)."""
    deltas = []
    for i, tensor in enumerate(tensors):
        delta = tensor - base
        if sparsifier == "dare":
            assert generators is not None
            delta = dare(delta, density, generators[i], rescale_mode or "inverse")
        elif sparsifier == "magnitude":
            delta = magnitude(delta, density, rescale_mode or "none")
        deltas.append(delta)
    merged = disjoint_merge(
        torch.stack(deltas), list(weights), election=election, normalize=normalize
    )
    return base + merged


def _register(
    name: str, sparsifier: str | None, election: str | None, normalize: bool, help: str
) -> None:
    def merge(base, tensors, weights, normalize=normalize, **kwargs):
        return task_vector_merge(
            base,
            tensors,
            weights,
            sparsifier=sparsifier,
            election=election,
            normalize=normalize,
            **kwargs,
        )

    MERGE_METHODS.register(name, help=help)(MergeMethod(merge, True, sparsifier, normalize))


MERGE_METHODS.register("linear", help="weighted average of the models")(
    MergeMethod(
        lambda base, tensors, weights, normalize=True, **kw: linear(tensors, weights, normalize),
        False,
        None,
        True,
    )
)
_register("task_arithmetic", None, None, False, "base + weighted sum of task vectors")
_register("ties", "magnitude", "weighted", True, "TIES: trim, elect sign, disjoint mean")
_register("dare_linear", "dare", None, False, "DARE drop-and-rescale, weighted sum")
_register("dare_ties", "dare", "weighted", False, "DARE drop-and-rescale, TIES sign election")
