"""The sync-free path (what a GPU takes): same results, nothing read on the host in ``step()``.

With no GPU here, ``backend="torch"`` forces the path onto CPU tensors, and a guard turns every
Python-level way of reading a tensor on the host (``item``, ``bool``, ``int``, ``float``,
``tolist``, ``nonzero``, ``cpu``, ``numpy``, ``torch.tensor``) into an error during ``step()``.
Tests marked ``cuda`` run the same steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from omotool.merging import magnitude_mask
from omotool.optim import NonFiniteGradientError, OnlineMergingAdamW, kernels
from omotool.optim.backends.sync_free import sync_free_topk_mask
from tests.unit.optim.reference import ReferenceOptimizer
from tests.unit.optim.test_online_merging import grad_sequence, make_params, make_tau, run

CASES = {
    "none": dict(method="none"),
    "dare": dict(method="dare", reserve_p=0.3, alpha=0.1),
    "dare-none-rescale": dict(method="dare", reserve_p=0.3, alpha=0.1, rescale="none"),
    "dare-l1": dict(method="dare", reserve_p=0.5, alpha=0.02, rescale="l1"),
    "dare-full": dict(method="dare", reserve_p=1.0, alpha=0.1),
    "dare-k3": dict(method="dare", reserve_p=0.3, alpha=0.1, online_step=3),
    "ties": dict(method="ties", reserve_p=0.2, alpha=0.3),
    "ties-weighted": dict(method="ties", reserve_p=0.2, alpha=0.3, election="weighted"),
    "ties-inverse": dict(method="ties", reserve_p=0.2, alpha=0.3, rescale="inverse"),
    "ties-l1": dict(method="ties", reserve_p=0.2, alpha=0.3, rescale="l1"),
    "ties-k4": dict(method="ties", reserve_p=0.2, alpha=0.3, online_step=4),
}
SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class HostSync(AssertionError):
    """A tensor was read on the host inside ``step()``."""


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch):
    """Every Python-level host read of a tensor raises ``HostSync`` inside the block."""

    def refuse(what):
        def raising(*args, **kwargs):
            raise HostSync(f"{what} called during step()")

        return raising

    with monkeypatch.context() as patch:
        for method in SYNCING_METHODS:
            patch.setattr(torch.Tensor, method, refuse(f"Tensor.{method}"))
        patch.setattr(torch.Tensor, "cpu", refuse("Tensor.cpu"))
        patch.setattr(torch.Tensor, "numpy", refuse("Tensor.numpy"))
        patch.setattr(torch, "nonzero", refuse("torch.nonzero"))
        patch.setattr(torch, "tensor", refuse("torch.tensor (a host tensor copied over)"))
        yield


def test_the_guard_catches_host_reads(monkeypatch) -> None:
    x = torch.ones(3)
    with no_host_reads(monkeypatch):
        for read in (x.sum().item, lambda: bool(x.sum()), lambda: float(x[0]), x.nonzero):
            with pytest.raises(HostSync):
                read()
    assert x.sum().item() == 3.0  # restored


def steps_without_host_reads(monkeypatch, opt, params, grads) -> None:
    for step_grads in grads:
        for name, p in params.items():
            p.grad = step_grads[name].to(p.dtype)
        with no_host_reads(monkeypatch):
            opt.step()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16-master"])
def test_step_reads_nothing_on_the_host(case, dtype, monkeypatch) -> None:
    params = make_params(dtype=dtype)
    opt = OnlineMergingAdamW(
        params.items(), make_tau(), lr=1e-2, weight_decay=0.01, backend="torch", **CASES[case]
    )
    grads = grad_sequence(5)
    grads[2]["layer.weight"][3, 3] = float("nan")  # a skipped step, decided on the device
    steps_without_host_reads(monkeypatch, opt, params, grads)
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in params.values())
    for param, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.device == param.device, key
        assert int(state["step"]) == 4 and state["host_step"] == 5
    stats = opt.stats()  # read here, once
    assert stats["merge/skipped_steps"] == 1.0


def _pair(case, *, nan_at=None, steps=9, dtype=torch.float32, **extra):
    """The sync-free path and the reference path on the same gradients (the CPU backend's
    batched OnDARE draws its masks otherwise: ``test_kernels``)."""
    grads = grad_sequence(steps)
    if nan_at is not None:
        grads[nan_at]["head.weight"][0, 1] = float("inf")
    result = []
    for backend in ("torch", "reference"):
        params = make_params(dtype=dtype)
        kwargs = dict(lr=1e-2, weight_decay=0.01, eps=0.1, seed=3, **CASES[case], **extra)
        opt = OnlineMergingAdamW(params.items(), make_tau(scale=0.5), backend=backend, **kwargs)
        stats = []
        for step_grads in grads:
            run(opt, params, [step_grads])
            stats.append(opt.stats())
        result.append((params, opt, stats))
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_same_trajectory_and_stats_as_the_reference_path(case) -> None:
    """Same masks (the same keyed generators), same top-k, same merge: equal to rounding."""
    (ours, opt, our_stats), (theirs, _, their_stats) = _pair(case)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-6), name
    for mine, expected in zip(our_stats, their_stats, strict=True):
        assert mine == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert all(s["step"].dtype == torch.float32 for s in opt.state.values())


@pytest.mark.parametrize("case", ["none", "dare", "ties", "ties-k4"])
def test_a_skipped_step_changes_nothing(case) -> None:
    (ours, opt, our_stats), (theirs, _, their_stats) = _pair(case, nan_at=4, steps=5)
    # the skipped step is the last one: everything equals the run that stopped before it
    (before, _, before_stats) = _pair(case, steps=4)[0]
    for name in ours:
        assert torch.equal(ours[name], before[name]), name
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-6), name
    assert our_stats[-1] == {**before_stats[-1], "merge/skipped_steps": 1.0}
    assert opt.skipped_steps == 1


@pytest.mark.parametrize(
    "options",
    [
        dict(method="dare", alpha=0.1),
        dict(method="dare", alpha=0.1, online_step=3),
        dict(method="ties", alpha=0.3),
        dict(method="ties", alpha=0.3, online_step=4, election="weighted"),
    ],
)
def test_matches_the_dense_transcription(options) -> None:
    grads, tau = grad_sequence(12), make_tau(scale=0.5)
    common = dict(lr=1e-2, weight_decay=0.01, seed=3, eps=0.1, **options)
    params = make_params()
    opt = OnlineMergingAdamW(params.items(), tau, reserve_p=0.3, backend="torch", **common)
    reference = {n: t.detach().clone() for n, t in make_params().items()}
    oracle = ReferenceOptimizer(reference, tau, p=0.3, **common)
    for step_grads in grads:
        run(opt, params, [step_grads])
        oracle.step(step_grads)
        for name in params:
            assert torch.allclose(params[name], reference[name], rtol=0, atol=1e-6), name


def test_method_none_is_fused_adamw_exactly() -> None:
    ours, theirs = make_params(), make_params()
    opt = OnlineMergingAdamW(
        ours.items(), method="none", lr=3e-3, weight_decay=0.1, backend="torch"
    )
    torch_opt = torch.optim.AdamW(theirs.values(), lr=3e-3, weight_decay=0.1, fused=True)
    for step_grads in grad_sequence(6):
        run(opt, ours, [step_grads])
        run(torch_opt, theirs, [step_grads])
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_raise_policy_still_raises() -> None:
    params = make_params()
    opt = OnlineMergingAdamW(
        params.items(), make_tau(), method="ties", nan_policy="raise", backend="torch"
    )
    before = {n: p.detach().clone() for n, p in params.items()}
    bad = grad_sequence(1)[0]
    bad["layer.bias"][0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        run(opt, params, [bad])
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())


@pytest.mark.parametrize(("case", "k"), [("dare", 1), ("ties", 3), ("dare-k3", 1)])
def test_resume_is_bit_exact_across_paths(case, k, monkeypatch) -> None:
    """A checkpoint of the CPU path resumes on the sync-free path (and back), step on device.
    (The CPU path per tensor: the batched OnDARE kernel draws other masks.)"""
    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    grads = grad_sequence(8)
    options = dict(CASES[case], lr=1e-2, seed=11)
    if case == "ties":
        options["online_step"] = k
    straight = make_params()
    opt = OnlineMergingAdamW(straight.items(), make_tau(), backend="torch", **options)
    run(opt, straight, grads)
    first = make_params()
    opt_first = OnlineMergingAdamW(first.items(), make_tau(), backend="cpu", **options)
    run(opt_first, first, grads[:5])
    saved = copy.deepcopy(opt_first.state_dict())
    resumed = {n: p.detach().clone().requires_grad_() for n, p in first.items()}
    opt_resumed = OnlineMergingAdamW(resumed.items(), make_tau(), backend="torch", **options)
    opt_resumed.load_state_dict(saved)
    assert all(s["host_step"] == 5 for s in opt_resumed.state.values())
    run(opt_resumed, resumed, grads[5:])
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("n", [1, 7, 100, 5000])
def test_topk_mask_is_magnitude_mask_with_ties(n) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (n,), generator=g).float()  # many ties at the threshold
    for density in (0.01, 0.2, 0.5, 1.0):
        assert torch.equal(sync_free_topk_mask(x, density), magnitude_mask(x, density)), density


def test_state_is_created_on_the_parameters_device() -> None:
    """``_state_for`` builds every state tensor (``step`` too) on the local tensor's device."""
    param = torch.empty(4, 3, device="meta", dtype=torch.bfloat16)
    opt = OnlineMergingAdamW([("w", torch.zeros(4, 3))], method="none")
    state = opt._state_for(param, param, merges=False)
    assert {v.device.type for v in state.values() if isinstance(v, torch.Tensor)} == {"meta"}
    assert state["step"].dim() == 0 and state["step"].dtype == torch.float32


