"""Consensus rules ``⊕``: how several (sparsified) deltas become one.

TIES (Yadav et al. 2023): elect a sign per entry, keep only the deltas that agree with it, and
take their (weighted, optionally normalised) sum: the *disjoint merge*. The same functions serve
offline TIES (``merge-offline``, weighted election as in mergekit) and OnTIES in the optimizer
(the released code elects on the unweighted sum ``F(τ) + F(Δθ)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omotool.errors import UsageError

ELECTIONS = ("weighted", "unweighted")
SIGN_METHODS = ("sum", "count")


def elect_sign(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Elected sign ``s = sign(Σ_i δ_i)`` (``sum``) or ``sign(Σ_i sign(δ_i))`` (``count``).

    ``deltas`` is stacked along dim 0. Entries whose vote is exactly 0 elect ``+1``, as mergekit.
    Returns ``±1`` in ``deltas.dtype``.
    """
    if method == "sum":
        vote = deltas.sum(dim=0)
    elif method == "count":
        vote = deltas.sign().sum(dim=0)
    else:
        choices = ", ".join(SIGN_METHODS)
        raise UsageError(f"unknown sign method {method!r}; choose one of {choices}")
    one = torch.ones((), dtype=deltas.dtype, device=deltas.device)
    return torch.where(vote >= 0, one, -one)


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``m_i = [sign(δ_i) = s]``: where a delta agrees with the elected sign (zeros never do)."""
    return deltas.sign() == sign


def disjoint_merge(
    deltas: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    election: str | None = "weighted",
    sign_method: str = "sum",
    normalize: bool = False,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``Σ_i m_i·w_i·δ_i`` (divided by ``Σ_i m_i·w_i`` if ``normalize``; 0 divisors count as 1).

    ``m_i`` is the agreement with the sign elected on ``w_i·δ_i`` (``election="weighted"``,
    mergekit and the TIES paper) or on ``δ_i`` (``"unweighted"``, the released OnTIES code);
    ``election=None`` keeps every entry (task arithmetic). ``return_mask`` also returns ``m``.
    """
    w = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device)
    w = w.view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if election is None:
        mask = torch.ones_like(deltas, dtype=torch.bool)
    elif election in ELECTIONS:
        basis = weighted if election == "weighted" else deltas
        mask = agreement_mask(basis, elect_sign(basis, sign_method))
    else:
        raise UsageError(f"unknown election {election!r}; choose one of {', '.join(ELECTIONS)}")
    merged = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        merged = merged / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return (merged, mask) if return_mask else merged
