"""OnlineMergingAdamW: parity with torch AdamW, the paper's algorithm, step-K, resume, NaN."""

from __future__ import annotations

import copy

import pytest
import torch

from omotool.errors import InputError, UsageError
from omotool.optim import NonFiniteGradientError, OnlineMergingAdamW
from tests.unit.optim.reference import (
    ReferenceOptimizer,
    bernoulli_update_indices,
    kernel_update_indices,
)

SHAPES = {"layer.weight": (24, 16), "layer.bias": (24,), "head.weight": (5, 24)}


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype).requires_grad_() for n, s in SHAPES.items()}


def make_tau(seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def grad_sequence(steps, seed=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(steps)
    ]


def run(optimizer, params, grads):
    for step_grads in grads:
        for name, p in params.items():
            p.grad = step_grads[name].to(p.dtype)
        optimizer.step()
    return {n: p.detach().clone() for n, p in params.items()}


def run_reference(tau, grads, **kwargs):
    params = {n: p.detach().clone() for n, p in make_params().items()}
    reference = ReferenceOptimizer(params, tau, **kwargs)
    for step_grads in grads:
        reference.step(step_grads)
    return params


@pytest.fixture(params=["reference", "cpu"])
def backend(request) -> str:
    """Both CPU backends of the optimizer: plain tensor ops, and the fused/numba kernels
    (which draw OnDARE's masks otherwise: ``MASKS``)."""
    return request.param


MASKS = {"reference": bernoulli_update_indices, "cpu": kernel_update_indices}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_method_none_is_torch_adamw_exactly(weight_decay, backend) -> None:
    grads = grad_sequence(60)
    ours = make_params()
    theirs = make_params()
    opt = OnlineMergingAdamW(
        ours.items(), method="none", lr=3e-3, weight_decay=weight_decay, backend=backend
    )
    path = {"fused": True} if backend == "cpu" else {"foreach": False}
    torch_opt = torch.optim.AdamW(theirs.values(), lr=3e-3, weight_decay=weight_decay, **path)
    a, b = run(opt, ours, grads), run(torch_opt, theirs, grads)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_param_groups_and_scheduler_match_torch() -> None:
    grads = grad_sequence(30)
    ours, theirs = make_params(), make_params()

    def groups(params, named):
        items = list(params.items())
        wrap = (lambda kv: kv) if named else (lambda kv: kv[1])
        return [
            {"params": [wrap(items[0])], "lr": 1e-2, "weight_decay": 0.2},
            {"params": [wrap(kv) for kv in items[1:]]},
        ]

    opt = OnlineMergingAdamW(groups(ours, True), method="none", lr=1e-3, backend="cpu")
    torch_opt = torch.optim.AdamW(groups(theirs, False), lr=1e-3, weight_decay=0.0, fused=True)
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30) for o in (opt, torch_opt)]
    for step_grads in grads:
        for params, o, s in ((ours, opt, sched[0]), (theirs, torch_opt, sched[1])):
            for name, p in params.items():
                p.grad = step_grads[name].clone()
            o.step()
            s.step()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_dare_full_density_zero_alpha_is_adamw(backend) -> None:
    grads = grad_sequence(40)
    ours, theirs = make_params(), make_params()
    opt = OnlineMergingAdamW(
        ours.items(),
        make_tau(),
        method="dare",
        reserve_p=1.0,
        alpha=0.0,
        lr=3e-3,
        weight_decay=0.05,
        backend=backend,
    )
    torch_opt = torch.optim.AdamW(theirs.values(), lr=3e-3, weight_decay=0.05, foreach=False)
    a, b = run(opt, ours, grads), run(torch_opt, theirs, grads)
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-6) for n in a)


