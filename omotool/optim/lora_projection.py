"""Online merging for a LoRA adapter: the merged full-weight update, projected onto the
adapter's tangent space and realised as factor updates.

One adapted module holds ``W = W₀ + s·B·A`` (``B`` d×r, ``A`` r×k; ``s = alpha/r``, or
``alpha/√r`` with rsLoRA). Adam proposes factor updates ``dA``, ``dB``. Per module and step:

1. ``δW = s·(dB·A + B·dA + dB·dA)``, the full-weight update they make (``lora_update``),
   written out rather than as ``s·((B+dB)(A+dA) − BA)``, whose difference of two nearly equal
   products loses the low digits in float32.
2. ``M = merge(δW, T)`` with omotool's own online rules (``omotool.optim.rules``: OnDARE's keyed
   Bernoulli mask and rescale, OnTIES' exact top-p and sign election against ``T = F(τ)``
   restricted to the module), masks keyed by ``(seed, "update", step, name)`` as for any
   parameter, so data-parallel ranks agree (``merged_update``).
3. ``E = M − δW``, the correction the merge asks for.
4. The factor corrections (``tangent_correction``), the least-squares solution of
   ``s·(ΔB·A + B·ΔA) ≈ E`` over the tangent space ``{X·A + B·Y}`` of the rank-r manifold::

       ΔB = (1/s)·E·Aᵀ(AAᵀ)⁻¹
       ΔA = (1/s)·(BᵀB + λI)⁻¹·Bᵀ·E·(I − Aᵀ(AAᵀ)⁻¹A)

   With ``λ = 0`` and ``B`` of full column rank, ``s·(ΔB·A + B·ΔA) = P_B·E + E·P_A −
   P_B·E·P_A = P(E)``, the orthogonal projection of ``E`` onto the tangent space
   (``P_A = Aᵀ(AAᵀ)⁻¹A``, ``P_B = B(BᵀB)⁻¹Bᵀ``; ``tangent_projection``). ``ΔB`` realises the
   row-space part ``E·P_A`` and ``ΔA`` the rest, ``P_B·E·(I − P_A)``; ``ΔA·Aᵀ = 0``, so the
   two parts do not overlap.

The factors then move by ``dA + ΔA`` and ``dB + ΔB``. The realised full-weight change is
``M`` only to first order: it is ``δW + s·(ΔB·A + B·ΔA) + s·(dB·ΔA + ΔB·dA + ΔB·ΔA)``, and the
last term (second order in the step) lies outside the tangent space. What of ``E`` the
adapter cannot express at all is lost: the tangent space has dimension ``r(d + k − r)`` of
``dk``, and while ``B = 0`` (LoRA's start) only ``E·P_A`` survives, about ``r/k`` of a random
``E``'s energy. ``kept_share`` = ``‖s(ΔB·A + B·ΔA)‖ / ‖E‖`` says how much of the merge each
step kept.

Nothing here knows how ``M`` is merged: ``merged_update`` applies a rule of
``omotool.optim.functional.MERGE_RULES`` to a zero matrix, as the optimizer applies it to
a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omotool.optim.functional import MERGE_RULES, MergeContext
from omotool.optim.task_vector import FlatDelta

DAMPING = 1e-2
"""``ρ``: ``λ`` lifts the smallest eigenvalue of ``BᵀB`` to at least ``ρ·σ_max(B)²``."""
MAX_A_CHANGE = 1e-2
"""``κ``: a step's ``ΔA`` is scaled down to at most ``κ·‖A‖_F``."""


def lora_update(
    a: torch.Tensor, b: torch.Tensor, da: torch.Tensor, db: torch.Tensor, scale: float
) -> torch.Tensor:
    """``δW = s·(dB·A + B·dA + dB·dA)``: the change of ``s·B·A`` when the factors move by
    ``dA``, ``dB`` (exact; no difference of products)."""
    update = db @ (a + da)  # dB·A + dB·dA in one product
    update.addmm_(b, da)
    return update.mul_(scale)


def merged_update(
    update: torch.Tensor, reference: FlatDelta | None, context: MergeContext
) -> torch.Tensor:
    """``M = merge(δW, T)`` by the rule of ``context.options.method`` (``omotool.optim.rules``),
    applied to a zero matrix of ``update``'s shape: the update one full-weight step of the
    online-merging optimizer would add for parameter ``context.name`` at ``context.step``."""
    rule = MERGE_RULES.get(context.options.method)
    if not rule.merges:
        return update.clone()
    flat = update.reshape(-1)

    def direction(index: torch.Tensor | None) -> torch.Tensor:
        return flat if index is None else flat.index_select(0, index)

    merged = torch.zeros_like(update)
    rule.merge(merged, direction, reference, context)
    return merged


