"""The ``triton`` backend, checked under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` where there is no CUDA) against the reference backend and the merging rules.

- OnTIES keeps exactly the entries ``merging.magnitude_mask`` keeps (ties included);
- OnDARE's Philox mask has the Bernoulli(p) law, depends on the key and the global offset only
  (not on sharding), and the step applies exactly the entries of that mask;
- whole steps (moments, merges, bf16 write-back, NaN skips, statistics) equal the reference
  backend's to float32 rounding; resume is bit-exact; what the backend does not do is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch

from omotool.errors import UsageError
from omotool.merging import key_seed, magnitude_mask
from omotool.optim import OnlineMergingAdamW
from omotool.optim.functional import adam_direction

triton = pytest.importorskip("triton")
from omotool.optim import triton_kernels as tk  # noqa: E402
from omotool.optim.backends import triton as triton_backend  # noqa: E402
from omotool.optim.backends import triton_select  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_backend.interpreting()),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# More than one program per tensor, and a partial last block.
SHAPES = {"embed.weight": (300, 16), "layer.weight": (40, 64), "layer.bias": (40,)}
CASES = {
    "dare-full": dict(method="dare", reserve_p=1.0, alpha=0.1),
    "dare-dense-tau": dict(method="dare", reserve_p=1.0, alpha=0.1, tau_clip=None),
    "ties": dict(method="ties", reserve_p=0.2, alpha=0.3),
    "ties-weighted": dict(method="ties", reserve_p=0.2, alpha=0.3, election="weighted"),
    "ties-inverse": dict(method="ties", reserve_p=0.2, alpha=0.3, rescale="inverse"),
    "ties-alpha0": dict(method="ties", reserve_p=0.05, alpha=0.0),
    "ties-dense-tau": dict(method="ties", reserve_p=0.8, alpha=0.3),
    "none": dict(method="none"),
}


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for n, s in SHAPES.items()
    }


def make_tau(seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def grad_sequence(steps, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(steps)]


def run(opt, params, grads, stats=None):
    for step_grads in grads:
        for name, p in params.items():
            p.grad = step_grads[name].to(p.device, p.dtype)
        opt.step()
        if stats is not None:
            stats.append(opt.stats())
    return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def optimizer(params, backend, **options):
    # eps = 0.1 spreads |Δθ| out: Adam's first steps otherwise put every |Δθ| within an ulp of
    # lr, and which near-tie a top-k keeps then depends on each backend's rounding.
    settings = dict(lr=1e-2, eps=0.1, weight_decay=0.01, seed=3) | options
    return OnlineMergingAdamW(params.items(), make_tau(), backend=backend, **settings)


# -- OnTIES's selection ------------------------------------------------------------------------


def _magnitudes(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    if kind == "equal":
        return torch.full((n,), -0.5)
    if kind == "adam-first-step":  # |Δθ| piled up just below lr
        return torch.sign(x) * 1e-3 * (1 - 1e-6 * torch.randint(0, 4, (n,), generator=g))
    if kind == "few-values":
        return torch.randint(-3, 4, (n,), generator=g).float()
    if kind == "zeros":
        return torch.where(x > 1.0, x, 0.0)
    return x


@pytest.mark.parametrize("kind", ["normal", "equal", "adam-first-step", "few-values", "zeros"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 1000, 5000])
def test_topk_mask_keeps_what_magnitude_mask_keeps(kind, density, n) -> None:
    x = _magnitudes(kind, n)
    mask = triton_select.topk_mask(x.to(DEVICE), density).cpu()
    assert torch.equal(mask, magnitude_mask(x, density))


# -- OnDARE's mask -----------------------------------------------------------------------------


def dare_mask(n: int, key: int, density: float, offset: int = 0) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.int8, device=DEVICE)
    tk.dare_mask_kernel[tk.grid(n)](out, n, offset, key, density, BLOCK=tk.BLOCK)
    return out.bool().cpu()


def test_dare_mask_is_bernoulli_and_independent_of_sharding() -> None:
    n, p = 200_000, 0.01
    mask = dare_mask(n, key_seed(0, "update", 1, "w"), p)
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(mask.sum()) - n * p) < 5 * sigma
    gaps = torch.diff(torch.nonzero(mask).flatten()).float()
    assert abs(float(gaps.mean()) - 1 / p) < 0.1 / p  # geometric gaps: no clumping
    assert not torch.equal(mask, dare_mask(n, key_seed(0, "update", 2, "w"), p))
    assert not torch.equal(mask, dare_mask(n, key_seed(0, "update", 1, "v"), p))
    cut = 70_001  # two "ranks" holding [0, cut) and [cut, n)
    halves = [dare_mask(cut, key_seed(0, "update", 1, "w"), p)]
    halves.append(dare_mask(n - cut, key_seed(0, "update", 1, "w"), p, offset=cut))
    assert torch.equal(torch.cat(halves), mask)


def test_dare_step_applies_exactly_its_mask() -> None:
    params = make_params()
    before = {n: p.detach().clone().cpu() for n, p in params.items()}
    p = 0.3
    opt = optimizer(params, "triton", method="dare", reserve_p=p, alpha=0.0, weight_decay=0.0)
    grads = grad_sequence(1)
    after = run(opt, params, grads)
    for name, g in grads[0].items():
        mask = dare_mask(g.numel(), key_seed(3, "update", 1, name), p).view(g.shape)
        m, v = (1 - 0.9) * g, (1 - 0.999) * g * g
        update = adam_direction(m, v, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=0.1)
        expected = before[name] + torch.where(mask, update / p, 0.0)
        assert torch.equal(after[name] != before[name], mask), name
        torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7)


class CountedLaunches:
    """A kernel whose launches (``kernel[grid](...)``) are counted in ``counts[name]``."""

    def __init__(self, kernel, name, counts) -> None:
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16-master"])
def test_dare_steps_every_tensor_in_one_launch_with_its_mask_and_sparse_tau(
    dtype, monkeypatch
) -> None:
    """Three tensors, one launch of the OnDARE kernel and one for their sparse ``T``s; each
    tensor changes by its own mask's share of the update plus ``α·T``."""
    from omotool.optim.functional import MergeOptions, reference_tensor

    counts: dict[str, int] = {}
    for name in ("dare_adamw_many_kernel", "dare_tau_many_kernel"):
        monkeypatch.setattr(tk, name, CountedLaunches(getattr(tk, name), name, counts))
    params = make_params(dtype=dtype)
    before = {n: p.detach().float().cpu().clone() for n, p in params.items()}
    p, alpha = 0.3, 0.2
    opt = optimizer(params, "triton", method="dare", reserve_p=p, alpha=alpha, weight_decay=0.0)
    grads = grad_sequence(1)
    after = run(opt, params, grads)
    assert counts == {"dare_adamw_many_kernel": 1, "dare_tau_many_kernel": 1}
    options = MergeOptions(method="dare", reserve_p=p, alpha=alpha, seed=3)
    for name, g in grads[0].items():
        g = g.to(dtype).float()  # the gradient as the parameter's dtype holds it
        mask = dare_mask(g.numel(), key_seed(3, "update", 1, name), p).view(g.shape)
        m, v = (1 - 0.9) * g, (1 - 0.999) * g * g
        update = adam_direction(m, v, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=0.1)
        tau = reference_tensor(make_tau()[name], name, options)
        assert 0 < int((tau != 0).sum()) < tau.numel() // 2, name  # a sparse T
        expected = before[name] + (1 - alpha) * torch.where(mask, update / p, 0.0) + alpha * tau
        if dtype == torch.float32:
            torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7)
        else:  # the bf16 parameter: the float32 master's value, rounded
            torch.testing.assert_close(after[name], expected.to(dtype).float(), rtol=0, atol=2**-6)