@pytest.mark.parametrize(
    "options",
    [
        dict(method="dare", p=0.3, alpha=0.1),
        dict(method="dare", p=0.3, alpha=0.1, rescale="none"),
        dict(method="dare", p=0.5, alpha=0.02, rescale="l1"),
        dict(method="ties", p=0.2, alpha=0.3),
        dict(method="ties", p=0.2, alpha=0.3, election="weighted"),
        dict(method="ties", p=0.6, alpha=0.5),
        dict(method="dare", p=0.3, alpha=0.1, online_step=3),
        dict(method="ties", p=0.2, alpha=0.3, online_step=4),
    ],
)
def test_matches_dense_transcription_step_by_step(options, backend) -> None:
    grads, tau = grad_sequence(12), make_tau(scale=0.5)
    kwargs = dict(options)
    p = kwargs.pop("p")
    params = make_params()
    # A large eps keeps |Δθ| of Adam's first steps apart, so rounding cannot reorder the top-k.
    common = dict(lr=1e-2, weight_decay=0.01, seed=3, eps=0.1, **kwargs)
    opt = OnlineMergingAdamW(params.items(), tau, reserve_p=p, backend=backend, **common)
    reference = {n: t.detach().clone() for n, t in make_params().items()}
    oracle = ReferenceOptimizer(reference, tau, p=p, update_indices=MASKS[backend], **common)
    for step_grads in grads:
        run(opt, params, [step_grads])
        oracle.step(step_grads)
        for name in params:
            assert torch.allclose(params[name], reference[name], rtol=0, atol=1e-6), name


def test_dare_keeps_p_of_update_and_scales_by_inverse_p() -> None:
    params = {"w": torch.zeros(200, 500, requires_grad=True)}
    opt = OnlineMergingAdamW(
        params.items(),
        {"w": torch.zeros(200, 500)},
        method="dare",
        reserve_p=0.05,
        alpha=0.0,
        lr=1e-3,
    )
    params["w"].grad = torch.ones(200, 500)
    opt.step()
    moved = params["w"].detach() != 0
    assert abs(float(moved.float().mean()) - 0.05) < 0.005
    # Adam's first step is -lr*sign(g) (up to eps); kept entries are scaled by 1/p.
    assert torch.allclose(
        params["w"].detach()[moved], torch.full((int(moved.sum()),), -0.02), rtol=1e-4
    )
    assert opt.stats()["merge/kept_fraction"] == pytest.approx(0.05, abs=0.005)


def test_reference_term_is_fixed_and_seeded() -> None:
    tau = make_tau()
    a = OnlineMergingAdamW(make_params().items(), tau, method="dare", reserve_p=0.3, seed=5)
    b = OnlineMergingAdamW(make_params().items(), tau, method="dare", reserve_p=0.3, seed=5)
    c = OnlineMergingAdamW(make_params().items(), tau, method="dare", reserve_p=0.3, seed=6)
    before = {n: r.to_dense() for n, r in a.references.items()}
    run(a, make_params(), grad_sequence(3))
    for name, ref in a.references.items():
        assert torch.equal(ref.to_dense(), before[name])
        assert torch.equal(ref.to_dense(), b.references[name].to_dense())
    assert not all(torch.equal(before[n], c.references[n].to_dense()) for n in before)


