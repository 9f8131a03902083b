"""The numba kernels of the fast path against the tensor-op paths, on tensors large enough."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch

from omotool.merging import sparsify
from omotool.merging.sparsify import key_seed
from omotool.optim import OnlineMergingAdamW, kernels
from omotool.optim.backends import cpu as cpu_backend

# a.weight is large enough to be sampled for OnTIES's floor; a.bias is selected exactly.
SHAPES = {"a.weight": (300, 256), "a.bias": (300,)}
STEPS = 5

pytestmark = pytest.mark.skipif(kernels._compiled() is None, reason="numba is not importable")


def make(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def optimizer(params, *, backend="cpu", **options) -> OnlineMergingAdamW:
    settings = dict(method="dare", reserve_p=0.05, alpha=0.1, lr=1e-2, weight_decay=0.0, seed=3)
    return OnlineMergingAdamW(params.items(), make(1), backend=backend, **(settings | options))


def one_step(state, start, grads, *, use_kernels, monkeypatch, **options):
    """From ``start`` params and optimizer ``state``, one step; returns (params, optimizer).
    Without kernels: the CPU backend's per-tensor path (which draws the same OnDARE masks)."""
    params = {n: t.clone().requires_grad_() for n, t in start.items()}
    opt = optimizer(params, **options)
    if state is not None:
        opt.load_state_dict(copy.deepcopy(state))  # loading may alias the given tensors
    with monkeypatch.context() as patch:
        if not use_kernels:
            patch.setattr(cpu_backend, "batches", lambda *args: False)
        for name, p in params.items():
            p.grad = grads[name].clone()
        opt.step()
    return {n: p.detach() for n, p in params.items()}, opt


@pytest.mark.parametrize(
    "options",
    [
        dict(method="dare"),
        dict(method="dare", rescale="none", alpha=0.0),
        dict(method="dare", weight_decay=0.1),
        dict(method="ties"),
        dict(method="ties", rescale="inverse", election="weighted"),
        dict(method="ties", reserve_p=0.6),  # T dense
    ],
    ids=["dare", "dare-none-alpha0", "dare-decay", "ties", "ties-inverse-weighted", "ties-dense"],
)
def test_kernel_step_matches_tensor_ops(options, monkeypatch) -> None:
    """Step by step from the same state: same kept entries, same parameters to float32
    rounding, same moments, same statistics. (Step 1 is skipped for TIES: every |Δθ| of Adam's
    first step is ≈ lr, so its top-k is decided by rounding.)"""
    state, params = None, make(0)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, STEPS + 1):
        grads = {n: torch.randn(s, generator=gen) * (1 + step) for n, s in SHAPES.items()}
        ours, fast = one_step(
            state, params, grads, use_kernels=True, monkeypatch=monkeypatch, **options
        )
        theirs, slow = one_step(
            state, params, grads, use_kernels=False, monkeypatch=monkeypatch, **options
        )
        if step > 1 or options["method"] == "dare":
            moved = {n: (ours[n] != params[n]) for n in SHAPES}
            assert all(torch.equal(moved[n], theirs[n] != params[n]) for n in SHAPES)
            for name in SHAPES:
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                a = fast.state[fast.param_groups[0]["params"][0]][key]
                b = slow.state[slow.param_groups[0]["params"][0]][key]
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # FMA or not
            ours_stats, theirs_stats = fast.stats(), slow.stats()
            assert ours_stats["merge/kept_fraction"] == theirs_stats["merge/kept_fraction"]
            assert ours_stats == pytest.approx(theirs_stats, rel=1e-5)
        state, params = slow.state_dict(), theirs


