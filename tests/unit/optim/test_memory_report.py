"""OnlineMergingAdamW.memory_report: every buffer the optimizer holds, counted once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omotool.optim import OnlineMergingAdamW, kernels

SHAPES = {"embed.weight": (300, 40), "layer.weight": (40, 40), "layer.bias": (40,)}


def make_params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g).to(dtype).requires_grad_() for n, s in SHAPES.items()}


def make_tau() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: 0.05 * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def take_steps(opt: OnlineMergingAdamW, params: dict[str, torch.Tensor], steps: int) -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def reachable_bytes(root: object, exclude: list[torch.Tensor]) -> int:
    """Bytes of every tensor (and numpy array) reachable from ``root`` through containers and
    the attributes of omotool's and torch.optim's objects, each storage once; ``exclude``'s
    storages (the model's parameters and gradients) are not the optimizer's."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[tuple[str, int], int] = {}
    visited: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, np.ndarray):
            owner = obj if obj.base is None else obj.base
            storages[("numpy", id(owner))] = owner.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(("omotool", "torch.optim")) and hasattr(
            obj, "__dict__"
        ):
            stack.extend(vars(obj).values())
    return sum(storages.values())


CASES = {
    "none": dict(method="none"),
    "dare": dict(method="dare"),
    "ties": dict(method="ties"),
    "dare-reference-path": dict(method="dare", backend="reference"),
    "ties-per-tensor": dict(method="ties", kernels=False),
    "dare-step-k": dict(method="dare", online_step=3),
    "ties-step-k": dict(method="ties", online_step=2),
    "dare-bf16": dict(method="dare", dtype=torch.bfloat16),
    "ties-bf16-step-k": dict(method="ties", online_step=2, dtype=torch.bfloat16),
    "dare-bf16-no-master": dict(method="dare", dtype=torch.bfloat16, master_weights=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_memory_report_counts_every_buffer(case, monkeypatch) -> None:
    options = dict(CASES[case])
    dtype = options.pop("dtype", torch.float32)
    if not options.pop("kernels", True):
        monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    params = make_params(dtype)
    tau = None if options["method"] == "none" else make_tau()
    opt = OnlineMergingAdamW(params.items(), tau, reserve_p=0.1, lr=1e-3, **options)
    take_steps(opt, params, 4)
    report = opt.memory_report()
    grads = [p.grad for p in params.values()]
    assert report["total_bytes"] == reachable_bytes(opt, [*params.values(), *grads]), report
    components = [k[: -len("_bytes")] for k in report if k.endswith("_bytes")]
    parts = [c for c in components if c not in ("task_vector", "total", "extra", "kernel_scratch")]
    assert sum(report[f"{c}_bytes"] for c in parts) == report["total_bytes"]
    n = sum(p.numel() for p in params.values())
    assert report["parameters"] == n
    for c in parts:
        assert report[f"{c}_bytes_per_parameter"] == pytest.approx(report[f"{c}_bytes"] / n)
    # The figures are the buffers one expects, not merely a consistent sum.
    assert report["moments_bytes"] == 8 * n
    assert report["master_bytes"] == (
        4 * n if dtype != torch.float32 and "master_weights" not in options else 0
    )
    assert report["cache_bytes"] == (4 * n if options.get("online_step", 1) > 1 else 0)
    assert report["extra_bytes"] == report["total_bytes"] - 8 * n - report["steps_bytes"]
    if tau is not None:
        assert report["task_vector_values_bytes"] > 0


def test_workspace_is_counted_once_allocated() -> None:
    params = make_params()
    opt = OnlineMergingAdamW(params.items(), make_tau(), method="dare", online_step=2)
    assert not any(k.startswith("workspace_") for k in opt.memory_report())
    take_steps(opt, params, 1)
    report = opt.memory_report()
    largest = max(p.numel() for p in params.values())
    assert report["workspace_update_bytes"] == 4 * largest  # Δθ of the largest tensor


def test_task_vector_bytes_at_one_percent() -> None:
    shapes = {"a": (512, 512), "b": (1024, 256)}
    params = {n: torch.zeros(s, requires_grad=True) for n, s in shapes.items()}
    tau = {n: torch.randn(s) for n, s in shapes.items()}
    for method in ("dare", "ties"):
        opt = OnlineMergingAdamW(params.items(), tau, method=method, reserve_p=0.01)
        report = opt.memory_report()
        # Sparse T: an int32 index and a float32 value per kept entry, p = 1%.
        assert report["task_vector_bytes_per_parameter"] == pytest.approx(0.08, rel=0.15)
        assert report["task_vector_indices_bytes"] == report["task_vector_values_bytes"]