# -- on a CUDA device (skipped here; run by a GPU session) ----------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", ["none", "dare", "dare-k3", "ties", "ties-k4", "ties-l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16-master"])
def test_cuda_step_does_not_synchronise(case, dtype) -> None:
    params = {n: p.detach().cuda().requires_grad_() for n, p in make_params(dtype=dtype).items()}
    tau = {n: t.cuda() for n, t in make_tau().items()}
    opt = OnlineMergingAdamW(params.items(), tau, lr=1e-2, weight_decay=0.01, **CASES[case])
    grads = [{n: g.cuda() for n, g in step.items()} for step in grad_sequence(5)]
    grads[2]["layer.weight"][0, 0] = float("nan")
    for step_grads in grads:
        for name, p in params.items():
            p.grad = step_grads[name].to(p.dtype)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for param, state in opt.state.items():
        assert all(v.device == param.device for v in state.values() if torch.is_tensor(v))
    assert opt.skipped_steps == 1


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", ["none", "dare", "ties", "ties-k4"])
def test_cuda_matches_the_cpu_sync_free_path(case) -> None:
    grads = grad_sequence(6)
    out = []
    for device in ("cpu", "cuda"):
        params = {n: p.detach().to(device).requires_grad_() for n, p in make_params().items()}
        tau = {n: t.to(device) for n, t in make_tau(scale=0.5).items()}
        opt = OnlineMergingAdamW(
            params.items(), tau, lr=1e-2, eps=0.1, backend="torch", **CASES[case]
        )
        for step_grads in grads:
            run(opt, params, [{n: g.to(device) for n, g in step_grads.items()}])
        out.append({n: p.detach().cpu() for n, p in params.items()})
    if case in ("none", "ties", "ties-k4"):  # DARE masks come from another generator on CUDA
        for name in out[0]:
            assert torch.allclose(out[0][name], out[1][name], rtol=0, atol=1e-5), name


@pytest.mark.parametrize(
    ("bad", "nonfinite"),
    [(float("nan"), True), (float("inf"), True), (-float("inf"), True), (3e38, False),
     (-3e38, False), (0.0, False)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_nonfinite_flags_nan_and_inf_only(bad, nonfinite, dtype) -> None:
    """The device flag from the gradients' max-norms: NaN and ±inf anywhere (in any tensor,
    any dtype) set it; finite values, however large, do not (a max cannot overflow)."""
    from omotool.optim.online_merging import gradients_nonfinite

    params = [
        torch.zeros(5, requires_grad=True),
        torch.zeros(3, 4, dtype=dtype, requires_grad=True),
    ]
    params[0].grad = torch.ones(5)
    params[1].grad = torch.full((3, 4), 2.0, dtype=dtype)
    params[1].grad[2, 1] = bad
    flag = gradients_nonfinite([{"params": params}])
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag) is nonfinite
    assert gradients_nonfinite([{"params": [torch.zeros(2, requires_grad=True)]}]) is None
