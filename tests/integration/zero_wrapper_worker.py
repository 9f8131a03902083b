"""``OnlineMerging`` (the wrapper around any optimizer) on DeepSpeed ZeRO partitions against the
same wrapper unsharded.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/integration/zero_wrapper_worker.py

As ``zero_merging_worker.py`` does for ``OnlineMergingAdamW`` (the same tiny model, the same
gradients on both sides, every run of every flat partition compared after each step), with
SGD with momentum inside: elementwise, so the flat partitions step as the whole parameters do.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

from omotool.optim import OnlineMerging
from omotool.optim.zero_runs import zero_runs

sys.path.insert(0, os.path.dirname(__file__))
from zero_merging_worker import named, steps_compared  # noqa: E402
from zero_runs_worker import TinyModel  # noqa: E402

MERGING = dict(reserve_p=0.3, alpha=0.3, tau_clip=None, seed=5)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(named(model), lr=0.05, momentum=0.9, weight_decay=0.01)


def check(stage: int, method: str) -> None:
    import deepspeed

    label = f"OnlineMerging(SGD) ZeRO-{stage} {method}"
    torch.manual_seed(0)
    model = TinyModel()
    plain = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    tau = {n: torch.randn(p.shape, generator=generator) * 0.05 for n, p in named(model)}
    unsharded = OnlineMerging(sgd(plain), tau, method=method, **MERGING)
    optimizer = OnlineMerging(sgd(model), tau, method=method, **MERGING)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "sub_group_size": 40},  # ZeRO-3: 4 sub-groups
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    runs = zero_runs(engine, engine.module.named_parameters())
    optimizer.attach_zero_runs(runs)
    assert any(len(layout.ranks) > 1 for layout in runs.params.values()), label
    for _ in steps_compared(engine, plain, unsharded, runs, label):
        pass
    assert 0 < unsharded.stats()["merge/kept_fraction"] < 1, label  # the merge ran
    engine.destroy()


def main() -> None:
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for stage, method in ((2, "ties"), (3, "ties"), (2, "dare")):
        check(stage, method)
    dist.barrier()
    if dist.get_rank() == 0:
        print("zero wrapper: all equal", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