TIES_KERNELS = (
    "ties_adam_many_kernel", "radix_histogram_many_kernel", "radix_pick_many_kernel",
    "tie_count_many_kernel", "ties_merge_many_kernel", "ties_tau_many_kernel",
)  # fmt: skip


def test_the_ties_table_has_a_name_for_every_column() -> None:
    assert len(triton_backend.TIES_FIELDS) == tk.TIES_COLUMNS.value


def test_the_kernels_read_every_table_at_the_hosts_columns() -> None:
    """The kernels' column constants come from the field lists the host builds rows from;
    the shared Adam pass reads the leading columns of both the OnDARE and the OnTIES rows."""
    from omotool.optim import triton_tables as tables

    for fields, width in [
        (tables.DARE_FIELDS, tk.DARE_COLUMNS), (tables.DARE_TAU_FIELDS, tk.DARE_TAU_COLUMNS),
        (tables.TIES_FIELDS, tk.TIES_COLUMNS), (tables.PARTIAL_FIELDS, tk.PARTIAL_COLUMNS),
    ]:  # fmt: skip
        assert width.value == len(fields) == len(set(fields))
    for name, column in [("grad", tk.COL_GRAD), ("n", tk.COL_N), ("step", tk.COL_STEP)]:
        assert column.value == tables.DARE_FIELDS.index(name) == tables.TIES_FIELDS.index(name)
    assert tk.DARE_KEY.value == tables.DARE_FIELDS.index("key")
    assert tk.TIES_K.value == tables.TIES_FIELDS.index("k")
    assert tk.DT_FIRST.value == tables.DARE_TAU_FIELDS.index("tau_first")
    assert tables.table_row(tables.DARE_TAU_FIELDS, {"tau_count": 5}) == [0, 0, 0, 0, 5, 0]
    with pytest.raises(KeyError, match="no such column: count"):
        tables.table_row(tables.DARE_TAU_FIELDS, {"count": 5})