def damping(gram_eigenvalues: torch.Tensor, rho: float = DAMPING) -> torch.Tensor:
    """``λ = max(0, ρ·σ_max(B)² − σ_min(B)²)`` from the eigenvalues of ``BᵀB`` (``σ²``).

    Why relative to ``σ_max(B)²`` and ``σ_min(B)²``: ``ΔA`` solves ``B·Y ≈ R`` (ridge), and
    along ``B``'s i-th singular direction it multiplies ``R`` by ``σ_i/(σ_i² + λ)``. With
    ``λ = 0`` a direction in which ``B`` is nearly flat (``σ_i → 0``, as at LoRA's start, where
    ``B = 0``) would get an unbounded gain and throw ``A`` far for a tiny change of ``W``. This
    ``λ`` is 0 when ``B`` is well conditioned (``σ_min² ≥ ρ·σ_max²``: the exact projection),
    and otherwise lifts the smallest eigenvalue of ``BᵀB + λI`` to ``ρ·σ_max²``, so that every
    gain is at most ``1/(√ρ·σ_max(B))`` and the damping scales with ``B`` (a scale-free rule:
    multiplying ``B`` by ``c`` multiplies ``λ`` by ``c²``). It cannot bound ``ΔA`` when ``B``
    as a whole is small; ``tangent_correction`` caps ``‖ΔA‖`` for that.
    """
    top, bottom = gram_eigenvalues.max(), gram_eigenvalues.min().clamp_min(0)
    return (rho * top - bottom).clamp_min(0)


def tangent_correction(
    error: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    *,
    rho: float = DAMPING,
    max_a_change: float | None = MAX_A_CHANGE,
    lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ΔB, ΔA)`` with ``s·(ΔB·A + B·ΔA)`` the (damped) least-squares fit of ``error`` (``E``,
    d×k) on the tangent space at ``(B, A)``::

        ΔB = (1/s)·E·Aᵀ(AAᵀ)⁻¹
        ΔA = (1/s)·(BᵀB + λI)⁻¹·Bᵀ·E·(I − Aᵀ(AAᵀ)⁻¹A)

    ``λ`` is ``damping(eig(BᵀB), rho)`` unless given (``lam=0``: the exact projection, which
    needs ``B`` of full column rank). ``A`` must have full row rank (LoRA's random ``A`` has).
    With ``max_a_change``, ``ΔA`` is scaled down to at most ``max_a_change·‖A‖_F``: the
    ridge bounds the gain relative to ``B``'s own scale, this bounds the step itself when ``B``
    is small (``None``: no cap). ``B = 0`` gives ``ΔA = 0`` exactly, ``E = 0`` zeros exactly.
    """
    # Both r×r inverses through eigh: on CPUs a tiny LAPACK solve costs far more than eigh.
    gram_a, basis_a = torch.linalg.eigh(a @ a.mT)
    coefficients = basis_a @ ((basis_a.mT @ (a @ error.mT)) / gram_a[:, None])  # (AAᵀ)⁻¹AEᵀ
    delta_b = coefficients.mT / scale  # (1/s)·E·Aᵀ(AAᵀ)⁻¹
    residual = error - coefficients.mT @ a  # E·(I − P_A)
    eigenvalues, vectors = torch.linalg.eigh(b.mT @ b)
    lam_value = damping(eigenvalues, rho) if lam is None else torch.as_tensor(lam).to(eigenvalues)
    # (BᵀB + λI)⁻¹ through BᵀB's eigenvectors; a zero B gives 0/tiny = 0, never NaN.
    inverse = 1 / (eigenvalues + lam_value).clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    delta_a = vectors @ (inverse[:, None] * (vectors.mT @ (b.mT @ residual))) / scale
    if max_a_change is not None:
        limit = max_a_change * torch.linalg.matrix_norm(a)
        norm = torch.linalg.matrix_norm(delta_a)
        delta_a = delta_a * (limit / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=1)
    return delta_b, delta_a


def tangent_projection(error: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``P(E) = P_B·E + E·P_A − P_B·E·P_A``, the orthogonal projection of ``E`` onto the tangent
    space ``{X·A + B·Y}`` (``A`` of full row rank, ``B`` of full column rank)."""
    projector_a = a.mT @ torch.linalg.solve(a @ a.mT, a)
    projector_b = b @ torch.linalg.solve(b.mT @ b, b.mT)
    row = error @ projector_a
    return projector_b @ error + row - projector_b @ row


@dataclass
class LoraMergeStep:
    """One adapted module's merged step: the factor corrections to add to Adam's ``dA``,
    ``dB``, and the share of the merge's correction they realise (to first order)."""

    delta_a: torch.Tensor
    delta_b: torch.Tensor
    kept_share: torch.Tensor  # ‖s(ΔB·A + B·ΔA)‖ / ‖E‖ (1 when E = 0: nothing to keep)
    error_norm: torch.Tensor  # ‖E‖


def lora_merge_step(
    a: torch.Tensor,
    b: torch.Tensor,
    da: torch.Tensor,
    db: torch.Tensor,
    scale: float,
    reference: FlatDelta | None,
    context: MergeContext,
    *,
    rho: float = DAMPING,
    max_a_change: float | None = MAX_A_CHANGE,
) -> LoraMergeStep:
    """Steps 1–4 of the module docstring for one adapted module: ``δW`` from Adam's factor
    updates, ``M = merge(δW, T)``, ``E = M − δW`` and its tangent-space correction."""
    update = lora_update(a, b, da, db, scale)
    error = merged_update(update, reference, context).sub_(update)
    del update  # at most two d×k temporaries live at once: E and E·(I − P_A), then the fit
    delta_b, delta_a = tangent_correction(error, a, b, scale, rho=rho, max_a_change=max_a_change)
    realised = (delta_b @ a).addmm_(b, delta_a).mul_(scale)  # reuses δW's size, once
    error_norm = torch.linalg.matrix_norm(error)
    share = torch.where(
        error_norm > 0,
        torch.linalg.matrix_norm(realised) / error_norm.clamp_min(torch.finfo(error.dtype).tiny),
        torch.ones_like(error_norm),
    )
    return LoraMergeStep(delta_a, delta_b, share, error_norm)
