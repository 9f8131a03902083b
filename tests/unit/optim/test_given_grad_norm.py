"""``note_grad_norm``: a caller's gradient norm decides NaN skipping instead of a read of
every gradient (``GivenGradNorm``)."""

from __future__ import annotations

import math

import pytest
import torch

from omotool.optim import NonFiniteGradientError, OnlineMerging, OnlineMergingAdamW
from omotool.optim import online_merging as online_merging_module
from tests.unit.optim.test_online_merging import grad_sequence, make_params, make_tau, run

BACKENDS = ("reference", "cpu", "torch")


def total_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.get_total_norm(list(grads.values()))


def step_with_norm(optimizer, params, grads, norm) -> None:
    for name, p in params.items():
        p.grad = grads[name].clone()
    optimizer.note_grad_norm(norm)
    optimizer.step()


def make(params, backend, **options):
    return OnlineMergingAdamW(
        params.items(), make_tau(), method="ties", reserve_p=0.3, lr=1e-2, backend=backend,
        **options,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finite_norm_gives_the_same_steps_without_reading_gradients(backend, monkeypatch):
    grads = grad_sequence(3)
    plain = make_params()
    run(make(plain, backend), plain, grads)
    given = make_params()
    opt = make(given, backend)
    norms = [total_norm(step_grads) for step_grads in grads]

    def no_read(*args, **kwargs):
        raise AssertionError("the gradients were read for the NaN check")

    monkeypatch.setattr(online_merging_module.kernels, "all_finite", no_read)
    monkeypatch.setattr(torch, "aminmax", no_read)
    monkeypatch.setattr(torch, "_foreach_norm", no_read)
    for step_grads, norm in zip(grads, norms, strict=True):
        step_with_norm(opt, given, step_grads, norm)
    for name in plain:
        assert torch.equal(plain[name], given[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [math.inf, math.nan, torch.tensor(math.nan)])
def test_a_non_finite_norm_skips_the_step(backend, norm) -> None:
    params = make_params()
    opt = make(params, backend)
    run(opt, params, grad_sequence(2))
    before = {n: p.detach().clone() for n, p in params.items()}
    step_with_norm(opt, params, grad_sequence(1, seed=5)[0], norm)
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())
    assert opt.skipped_steps == 1
    strict = make(params, backend, nan_policy="raise")
    with pytest.raises(NonFiniteGradientError):
        step_with_norm(strict, params, grad_sequence(1, seed=5)[0], norm)
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_norm_serves_one_step_and_never_a_closure(backend) -> None:
    """A finite norm is trusted (here, wrongly: a gradient holds NaN) for the next step only;
    the step after it, and a step given a closure, read the gradients themselves."""
    params = make_params()
    opt = make(params, backend)
    bad = grad_sequence(1, seed=5)[0]
    bad["layer.bias"][3] = math.nan
    step_with_norm(opt, params, bad, 1.0)
    moment = opt.state[params["layer.bias"]]["exp_avg"]
    assert opt.skipped_steps == 0 and torch.isnan(moment).any()  # trusted, so stepped
    params = make_params()
    opt = make(params, backend)
    opt.note_grad_norm(1.0)
    run(opt, params, grad_sequence(1))  # uses it
    run(opt, params, [bad])  # none given: reads, skips
    assert opt.skipped_steps == 1
    opt.note_grad_norm(1.0)

    def closure():
        for name, p in params.items():
            p.grad = bad[name].clone()
        return torch.tensor(0.0)

    opt.step(closure)  # new gradients: the norm given before does not describe them
    assert opt.skipped_steps == 2
    assert not any(torch.isnan(p).any() for p in params.values())


def test_the_wrapper_takes_a_norm_too() -> None:
    params = make_params()
    inner = torch.optim.SGD(params.items(), lr=0.1)
    opt = OnlineMerging(inner, make_tau(), method="dare", reserve_p=0.5)
    run(opt, params, grad_sequence(1))
    before = {n: p.detach().clone() for n, p in params.items()}
    step_with_norm(opt, params, grad_sequence(1, seed=4)[0], math.inf)
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_norm_given_for_other_gradients_is_not_used(backend) -> None:
    """The gradients changed in place, or were replaced, after the norm was given: the step
    reads them itself (here it finds the NaN and skips)."""
    for change in ("in place", "replaced"):
        params = make_params()
        opt = make(params, backend)
        grads = grad_sequence(1, seed=5)[0]
        for name, p in params.items():
            p.grad = grads[name].clone()
        opt.note_grad_norm(total_norm(grads))
        if change == "in place":
            params["layer.bias"].grad[3] = math.nan
        else:
            params["layer.bias"].grad = torch.full_like(params["layer.bias"], math.nan)
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        assert opt.skipped_steps == 1, change
        assert all(torch.equal(p.detach(), before[n]) for n, p in params.items()), change
