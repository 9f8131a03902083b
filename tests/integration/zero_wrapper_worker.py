"""``OnlineMerging`` (the wrapper around any optimizer) on DeepSpeed ZeRO partitions against the
same wrapper unsharded.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/integration/zero_wrapper_worker.py

As ``zero_merging_worker.py`` does for ``OnlineMergingAdamW`` (the same tiny model, the same
gradients on both sides, every run of every flat partition compared after each step), with
SGD with momentum inside: elementwise, so the flat partitions step as the whole parameters do.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from omotool.optim import OnlineMerging

sys.path.insert(0, os.path.dirname(__file__))
from zero_merging_worker import named, sharded, steps_compared, tiny_model_pair  # noqa: E402

MERGING = dict(reserve_p=0.3, alpha=0.3, tau_clip=None, seed=5)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(named(model), lr=0.05, momentum=0.9, weight_decay=0.01)


def check(stage: int, method: str) -> None:
    label = f"OnlineMerging(SGD) ZeRO-{stage} {method}"
    model, plain, tau = tiny_model_pair()
    unsharded = OnlineMerging(sgd(plain), tau, method=method, **MERGING)
    optimizer = OnlineMerging(sgd(model), tau, method=method, **MERGING)
    engine, runs = sharded(model, optimizer, stage)
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