def test_seed_determinism_and_difference() -> None:
    grads, tau = grad_sequence(5), make_tau()

    def final(seed):
        params = make_params()
        opt = OnlineMergingAdamW(
            params.items(), tau, method="dare", reserve_p=0.2, alpha=0.1, lr=1e-2, seed=seed
        )
        return run(opt, params, grads)

    a, b, c = final(1), final(1), final(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_alpha_one_moves_only_along_tau(method) -> None:
    tau = make_tau()
    params = make_params()
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = OnlineMergingAdamW(params.items(), tau, method=method, reserve_p=0.5, alpha=1.0, lr=1e-2)
    run(opt, params, grad_sequence(3))
    for name, ref in opt.references.items():
        expected = start[name] + 3 * ref.to_dense().view(start[name].shape)
        assert torch.allclose(params[name].detach(), expected, atol=1e-6)


def test_alpha_zero_ignores_tau() -> None:
    grads = grad_sequence(4)
    params_a, params_b = make_params(), make_params()
    a = OnlineMergingAdamW(
        params_a.items(), make_tau(seed=1), method="dare", reserve_p=0.3, alpha=0.0, lr=1e-2
    )
    b = OnlineMergingAdamW(
        params_b.items(), make_tau(seed=9), method="dare", reserve_p=0.3, alpha=0.0, lr=1e-2
    )
    ra, rb = run(a, params_a, grads), run(b, params_b, grads)
    assert all(torch.equal(ra[n], rb[n]) for n in ra)


def test_step_k_moves_every_tensor_on_every_step() -> None:
    params = make_params()
    opt = OnlineMergingAdamW(
        params.items(), make_tau(), method="dare", reserve_p=0.1, alpha=0.1, lr=1e-2, online_step=4
    )
    for step_grads in grad_sequence(7):
        before = {n: p.detach().clone() for n, p in params.items()}
        run(opt, params, [step_grads])
        for name, p in params.items():
            assert not torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_step_k_equal_to_total_steps_is_one_offline_merge(method, backend) -> None:
    steps, tau, grads = 6, make_tau(), grad_sequence(6)
    params = make_params()
    opt = OnlineMergingAdamW(
        params.items(),
        tau,
        method=method,
        reserve_p=0.3,
        alpha=0.2,
        lr=1e-2,
        online_step=steps,
        seed=4,
        backend=backend,
    )
    merged = run(opt, params, grads)
    # Offline: plain Adam for all steps, then one merge of the total update with T.
    plain = make_params()
    adam = torch.optim.AdamW(plain.values(), lr=1e-2, weight_decay=0.0, foreach=False)
    total = run(adam, plain, grads)
    start = make_params()
    oracle = ReferenceOptimizer(
        {n: t.detach().clone() for n, t in start.items()},
        tau,
        method=method,
        p=0.3,
        alpha=0.2,
        lr=1e-2,
        seed=4,
        update_indices=MASKS[backend],
    )
    oracle.t = steps
    for name, p in start.items():
        expected = p.detach() + oracle.merged(name, total[name] - p.detach())
        assert torch.allclose(merged[name], expected, atol=1e-6), name


def test_nan_gradient_skips_the_step_everywhere() -> None:
    params = make_params()
    opt = OnlineMergingAdamW(params.items(), make_tau(), method="ties", reserve_p=0.3, lr=1e-2)
    run(opt, params, grad_sequence(2))
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = copy.deepcopy(opt.state_dict())
    bad = grad_sequence(1, seed=7)[0]
    bad["head.weight"][0, 0] = float("nan")
    run(opt, params, [bad])
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())
    assert opt.skipped_steps == 1 and opt.stats()["merge/skipped_steps"] == 1.0
    steps = [int(s["step"]) for s in opt.state_dict()["state"].values()]
    assert steps == [int(s["step"]) for s in state_before["state"].values()]
    strict = OnlineMergingAdamW(params.items(), make_tau(), method="ties", nan_policy="raise")
    bad["layer.bias"][0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="NaN or inf") as raised:
        run(strict, params, [bad])
    assert isinstance(raised.value, FloatingPointError)  # as before: callers catching it
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())


@pytest.mark.parametrize(
    ("method", "k", "dtype"),
    [("dare", 1, torch.float32), ("ties", 3, torch.float32), ("dare", 2, torch.bfloat16)],
)
def test_state_dict_resume_is_bit_exact(method, k, dtype, backend) -> None:
    tau, grads = make_tau(), grad_sequence(10)
    kwargs = dict(
        method=method, reserve_p=0.3, alpha=0.1, lr=1e-2, online_step=k, seed=11, backend=backend
    )
    straight = make_params(dtype=dtype)
    expected = run(OnlineMergingAdamW(straight.items(), tau, **kwargs), straight, grads)

    first = make_params(dtype=dtype)
    opt = OnlineMergingAdamW(first.items(), tau, **kwargs)
    run(opt, first, grads[:5])  # stops mid step-K cycle
    saved_params = {n: p.detach().clone() for n, p in first.items()}
    saved_state = copy.deepcopy(opt.state_dict())

    resumed = {n: t.clone().requires_grad_() for n, t in saved_params.items()}
    opt2 = OnlineMergingAdamW(resumed.items(), tau, **kwargs)
    opt2.load_state_dict(saved_state)
    assert all(v["exp_avg"].dtype == torch.float32 for v in opt2.state.values())
    final = run(opt2, resumed, grads[5:])
    assert all(torch.equal(final[n], expected[n]) for n in final)


