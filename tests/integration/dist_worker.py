"""Trains a tiny Llama with OnlineMergingAdamW in one process, or under torchrun (DDP / FSDP2).

    python tests/integration/dist_worker.py single OUT_DIR
    torchrun --nproc_per_node 2 tests/integration/dist_worker.py ddp OUT_DIR
    torchrun --nproc_per_node 2 tests/integration/dist_worker.py fsdp OUT_DIR

Every mode sees the same global batches (each of 2 ranks gets half of each batch), so the runs
must end at the same parameters; each writes ``OUT_DIR/{method}-{mode}-rank{r}.safetensors``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from omotool.optim import OnlineMergingAdamW, kernels
from omotool.optim.distributed import local_tensors
from omotool.tiny_models import model_config

STEPS, BATCH, LENGTH = 4, 4, 16
METHODS = (
    "dare", "ties", "dare+sync_free", "ties+sync_free", "dare+triton", "ties+triton",
    "dare+norm", "ties+sync_free+norm",
)  # fmt: skip


def build_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("llama", hidden_size=32, layers=2))


def task_vector(model):
    generator = torch.Generator().manual_seed(1)
    return {
        n: 0.01 * torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()
    }


def batches(rank: int, world: int):
    generator = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        ids = torch.randint(0, 320, (BATCH, LENGTH), generator=generator)
        share = BATCH // world
        yield ids[rank * share : (rank + 1) * share]


def no_gradient_read(tensors):
    raise AssertionError("the optimizer read the gradients for its NaN check")


def train(mode: str, method: str, rank: int, world: int):
    """``method``: ``dare`` or ``ties``; ``+sync_free`` for the ``torch`` backend (the path a
    GPU takes without Triton), ``+triton`` for the Triton kernels (in Triton's interpreter);
    ``+norm``: each step is handed ``clip_grad_norm_``'s total norm (a DTensor under FSDP2),
    as the transformers Trainer does."""
    method, *flags = method.split("+")
    path = next((flag for flag in flags if flag != "norm"), "")
    model = build_model()
    tau = task_vector(model)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        named = model.module.named_parameters()
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        named = list(model.named_parameters())
        assert all(local_tensors(p)[2] is not None for _, p in named), "not sharded"
    else:
        named = model.named_parameters()
    # eps well above |g| keeps |Δθ| of the first steps apart: at eps = 1e-8 Adam's first update
    # is ±lr almost everywhere and the TIES top-k would hinge on last-bit rounding of the
    # batch-split gradients.
    opt = OnlineMergingAdamW(
        named,
        tau,
        method=method,
        reserve_p=0.1,
        alpha=0.01,
        lr=1e-2,
        eps=0.1,
        seed=3,
        backend={"sync_free": "torch", "triton": "triton"}.get(path, "auto"),
    )
    reads_gradients = kernels.all_finite
    if "norm" in flags and not path:  # the cpu backend must take the norm, not read gradients
        kernels.all_finite = no_gradient_read
    for ids in batches(rank, world):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if "norm" in flags:  # max_norm inf: the gradients are left as they are
            opt.note_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        opt.step()
    kernels.all_finite = reads_gradients
    module = model.module if mode == "ddp" else model
    state = {}
    for name, param in module.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name.replace("_fsdp_wrapped_module.", "")] = full.detach().contiguous().clone()
    return state


def check_sharded_topk(rank: int, world: int, out: Path) -> None:
    """Sharded top-k with ties spanning the shard boundary equals the whole-tensor top-k."""
    from omotool.merging import magnitude_mask
    from omotool.optim.distributed import Shard, sharded_magnitude_mask

    rows = 7  # uneven shards: torch.chunk gives 4 rows and 3 rows
    whole = torch.tensor([float(i % 5) for i in range(rows * 6)]).view(rows, 6)
    whole[3:5] = 4.0  # a run of ties on both sides of the boundary
    chunk = -(-rows // world)
    start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    shard = Shard(numel=whole.numel(), offset=start * 6, group=dist.group.WORLD)
    for density in (0.1, 0.25, 0.5, 0.9):
        local = sharded_magnitude_mask(whole[start:stop], density, shard)
        assert torch.equal(local, magnitude_mask(whole, density)[start:stop]), density
    (out / f"topk-rank{rank}.ok").write_text("ok")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    distributed = mode in ("ddp", "fsdp")
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(1)
    for method in METHODS:
        state = train(mode, method, rank, world)
        save_file(state, str(out / f"{method}-{mode}-rank{rank}.safetensors"))
    if mode == "fsdp":
        check_sharded_topk(rank, world, out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
        # All results are on disk. A fraction of CPU/gloo FSDP runs abort in torch's own
        # interpreter teardown ("terminate called without an active exception"), after the
        # work is done: leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