@pytest.mark.parametrize("small", [3, 12])
def test_ties_launches_do_not_grow_with_the_tensors(small, monkeypatch) -> None:
    """One large tensor and ``small`` small ones: two batches (the small ones fit together in
    one largest tensor of scratch), the same launches for 3 or 12 small tensors, and the
    steps of the reference backend."""
    shapes = {"embed.weight": (50, 12)} | {f"layers.{i}.weight": (5, 8) for i in range(small)}
    generator = torch.Generator().manual_seed(0)
    initial = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    tau = {n: 0.05 * torch.randn(s, generator=generator) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=generator) for n, s in shapes.items()} for _ in "ab"]
    counts: dict[str, int] = {}
    for name in TIES_KERNELS:
        monkeypatch.setattr(tk, name, CountedLaunches(getattr(tk, name), name, counts))
    results = {}
    for backend in ("reference", "triton"):
        params = {n: x.clone().to(DEVICE).requires_grad_() for n, x in initial.items()}
        if backend == "reference":
            params = {n: p.detach().cpu().requires_grad_() for n, p in params.items()}
        opt = OnlineMergingAdamW(
            params.items(), tau, backend=backend, method="ties", reserve_p=0.2, alpha=0.3,
            lr=1e-2, eps=0.1,
        )  # fmt: skip
        results[backend] = run(opt, params, grads)
    for name in initial:
        torch.testing.assert_close(results["triton"][name], results["reference"][name])
    per_step = {"ties_adam_many_kernel": 2, "radix_histogram_many_kernel": 4,
                "radix_pick_many_kernel": 6, "tie_count_many_kernel": 2,
                "ties_merge_many_kernel": 2, "ties_tau_many_kernel": 2}  # fmt: skip
    assert counts == {name: 2 * count for name, count in per_step.items()}  # two steps


