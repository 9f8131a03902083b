"""TIES consensus: sign election and disjoint merge against a direct per-entry computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omotool.errors import UsageError
from omotool.merging.consensus import agreement_mask, disjoint_merge, elect_sign


def direct_disjoint(deltas, weights, election, normalize):
    """Entry by entry, as the TIES paper and mergekit describe it."""
    m, n = len(deltas), len(deltas[0])
    out = []
    for j in range(n):
        basis = [deltas[i][j] * (weights[i] if election == "weighted" else 1.0) for i in range(m)]
        sign = 1.0 if sum(basis) >= 0 else -1.0
        agree = [i for i in range(m) if basis[i] != 0 and (basis[i] > 0) == (sign > 0)]
        total = sum(weights[i] * deltas[i][j] for i in agree)
        if normalize:
            divisor = sum(weights[i] for i in agree)
            total = total / (divisor if abs(divisor) >= 1e-8 else 1.0)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    models=st.integers(1, 4),
    size=st.integers(1, 12),
    election=st.sampled_from(["weighted", "unweighted"]),
    normalize=st.booleans(),
)
def test_disjoint_merge_matches_direct(data, models, size, election, normalize) -> None:
    entry = st.integers(-3, 3).map(float)
    deltas = [data.draw(st.lists(entry, min_size=size, max_size=size)) for _ in range(models)]
    weights = data.draw(
        st.lists(st.sampled_from([0.3, 0.5, 1.0, 2.0]), min_size=models, max_size=models)
    )
    stacked = torch.tensor(deltas, dtype=torch.float64)
    merged = disjoint_merge(stacked, weights, election=election, normalize=normalize)
    assert torch.allclose(merged, direct_disjoint(deltas, weights, election, normalize))


def test_elect_sign_methods_and_zero_vote() -> None:
    deltas = torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 5.0, 0.0]])
    assert torch.equal(elect_sign(deltas, "sum"), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(elect_sign(deltas, "count"), torch.tensor([-1.0, -1.0, 1.0]))
    with pytest.raises(UsageError):
        elect_sign(deltas, "max")
    with pytest.raises(UsageError, match="unknown election"):
        disjoint_merge(deltas, [1.0, 1.0, 1.0], election="max")


def test_agreement_excludes_zeros() -> None:
    deltas = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    mask = agreement_mask(deltas, torch.tensor([1.0, 1.0]))
    assert torch.equal(mask, torch.tensor([[True, False], [False, True]]))


def test_no_election_is_weighted_sum() -> None:
    deltas = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert torch.equal(disjoint_merge(deltas, [0.5, 1.0], election=None), torch.tensor([3.5, 3.0]))


def test_unweighted_election_follows_large_reference() -> None:
    # The released OnTIES rule: a small update fighting a large tau entry is dropped.
    tau, update = torch.tensor([1.0, 1.0]), torch.tensor([-0.01, 0.01])
    merged = disjoint_merge(torch.stack([tau, update]), [1e-3, 1 - 1e-3], election="unweighted")
    assert torch.allclose(merged, torch.tensor([1e-3, 1e-3 + 0.01 * (1 - 1e-3)]))