def test_resume_with_other_options_is_refused() -> None:
    params = make_params()
    opt = OnlineMergingAdamW(params.items(), make_tau(), method="dare", reserve_p=0.3)
    run(opt, params, grad_sequence(1))
    other = OnlineMergingAdamW(params.items(), make_tau(), method="dare", reserve_p=0.2)
    with pytest.raises(InputError, match="merge options"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(InputError, match="not an optimizer state dict"):
        other.load_state_dict({"model": {}})
    fewer = OnlineMergingAdamW(list(params.items())[:1], make_tau(), method="dare", reserve_p=0.3)
    with pytest.raises(InputError, match="does not fit this optimizer"):
        fewer.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "options",
    [dict(method="dare", reserve_p=1.0), dict(method="dare", reserve_p=0.5),
     dict(method="ties", reserve_p=0.5)],
    ids=["dare-dense", "dare-batched", "ties-batched"],
)  # fmt: skip
def test_bf16_master_weights_keep_tiny_updates(options, backend) -> None:
    # lr 1e-5 on weights of magnitude ~1: every update is far below bf16's half-ulp (~2e-3).
    grads = grad_sequence(30)
    for step_grads in grads:  # the bf16 runs see bf16 gradients: give the float32 run the same
        for name, grad in step_grads.items():
            step_grads[name] = grad.to(torch.bfloat16).float()
    start = {n: p.detach().float() for n, p in make_params(dtype=torch.bfloat16).items()}
    kwargs = dict(options, alpha=0.0, lr=1e-5, backend=backend)

    def bf16_run(master_weights):
        params = make_params(dtype=torch.bfloat16)
        opt = OnlineMergingAdamW(
            params.items(), make_tau(), master_weights=master_weights, **kwargs
        )
        return opt, run(opt, params, grads)

    fp32 = {n: t.clone().requires_grad_() for n, t in start.items()}  # same start as bf16
    a = run(OnlineMergingAdamW(fp32.items(), make_tau(), **kwargs), fp32, grads)
    opt, b = bf16_run(True)
    _, c = bf16_run(False)
    moved = torch.cat([(a[n] - start[n]).flatten() for n in a])
    movement = float(moved.norm())
    assert float(moved.abs().max()) < 1e-3  # below bf16's resolution at |θ| ~ 1
    # With master weights, the float32 copy follows the float32 run (measured: identical),
    # and the bf16 parameters are its rounding.
    held = opt.param_groups[0]["params"]
    master = {n: opt.state[p]["master"] for n, p in zip(SHAPES, held, strict=True)}
    gap = float(torch.cat([(master[n] - a[n]).flatten() for n in a]).norm())
    assert gap <= 1e-4 * movement, (gap, movement)
    assert all(torch.equal(b[n], master[n].to(torch.bfloat16)) for n in a)
    # Without them, each tiny update rounds away: the bf16 run stays where it started, as far
    # from the float32 run as that run has moved.
    lost = torch.cat([(c[n].float() - start[n]).flatten() for n in a])
    assert float(lost.norm()) < 0.1 * movement
    missed = float(torch.cat([(c[n].float() - a[n]).flatten() for n in a]).norm())
    assert missed > 0.9 * movement, (missed, movement)


def test_missing_and_mismatched_tau() -> None:
    tau = make_tau()
    del tau["head.weight"]
    with pytest.raises(InputError, match="no entry for 1 parameter"):
        OnlineMergingAdamW(make_params().items(), tau, method="dare")
    params = make_params()
    opt = OnlineMergingAdamW(params.items(), tau, method="dare", missing="adamw", lr=1e-2)
    assert "head.weight" not in opt.references
    run(opt, params, grad_sequence(2))
    bad = make_tau()
    bad["layer.bias"] = torch.zeros(7)
    with pytest.raises(InputError, match=r"shape \[24\] but its task-vector entry has shape \[7\]"):
        OnlineMergingAdamW(make_params().items(), bad, method="ties")


def test_unnamed_params_and_bad_options() -> None:
    with pytest.raises(UsageError, match="named_parameters"):
        OnlineMergingAdamW(list(make_params().values()), make_tau(), method="dare")
    OnlineMergingAdamW(list(make_params().values()), method="none")
    for bad in (
        dict(method="lion"),
        dict(reserve_p=0.0),
        dict(alpha=2.0),
        dict(online_step=0),
        dict(rescale="l2"),
        dict(election="max"),
        dict(nan_policy="ignore"),
    ):
        with pytest.raises(UsageError):
            OnlineMergingAdamW(make_params().items(), make_tau(), **bad)
    with pytest.raises(UsageError, match="needs a task_vector"):
        OnlineMergingAdamW(make_params().items(), method="dare")


def test_ties_stats_count_conflicts() -> None:
    params = {"w": torch.zeros(100, requires_grad=True)}
    tau = {"w": torch.ones(100)}
    opt = OnlineMergingAdamW(params.items(), tau, method="ties", reserve_p=1.0, alpha=0.5, lr=0.1)
    grad = torch.ones(100)
    grad[:30] = -1.0  # Adam moves those up (agree with tau), the rest down (conflict)
    params["w"].grad = grad
    opt.step()
    stats = opt.stats()
    assert stats["merge/kept_fraction"] == 1.0
    assert stats["merge/sign_conflict_fraction"] == pytest.approx(0.7)
