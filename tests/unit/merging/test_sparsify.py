"""Sparsifiers: exact top-k sets and counts, DARE statistics, keyed determinism, rescaling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omotool.errors import UsageError
from omotool.merging import sparsify
from omotool.merging.sparsify import (
    SPARSIFIERS,
    bernoulli_indices,
    dare,
    kept_count,
    keyed_generator,
    kth_largest,
    magnitude,
    magnitude_mask,
    rescale,
)


def sorted_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a full stable sort by |x| descending (ties to lower index), keep the first k."""
    flat = x.abs().flatten()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [(100, 0.1, 10), (100, 0.015, 1), (64, 0.01, 1), (10, 1.0, 10), (10, 0.999, 9), (0, 0.5, 0)],
)
def test_kept_count(numel: int, density: float, expected: int) -> None:
    assert kept_count(numel, density) == expected


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(-5, 5), min_size=1, max_size=60),
    density=st.floats(0.01, 1.0),
)
def test_magnitude_mask_equals_sort_with_ties(values: list[int], density: float) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    k = kept_count(x.numel(), density)
    mask = magnitude_mask(x, density)
    assert int(mask.sum()) == k
    assert torch.equal(mask, sorted_topk_mask(x, k))


@pytest.mark.parametrize("density", [1e-4, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_mask_large_tensor_exact(density: float, dtype: torch.dtype) -> None:
    # Large enough for the sampled-threshold path; compared with torch.topk on the same values.
    x = torch.randn(700, 300, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert x.numel() > sparsify._EXACT_BELOW
    k = kept_count(x.numel(), density)
    mask = magnitude_mask(x, density)
    assert int(mask.sum()) == k
    kth = torch.topk(x.abs().float().flatten(), k).values[-1]
    assert bool((x.abs().float()[mask] >= kth).all())
    assert bool((x.abs().float()[~mask] <= kth).all())


def test_kth_largest_falls_back_when_sample_misleads() -> None:
    # Many identical values with a few large outliers: exact on either path.
    x = torch.zeros(200_000)
    x[:7] = torch.arange(7, 0, -1, dtype=torch.float32)
    for k in (1, 3, 7, 8, 1000):
        assert float(kth_largest(x, k)) == float(torch.topk(x, k).values[-1])


def test_kth_largest_rejects_bad_k() -> None:
    with pytest.raises(UsageError):
        kth_largest(torch.ones(5), 0)


def test_magnitude_keeps_values_and_zeroes_rest() -> None:
    x = torch.tensor([[0.5, -3.0], [2.0, -0.1]])
    assert torch.equal(magnitude(x, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    assert torch.equal(magnitude(x, 1.0), x)


def test_dare_statistics_and_inverse_rescale() -> None:
    x = torch.ones(200_000)
    out = dare(x, 0.1, keyed_generator(0, "t"))
    kept = out != 0
    # Binomial(n, 0.1): 5 standard deviations is ~670 entries.
    assert abs(int(kept.sum()) - 20_000) < 5 * math.sqrt(200_000 * 0.1 * 0.9)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 10.0))
    assert abs(float(out.mean()) - 1.0) < 0.05  # unbiased: E[F_R(x)] = x


def test_dare_keyed_generator_is_deterministic_and_key_dependent() -> None:
    x = torch.randn(1000)
    a = dare(x, 0.3, keyed_generator(7, 3, "layer.0.weight"))
    b = dare(x, 0.3, keyed_generator(7, 3, "layer.0.weight"))
    c = dare(x, 0.3, keyed_generator(7, 4, "layer.0.weight"))
    d = dare(x, 0.3, keyed_generator(8, 3, "layer.0.weight"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_dare_does_not_touch_global_rng() -> None:
    x = torch.ones(100)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dare(x, 0.5, keyed_generator(0, "x"))
    assert torch.equal(torch.rand(3), expected)


def test_bernoulli_indices_full_and_empty() -> None:
    assert torch.equal(bernoulli_indices(5, 1.0, keyed_generator(0)), torch.arange(5))
    assert bernoulli_indices(5, 0.0, keyed_generator(0)).numel() == 0
    assert bernoulli_indices(0, 0.5, keyed_generator(0)).numel() == 0


@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 0.9])
def test_bernoulli_indices_law(density: float) -> None:
    # Sorted, unique, in range; count ~ Binomial(n, p); positions uniform (mean of index).
    n, draws = 50_000, 20
    counts, means = [], []
    for seed in range(draws):
        idx = bernoulli_indices(n, density, keyed_generator(seed, "law"))
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < n
        counts.append(idx.numel())
        means.append(float(idx.double().mean()))
    sd = math.sqrt(n * density * (1 - density))
    assert abs(sum(counts) / draws - n * density) < 5 * sd / math.sqrt(draws)
    assert abs(sum(means) / draws - (n - 1) / 2) < 0.02 * n


def test_bernoulli_indices_per_entry_frequency() -> None:
    # Every position is kept with probability p, including the first and the last.
    n, p, draws = 40, 0.25, 4000
    hits = torch.zeros(n)
    for seed in range(draws):
        hits[bernoulli_indices(n, p, keyed_generator(seed, "freq"))] += 1
    freq = hits / draws
    assert float((freq - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / draws)


def test_rescale_modes() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = torch.tensor([0.0, -2.0, 0.0, -4.0])
    assert torch.equal(rescale(kept, x, "none", 0.5), kept)
    assert torch.equal(rescale(kept, x, "inverse", 0.5), kept * 2)
    assert torch.allclose(rescale(kept, x, "l1", 0.5).abs().sum(), x.abs().sum())
    assert torch.equal(rescale(torch.zeros(4), x, "l1", 0.5), torch.zeros(4))
    with pytest.raises(UsageError):
        rescale(kept, x, "l2", 0.5)


def test_registry_lookup_and_suggestion() -> None:
    assert SPARSIFIERS.names() == ["none", "dare", "magnitude"]
    with pytest.raises(UsageError, match="Did you mean 'magnitude'"):
        SPARSIFIERS.get("magnitud")
