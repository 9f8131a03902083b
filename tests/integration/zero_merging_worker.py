"""OnlineMergingAdamW on DeepSpeed ZeRO partitions against the same optimizer unsharded.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/integration/zero_merging_worker.py

(With 3 processes: OnTIES under ZeRO-2 only, where a rank holds nothing of a parameter the two
others share and takes part in its top-k with an empty piece.)

Each rank trains a tiny model under ZeRO-2 and ZeRO-3 (fp32, gloo) and, in the same process, a
copy of it without DeepSpeed; both see the same gradients (every rank takes the same batch, so
DeepSpeed's average over the ranks is the gradient itself: (g/2 + g/2) is exact). After each
step every run of every flat partition must hold the unsharded parameter's elements
``[start, start + length)``, and under ZeRO-2 the kept counts summed over the ranks must be the
unsharded ones. With the ``cpu`` backend under ZeRO-3, one ``step()`` makes a fixed number of
collectives however many shared parameters it steps. The process stops (non-zero exit) at the
first difference.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from omotool.optim import OnlineMergingAdamW
from omotool.optim.zero_runs import run_views, zero_runs

sys.path.insert(0, os.path.dirname(__file__))
from zero_runs_worker import TinyModel  # noqa: E402

STEPS = 3
# eps well above float32's resolution of |g|: Adam's first update is then not ±lr almost
# everywhere, so that OnTIES's top-k has no near-ties that a last-bit difference could reorder.
SETTINGS = dict(
    reserve_p=0.3, alpha=0.3, lr=1e-2, eps=1e-3, weight_decay=0.01, tau_clip=None, seed=5
)
# Float32 tolerance: both sides run the same elementwise operations on the same values, but a
# vectorised kernel (fused AdamW, numba) may round a run's elements differently from the
# whole tensor's where the run starts at another alignment (a last-bit difference per step).
TOLERANCE = dict(rtol=1e-6, atol=1e-7)


def named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def counting_collectives(optimizer: OnlineMergingAdamW, calls: list[int]) -> None:
    """Append to ``calls``, per ``optimizer.step()``, how many all-reduces and all-gathers it
    made (DeepSpeed's own collectives run outside it)."""
    inner = optimizer.step

    def step(*args, **kwargs):
        calls.append(0)
        originals = dist.all_reduce, dist.all_gather

        def counted(collective):
            def call(*a, **k):
                calls[-1] += 1
                return collective(*a, **k)

            return call

        dist.all_reduce, dist.all_gather = (counted(c) for c in originals)
        try:
            return inner(*args, **kwargs)
        finally:
            dist.all_reduce, dist.all_gather = originals

    optimizer.step = step


def tiny_model_pair() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """``(model, an unsharded copy, a task vector for it)``, the same on every rank."""
    torch.manual_seed(0)
    model = TinyModel()
    generator = torch.Generator().manual_seed(1)
    tau = {n: torch.randn(p.shape, generator=generator) * 0.05 for n, p in named(model)}
    return model, copy.deepcopy(model), tau


def sharded(
    model: torch.nn.Module, optimizer: Any, stage: int, sub_group_size: int = 40
) -> tuple[Any, Any]:
    """``(engine, runs)``: ``model`` and ``optimizer`` under ``deepspeed.initialize`` at ZeRO
    ``stage`` (fp32, no clipping; ZeRO-3 sub-groups of ``sub_group_size`` elements, 40: four),
    the optimizer given its partitions' runs."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "sub_group_size": sub_group_size},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1; the copy is not clipped
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    runs = zero_runs(engine, engine.module.named_parameters())
    optimizer.attach_zero_runs(runs)
    return engine, runs


def check(
    stage: int,
    method: str,
    backend: str,
    online_step: int = 1,
    expect_empty_piece: bool = False,
    sub_group_size: int = 40,
    most_collectives: int | None = None,
    eps: float | None = None,
) -> None:
    """Train under ZeRO-``stage`` beside the unsharded copy (module docstring); with
    ``most_collectives``, no ``step()`` may make more collectives than that, however many
    shared parameters it steps (the shards' top-k is agreed for all of them at once). ``eps``:
    Adam's, where not ``SETTINGS``'; a tiny one makes the first update ``±lr`` at every entry
    with a gradient: the top-k is decided among exact ties, which go to the lowest indices
    across the ranks."""
    label = f"ZeRO-{stage} {method} {backend} K={online_step} sub-group {sub_group_size} {eps=}"
    model, plain, tau = tiny_model_pair()
    options = dict(
        task_vector=tau, method=method, backend=backend, online_step=online_step,
        **{**SETTINGS, **({} if eps is None else {"eps": eps})},
    )  # fmt: skip
    unsharded = OnlineMergingAdamW(named(plain), **options)
    optimizer = OnlineMergingAdamW(named(model), **options)
    engine, runs = sharded(model, optimizer, stage, sub_group_size)
    straddling = [n for n, layout in runs.params.items() if len(layout.ranks) > 1]
    assert straddling, f"{label}: no parameter straddles the ranks"
    calls: list[int] = []
    if most_collectives is not None:
        shared = [p for zero in optimizer._zero_flats.values() for p in zero.pieces if p.shard]
        # Per shared parameter (three collectives each, as before batching) would be more.
        assert 3 * len(shared) > most_collectives + 1, (label, len(shared))
        counting_collectives(optimizer, calls)
    if expect_empty_piece:  # this rank's part in the top-k of a parameter it does not hold
        pieces = [p for zero in optimizer._zero_flats.values() for p in zero.pieces]
        empty = torch.tensor([float(any(p.length == 0 and p.name for p in pieces))])
        dist.all_reduce(empty)
        assert empty.item() > 0, f"{label}: no rank takes part in a top-k with nothing held"
    for step in steps_compared(engine, plain, unsharded, runs, label):
        if (
            stage < 3 and (step + 1) % online_step == 0
        ):  # ZeRO-3 steps per sub-group: the last call's figures cover one only
            kept = torch.tensor([float(optimizer.last_stats.kept)])
            dist.all_reduce(kept)
            assert kept.item() == float(unsharded.last_stats.kept), (label, step, kept.item())
    if most_collectives is not None:
        assert calls and max(calls) <= most_collectives, (label, calls)
    engine.destroy()


def steps_compared(
    engine: Any, plain: torch.nn.Module, unsharded: torch.optim.Optimizer, runs: Any, label: str
) -> Iterator[int]:
    """``STEPS`` steps of ``engine`` and, on the same batch, of ``plain`` with ``unsharded``;
    after each, every run of every flat partition must hold the unsharded parameter's elements
    (to ``TOLERANCE``). Yields each step's index once it is checked."""
    for step in range(STEPS):
        ids = torch.randint(0, 11, (1, 4), generator=torch.Generator().manual_seed(step))
        engine.backward(engine(ids).square().mean())
        engine.step()
        plain(ids).square().mean().backward()
        unsharded.step()
        unsharded.zero_grad()
        whole = dict(plain.named_parameters())
        for flat, flat_runs in zip(runs.flats, runs.runs, strict=True):
            for run, view in run_views(flat, flat_runs):
                expected = whole[run.name].detach().reshape(-1)[run.start : run.start + run.length]
                torch.testing.assert_close(
                    view,
                    expected,
                    **TOLERANCE,
                    msg=lambda m, r=run, s=step: f"{label} {r}, step {s}: {m}",
                )
        yield step


def main() -> None:
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    if dist.get_world_size() > 2:  # some rank holds nothing of a parameter others share
        for backend in ("reference", "torch", "cpu"):
            check(2, "ties", backend, expect_empty_piece=True)
    else:
        for stage in (2, 3):
            for method in ("ties", "dare"):
                for backend in ("reference", "torch", "cpu"):
                    check(stage, method, backend)
        check(2, "ties", "torch", online_step=2)  # step-K: the cache, cut per run as the moments
        # One step() of every shared parameter: the finite check, then the top-k agreement
        # of all shards (the floors' all-reduce, two all-gathers); OnDARE needs none.
        check(3, "ties", "cpu", sub_group_size=10**9, most_collectives=4)
        check(3, "dare", "cpu", sub_group_size=10**9, most_collectives=1)
        # The top-k among exact ties (the first step's ±lr; with 2 ranks the averaged
        # gradient is exact, so the ties are exact on both sides).
        for stage in (2, 3):
            check(stage, "ties", "cpu", sub_group_size=10**9, eps=1e-30)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
