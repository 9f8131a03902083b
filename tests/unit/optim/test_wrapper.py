"""OnlineMerging around other optimizers: SGD with momentum, Adafactor, RMSprop."""

from __future__ import annotations

import copy

import pytest
import torch

from omotool.optim import OnlineMerging
from tests.unit.optim.reference import ReferenceOptimizer
from tests.unit.optim.test_online_merging import grad_sequence, make_params, make_tau, run

INNER = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=0.01),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01),
}


@pytest.mark.parametrize("inner", sorted(INNER))
def test_full_density_zero_alpha_is_the_inner_optimizer(inner) -> None:
    grads = grad_sequence(8)
    wrapped, alone = make_params(), make_params()
    opt = OnlineMerging(
        INNER[inner](list(wrapped.items())), make_tau(), method="dare", reserve_p=1.0, alpha=0.0
    )
    a = run(opt, wrapped, grads)
    b = run(INNER[inner](list(alone.values())), alone, grads)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.mark.parametrize("inner", ["sgd", "adafactor"])
@pytest.mark.parametrize(("method", "k"), [("dare", 1), ("ties", 1), ("ties", 3)])
def test_merges_the_inner_update_like_the_transcription(inner, method, k) -> None:
    grads, tau = grad_sequence(6), make_tau(scale=0.5)
    params = make_params()
    opt = OnlineMerging(
        INNER[inner](list(params.items())),
        tau,
        method=method,
        reserve_p=0.3,
        alpha=0.2,
        online_step=k,
        seed=2,
    )
    # The same algorithm written densely: inner step on a copy, Δθ = after − before, merge.
    shadow = make_params()
    inner_opt = INNER[inner](list(shadow.values()))
    oracle = ReferenceOptimizer({}, tau, method=method, p=0.3, alpha=0.2, lr=0.0, seed=2)
    cache = {n: torch.zeros_like(t) for n, t in shadow.items()}
    for t, step_grads in enumerate(grads, start=1):
        run(opt, params, [step_grads])
        before = {n: p.detach().clone() for n, p in shadow.items()}
        for name, p in shadow.items():
            p.grad = step_grads[name].clone()
        inner_opt.step()
        oracle.t = t
        with torch.no_grad():
            for name, p in shadow.items():
                delta = p.detach() - before[name]
                if k > 1 and t % k != 0:
                    cache[name] += delta
                    continue
                p.copy_(before[name] - cache[name] + oracle.merged(name, delta + cache[name]))
                cache[name].zero_()
        for name in params:
            assert torch.allclose(params[name], shadow[name], atol=1e-5), (t, name)


def test_scheduler_and_state_dict_round_trip() -> None:
    grads = grad_sequence(8)
    params = make_params()
    opt = OnlineMerging(
        INNER["sgd"](list(params.items())),
        make_tau(),
        method="ties",
        reserve_p=0.3,
        alpha=0.1,
        online_step=2,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step_grads in grads[:4]:
        run(opt, params, [step_grads])
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    saved = copy.deepcopy(opt.state_dict())
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    expected = run(opt, params, grads[4:])
    resumed = {n: t.clone().requires_grad_() for n, t in snapshot.items()}
    opt2 = OnlineMerging(
        INNER["sgd"](list(resumed.items())),
        make_tau(),
        method="ties",
        reserve_p=0.3,
        alpha=0.1,
        online_step=2,
    )
    opt2.load_state_dict(saved)
    final = run(opt2, resumed, grads[4:])
    assert all(torch.equal(final[n], expected[n]) for n in final)


def test_nan_gradient_skips_inner_step_too() -> None:
    params = make_params()
    opt = OnlineMerging(INNER["sgd"](list(params.items())), make_tau(), method="dare")
    bad = grad_sequence(1)[0]
    bad["layer.weight"][0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in params.items()}
    run(opt, params, [bad])
    assert opt.skipped_steps == 1
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())
    assert opt.optimizer.state == {} or all(not s for s in opt.optimizer.state.values())