# -- whole steps against the reference backend -----------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16-master"])
def test_steps_match_the_reference_backend(case, dtype) -> None:
    grads = grad_sequence(6)
    grads[3]["layer.weight"][1, 2] = float("nan")  # a skipped step
    results = {}
    for backend in ("reference", "triton"):
        params = make_params(dtype=dtype)
        if backend == "reference":
            params = {n: p.detach().cpu().requires_grad_() for n, p in params.items()}
        opt = optimizer(params, backend, **CASES[case])
        stats: list[dict[str, float]] = []
        results[backend] = (run(opt, params, grads, stats), stats, opt)
    (ref, ref_stats, _), (ours, our_stats, our_opt) = results["reference"], results["triton"]
    assert our_opt.resolved_backend == "triton" and our_opt.skipped_steps == 1
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        for a, b in zip(our_stats, ref_stats, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key


def test_resume_is_bit_exact() -> None:
    grads = grad_sequence(6)
    options = dict(method="ties", reserve_p=0.2, alpha=0.3)
    straight = make_params()
    run(optimizer(straight, "triton", **options), straight, grads)
    first = make_params()
    opt = optimizer(first, "triton", **options)
    run(opt, first, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    resumed = {n: p.detach().clone().requires_grad_() for n, p in first.items()}
    opt = optimizer(resumed, "triton", **options)
    opt.load_state_dict(saved)
    run(opt, resumed, grads[4:])
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)


def test_memory_beyond_the_moments_is_reported() -> None:
    params = make_params(dtype=torch.bfloat16)
    opt = optimizer(params, "triton", method="ties", reserve_p=0.01, alpha=0.3)
    run(opt, params, grad_sequence(1))
    report = opt.memory_report()
    largest = max(p.numel() for p in params.values())
    workspace = sum(v for k, v in report.items() if k.startswith("workspace_") and "per" not in k)
    assert report["workspace_update_bytes"] == 4 * largest  # one largest tensor of scratch
    # 4096 int32 counts per tensor of the largest batch: [embed], [layer.weight, layer.bias]
    histogram = report["workspace_radix_histogram_bytes"]
    assert histogram == 2 * 4 * triton_select.RADIX_BINS
    per_program = workspace - report["workspace_update_bytes"] - histogram
    assert per_program < 0.05 * report["parameters"] + 256  # partial sums, tie counts
    assert report["total_bytes"] == pytest.approx(
        report["moments_bytes"] + report["steps_bytes"] + report["master_bytes"]
        + report["task_vector_bytes"] + workspace
    )  # fmt: skip


# -- choosing and refusing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(method="ties", online_step=2), "step-K"),
        (dict(method="dare", rescale="l1"), "rescale='l1'"),
    ],
)
def test_what_it_does_not_do_is_refused_by_name(options, named) -> None:
    params = make_params()
    opt = optimizer(params, "triton", **options)
    with pytest.raises(UsageError, match=named):
        run(opt, params, grad_sequence(1))


def test_cpu_tensors_need_the_interpreter(monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA parameters are used here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params = make_params()
    opt = optimizer(params, "triton", method="dare")
    with pytest.raises(UsageError, match="TRITON_INTERPRET"):
        run(opt, params, grad_sequence(1))


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(UsageError, match="backend"):
        optimizer(make_params(), "tpu")


def test_auto_takes_the_cpu_kernels_for_cpu_tensors() -> None:
    params = {n: p.detach().cpu().requires_grad_() for n, p in make_params().items()}
    assert optimizer(params, "auto").resolved_backend == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [c for c in CASES if c != "none"])
def test_cuda_triton_step_has_no_host_sync(case) -> None:
    params = make_params(dtype=torch.bfloat16)
    assert optimizer(params, "auto", **CASES[case]).resolved_backend == "torch"  # until checked
    opt = optimizer(params, "triton", **CASES[case])
    assert opt.resolved_backend == "triton"
    grads = grad_sequence(4)
    grads[2]["layer.bias"][0] = float("inf")
    run(opt, params, grads[:1])  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(opt, params, grads[1:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 1