@pytest.mark.parametrize("reserve_p", [0.01, 0.3, 1.0])
def test_ties_kernel_keeps_the_lowest_indices_of_a_pile_of_equal_updates(
    reserve_p, monkeypatch
) -> None:
    """The same ±1 gradient every step: every |Δθ| of a tensor is the same value (Adam's
    first steps on a steady gradient), the floor equals it, and the top-k is the first k
    entries in index order, as the tensor ops keep (issue 15: such piles used to be written
    out as candidates, entry by entry)."""
    gen = torch.Generator().manual_seed(2)
    signs = {n: torch.randn(s, generator=gen).sign() for n, s in SHAPES.items()}
    state, params = None, make(0)
    options = dict(method="ties", reserve_p=reserve_p, alpha=0.0)
    for _ in range(3):
        ours, fast = one_step(
            state, params, signs, use_kernels=True, monkeypatch=monkeypatch, **options
        )
        theirs, slow = one_step(
            state, params, signs, use_kernels=False, monkeypatch=monkeypatch, **options
        )
        for name in SHAPES:
            moved = (ours[name] != params[name]).flatten()
            assert torch.equal(moved, (theirs[name] != params[name]).flatten()), name
            k = sparsify.kept_count(moved.numel(), reserve_p)
            # kept: the first k; moved: those of them the sign election with T lets through
            assert not moved[k:].any() and moved[:k].float().mean() > 0.3, name
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
        assert fast.stats() == pytest.approx(slow.stats())
        state, params = slow.state_dict(), theirs


def test_ties_kernel_falls_back_when_the_sample_misleads(monkeypatch) -> None:
    """A floor above the k-th largest |Δθ| finds too few candidates: the step still selects
    the exact top-k (from the whole Δθ)."""
    gen = torch.Generator().manual_seed(2)
    grads = [{n: torch.randn(s, generator=gen) for n, s in SHAPES.items()} for _ in range(2)]
    first, opt = one_step(
        None, make(0), grads[0], use_kernels=False, monkeypatch=monkeypatch, method="ties"
    )
    state = opt.state_dict()
    theirs, _ = one_step(
        state, first, grads[1], use_kernels=False, monkeypatch=monkeypatch, method="ties"
    )
    # The floor becomes the sample's largest |Δθ|: far above the k-th largest of the tensor.
    monkeypatch.setattr(sparsify, "sample_rank", lambda k, n, size: 1)
    overshot = []
    ties_steps = kernels.ties_steps_

    def spy(*args, **kwargs):
        short, totals = ties_steps(*args, **kwargs)
        overshot.extend(short.tolist())
        return short, totals

    monkeypatch.setattr(kernels, "ties_steps_", spy)
    ours, fast = one_step(
        state, first, grads[1], use_kernels=True, monkeypatch=monkeypatch, method="ties"
    )
    assert overshot == [True, False]  # a.weight overshot; a.bias (no sample) did not
    for name in SHAPES:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
    assert fast.stats()["merge/kept_fraction"] == pytest.approx(0.05, abs=1e-3)


def test_kernel_path_resumes_bit_exactly(monkeypatch) -> None:
    """Stopping after 3 of 6 kernel steps and resuming from state_dict ends where 6 steps end."""
    gen = torch.Generator().manual_seed(5)
    grads = [{n: torch.randn(s, generator=gen) for n, s in SHAPES.items()} for _ in range(6)]

    def train(params, opt, steps):
        for step_grads in steps:
            for name, p in params.items():
                p.grad = step_grads[name].clone()
            opt.step()

    whole = {n: t.requires_grad_() for n, t in make(0).items()}
    train(whole, optimizer(whole, method="ties"), grads)
    first = {n: t.requires_grad_() for n, t in make(0).items()}
    opt = optimizer(first, method="ties")
    train(first, opt, grads[:3])
    state = opt.state_dict()
    second = {n: t.detach().clone().requires_grad_() for n, t in first.items()}
    resumed = optimizer(second, method="ties")
    resumed.load_state_dict(state)
    train(second, resumed, grads[3:])
    assert all(torch.equal(whole[n], second[n]) for n in SHAPES)


def test_kernels_take_contiguous_float32_cpu_tensors_only() -> None:
    big = torch.zeros(100)
    assert kernels.usable(big, big) and kernels.usable(torch.zeros(3))
    assert not kernels.usable(big.to(torch.bfloat16))
    assert not kernels.usable(torch.zeros(2, 40).t())  # not contiguous


