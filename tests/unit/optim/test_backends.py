"""The backend contract (``optim/backends``): every registered backend against the reference,
the merge rules' registry, refusals at construction, and checkpoints of older versions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omotool.errors import UsageError
from omotool.optim import MergeOptions, OnlineMergingAdamW
from omotool.optim.backends import BACKENDS, Backend
from omotool.optim.backends import triton as triton_backend
from omotool.optim.rules import MERGE_RULES

SHAPES = {"layer.weight": (40, 30), "layer.bias": (40,)}
# TIES keeps the same entries on every backend (an exact top-p); OnDARE's masks come from
# each backend's own generator, so its steps are compared to the reference in each backend's
# own tests.
CASES = {
    "ties": dict(method="ties", reserve_p=0.2, alpha=0.3, weight_decay=0.01),
    "none": dict(method="none", weight_decay=0.01),
}


def make(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def run(backend: str, options: dict, steps: int = 3) -> dict[str, torch.Tensor]:
    params = {n: t.requires_grad_() for n, t in make(0).items()}
    opt = OnlineMergingAdamW(  # eps large: |Δθ| varies with |g|, no near-ties in the top p
        params.items(), make(1, 0.05), lr=1e-2, eps=0.1, backend=backend, **options
    )
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert opt.resolved_backend == backend
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS.names())
def test_every_registered_backend_matches_the_reference(backend, case) -> None:
    options = CASES[case]
    if backend == "triton":
        reason = triton_backend.why_not(MergeOptions(method=options["method"]), torch.device("cpu"))
        if reason is not None:
            pytest.skip(f"backend triton {reason}")
    ours, reference = run(backend, options), run("reference", options)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)


def test_an_unknown_method_is_refused_with_the_close_names() -> None:
    params = make(0)
    with pytest.raises(UsageError, match="Did you mean 'ties'"):
        OnlineMergingAdamW(params.items(), make(1), method="tie")
    assert MERGE_RULES.names() == ["none", "dare", "ties"]
    assert [MERGE_RULES.get(m).default_rescale for m in MERGE_RULES] == ["none", "inverse", "none"]


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(UsageError, match="backend 'numba'"):
        OnlineMergingAdamW(make(0).items(), make(1), backend="numba")


def test_a_backend_refuses_a_rule_it_does_not_implement_at_construction() -> None:
    class DareOnly(Backend):
        name = "dare-only"
        rules = ("dare",)

        def step(self, tensors, *, keep, stats, workspace) -> None:  # pragma: no cover
            raise AssertionError("never stepped")

    DareOnly(MergeOptions(method="none"), [torch.device("cpu")])  # plain AdamW: nothing to do
    with pytest.raises(UsageError, match="backend='dare-only' does not implement method='ties'"):
        DareOnly(MergeOptions(method="ties"), [torch.device("cpu")])


def test_checkpoints_saved_with_dare_draw_still_load() -> None:
    """Older versions saved a backend's mask draw (``dare_draw``) among the merge options."""
    assert "dare_draw" not in {field.name for field in dataclasses.fields(MergeOptions)}
    params = {n: t.requires_grad_() for n, t in make(0).items()}
    opt = OnlineMergingAdamW(params.items(), make(1), method="dare", reserve_p=0.3)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    state["online_merging"]["options"]["dare_draw"] = "chunks"
    again = OnlineMergingAdamW(params.items(), make(1), method="dare", reserve_p=0.3)
    again.load_state_dict(state)
    assert again.state_dict()["online_merging"]["options"] == dataclasses.asdict(opt.options)
    state["online_merging"]["options"]["reserve_p"] = 0.5
    with pytest.raises(Exception, match="merge options"):
        again.load_state_dict(state)