def test_dare_kernel_mask_has_the_bernoulli_law() -> None:
    """The kernel's mask keeps each entry with probability p, independently (geometric gaps
    of mean 1/p and variance (1 − p)/p²), in every chunk, for every key."""
    n, p = 2_000_000, 0.01
    index = kernels.dare_kept_indices(n, p, key_seed(0, "update", 1, "w"))
    assert index.dtype == torch.int64 and bool((index.diff() > 0).all())
    assert int(index[0]) >= 0 and int(index[-1]) < n
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(index.numel() - n * p) < 5 * sigma
    gaps = index.diff().double()
    assert abs(float(gaps.mean()) - 1 / p) < 0.05 / p
    assert abs(float(gaps.var()) / ((1 - p) / p**2) - 1) < 0.1
    per_chunk = torch.bincount(index // kernels.CHUNK).double()
    assert float(per_chunk.min()) > 0  # no chunk left out (~164 expected in each)
    # the first entries of a chunk are as likely as the others (the draw restarts there)
    hits = torch.zeros(2 * kernels.CHUNK)
    for step in range(300):
        hits[kernels.dare_kept_indices(hits.numel(), 0.2, key_seed(0, "update", step, "w"))] += 1
    starts = torch.cat([hits[:64], hits[kernels.CHUNK : kernels.CHUNK + 64]])
    assert abs(float(starts.mean()) - 60) < 4 and abs(float(hits.mean()) - 60) < 1


def test_dare_kernel_mask_is_keyed_by_key_and_chunk_only() -> None:
    """Same key, same mask (on every process and run); another step or name, another mask;
    a chunk's mask does not depend on how long the tensor is."""
    key = key_seed(0, "update", 1, "w")
    n = 3 * kernels.CHUNK + 5
    mask = kernels.dare_kept_indices(n, 0.05, key)
    assert torch.equal(mask, kernels.dare_kept_indices(n, 0.05, key))
    assert not torch.equal(mask, kernels.dare_kept_indices(n, 0.05, key_seed(0, "update", 2, "w")))
    assert not torch.equal(mask, kernels.dare_kept_indices(n, 0.05, key_seed(0, "update", 1, "v")))
    shorter = kernels.dare_kept_indices(kernels.CHUNK + 100, 0.05, key)
    assert torch.equal(shorter, mask[mask < kernels.CHUNK + 100])
    cuts = [0, 1000, kernels.CHUNK, 2 * kernels.CHUNK + 7, n]  # shards draw their own part
    parts = [kernels.dare_kept_indices(n, 0.05, key, a, b) for a, b in itertools.pairwise(cuts)]
    assert torch.equal(torch.cat(parts), mask)
    assert kernels.dare_kept_indices(n, 0.0, key).numel() == 0
    assert kernels.dare_kept_indices(n, 1.0, key).numel() == n


def test_dare_kernel_step_applies_exactly_its_mask() -> None:
    """One step: exactly the mask's entries move, by (1 − α)·Δθ/p; T's by α·T (sparse T)."""
    from omotool.optim.functional import MergeOptions, adam_direction, reference_tensor

    p, alpha = 0.3, 0.2
    params = {n: t.requires_grad_() for n, t in make(0).items()}
    before = {n: t.detach().clone() for n, t in params.items()}
    opt = optimizer(params, reserve_p=p, alpha=alpha, lr=1e-2, eps=0.1)
    gen = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    for name, param in params.items():
        param.grad = grads[name].clone()
    opt.step()
    options = MergeOptions(method="dare", reserve_p=p, alpha=alpha, seed=3)
    for name, g in grads.items():
        index = kernels.dare_kept_indices(g.numel(), p, key_seed(3, "update", 1, name))
        mask = torch.zeros(g.numel(), dtype=torch.bool)
        mask[index] = True
        m, v = (1 - 0.9) * g, (1 - 0.999) * g * g
        update = adam_direction(m, v, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=0.1)
        tau = reference_tensor(make(1)[name], name, options)
        expected = before[name] + (1 - alpha) * torch.where(mask.view(g.shape), update / p, 0.0)
        expected += alpha * tau
        torch.testing.assert_close(params[name].detach(), expected, rtol=1e-6, atol=1e-7)
        moved = params[name].detach() != before[name]
        assert torch.equal(moved.flatten() & ~(tau != 0).flatten(), mask & ~(tau != 0).flatten())
    assert opt.stats()["merge/kept_fraction"] == pytest.approx(p, abs=0.02)


@pytest.mark.parametrize("method", ["ties", "dare"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_in_the_last_tensor_skips_the_kernel_step(method, bad) -> None:
    """The kernels' finite check (``kernels.all_finite``) sees the last entry of the last
    tensor: nothing is written, parameters and moments stay as they were, the skip counts."""
    gen = torch.Generator().manual_seed(4)
    params = {n: t.requires_grad_() for n, t in make(0).items()}
    opt = optimizer(params, method=method)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    before = {n: p.detach().clone() for n, p in params.items()}
    moments = {
        n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
        for n, p in params.items()
    }
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    params["a.bias"].grad[-1] = bad  # the last tensor's last entry
    opt.step()
    assert opt.skipped_steps == 1
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name])
        assert torch.equal(opt.state[p]["exp_avg"], moments[name][0])
        assert torch.equal(opt.state[p]["exp_avg_sq"], moments[name][1])
        assert int(opt.state[p]["step"]) == 2


def test_all_finite_checks_every_chunk() -> None:
    tensors = [torch.zeros(n) for n in (1, 5, kernels.CHUNK + 3, 2 * kernels.CHUNK)]
    assert kernels.all_finite(tensors) and kernels.all_finite([])
    for t in range(len(tensors)):
        for at in (0, tensors[t].numel() - 1, tensors[t].numel() // 2):
            for bad in (float("nan"), float("inf"), -float("inf")):
                tensors[t][at] = bad
                assert not kernels.all_finite(tensors)
                tensors[t][at] = 3.0e38  # large but finite
                assert kernels.all_finite(tensors)


def test_kernels_use_numba_workqueue_threads_not_a_second_openmp() -> None:
    """Regression: with numba's OpenMP layer, the spinning threads of its own libgomp made
    every torch op after one kernel call 10-30x slower on a busy machine."""
    import subprocess
    import sys

    code = (
        "import torch; from omotool.optim import kernels; "
        "assert kernels.all_finite([torch.ones(70000)]); "
        "import numba; print(numba.threading_layer())"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "workqueue"


def test_chunk_drawn_masks_without_the_kernels_are_refused_by_name(monkeypatch) -> None:
    """Chunk-drawn masks asked for where the kernels are off: a UsageError saying what to use
    instead, not a TypeError from inside (the cpu backend only draws them when the kernels
    are on)."""
    from omotool.errors import UsageError
    from omotool.optim.functional import MergeContext, MergeOptions, StepStats

    monkeypatch.setattr(kernels, "_compiled", lambda: None)
    context = MergeContext("w", 1, MergeOptions(method="dare", reserve_p=0.1), StepStats())
    with pytest.raises(UsageError, match="dare_draw='generator'"):
        cpu_backend.chunk_dare_indices(100, context, torch.device("cpu"))


def test_thread_rows_are_made_once_and_slots_left_at_minus_one() -> None:
    """The per-thread rows are allocated once per process and counted by ``scratch_bytes``;
    after an OnTIES step (with T, so that merged entries are marked −2 on the way) every
    slot is −1 again, as the next ``ties_apply`` expects."""
    params = {n: t.requires_grad_() for n, t in make(0).items()}
    opt = optimizer(params, method="ties", reserve_p=0.3)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    slots = kernels._thread_rows("slots")
    assert kernels._thread_rows("slots") is slots and bool((slots == -1).all())
    made = [kernels._thread_rows(kind) for kind in ("scratch", "flags", "slots")]
    assert kernels.scratch_bytes() >= sum(rows.nbytes for rows in made)
