"""Builds the runs of a tiny model under DeepSpeed ZeRO-1, 2 (also round-robin) and 3; checks them.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/integration/zero_runs_worker.py OUT_DIR

For each setup each rank writes ``OUT_DIR/{label}-rank{r}.json``: its runs per flat tensor and
the parameters' layouts, for the test to check the tiling across ranks. The checks that need
the live tensors run here and stop the process on failure:
- each run's flat view holds the parameter's values at ``[start, start + length)`` right after
  ``deepspeed.initialize``;
- runs built twice are identical (and name the same flat tensors);
- each ``step()`` of the client optimizer sees groups each holding one described flat tensor.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from omotool.optim.zero_runs import run_views, zero_runs

BF16 = {"bf16": {"enabled": True}}
# label -> (ZeRO stage, config entries): round-robin reordering changes the ZeRO-1/2 layout;
# bf16 under ZeRO-1 with fp32 gradient accumulation takes DeepSpeed's BF16_Optimizer instead.
SETUPS = {
    "stage1": (1, {}),
    "stage2": (2, {}),
    "stage2rr": (2, {"round_robin_gradients": True}),
    "stage3": (3, {}),
    "stage1bf16": (1, {**BF16, "data_types": {"grad_accum_dtype": "fp32"}}),
    "stage2bf16": (2, BF16),
    "stage3bf16": (3, BF16),
}


class TinyModel(torch.nn.Module):
    """Odd sizes (none a multiple of the partition alignment), so a parameter straddles ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.hidden = torch.nn.Linear(5, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.out = torch.nn.Linear(7, 3)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.out(self.norm(torch.tanh(self.hidden(self.embed(ids))))))


class RecordingSGD(torch.optim.Optimizer):
    """Plain SGD that records, per ``step()`` call, the tensors of each group it is handed."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})
        self.calls: list[list[list[torch.Tensor]]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.calls.append([list(group["params"]) for group in self.param_groups])
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups (weights, the rest), so there is more than one flat tensor per rank."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    weights = [p for n, p in trainable if n.endswith("weight") and p.dim() == 2]
    rest = [p for n, p in trainable if not (n.endswith("weight") and p.dim() == 2)]
    return [{"params": weights}, {"params": rest}]


def check_setup(label: str, out: Path) -> None:
    import deepspeed

    stage, entries = SETUPS[label]
    zero_entries = {k: v for k, v in entries.items() if k == "round_robin_gradients"}
    torch.manual_seed(0)
    model = TinyModel()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": stage,
            "sub_group_size": 40,  # several ZeRO-3 sub-groups
            **zero_entries,
        },
        "zero_allow_untested_optimizer": True,
        **{k: v for k, v in entries.items() if k not in zero_entries},
    }
    optimizer = RecordingSGD(param_groups(model))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    runs = zero_runs(engine, engine.module.named_parameters())
    assert runs.stage == stage, (runs.stage, stage)

    for flat, flat_runs in zip(runs.flats, runs.runs, strict=True):
        assert flat.dtype == torch.float32 and flat.dim() == 1
        for run, view in run_views(flat, flat_runs):
            whole = before[run.name].reshape(-1)
            if "bf16" in entries:  # the fp32 master copy of the bf16 parameter
                whole = whole.to(torch.bfloat16).float()
            expected = whole[run.start : run.start + run.length]
            assert torch.equal(view, expected), f"{label}: {run} holds other values"
            assert view.data_ptr() == flat[run.offset :].data_ptr(), "a copy, not a view"

    again = zero_runs(engine.optimizer, engine.module.named_parameters())
    assert again.runs == runs.runs and again.params == runs.params
    assert all(a is b for a, b in zip(again.flats, runs.flats, strict=True))

    ids = torch.tensor([[1, 4, 9]])
    loss = engine(ids).square().mean()
    engine.backward(loss)
    engine.step()
    assert optimizer.calls, "the client optimizer was never stepped"
    for call in optimizer.calls:
        handed = [tensors for tensors in call if tensors]
        assert all(len(tensors) == 1 for tensors in handed), f"{label}: one flat per group"
        for tensors in handed:
            runs.of(tensors[0])  # raises when not a described flat tensor

    record = {
        "stage": runs.stage,
        "rank": runs.rank,
        "world_size": runs.world_size,
        "flat_numels": [flat.numel() for flat in runs.flats],
        "runs": [[vars(run) for run in flat_runs] for flat_runs in runs.runs],
        "params": {name: vars(layout) for name, layout in runs.params.items()},
        "step_calls": [sum(1 for tensors in call if tensors) for call in optimizer.calls],
    }
    (out / f"{label}-rank{runs.rank}.json").write_text(json.dumps(record, indent=1))
    engine.destroy()


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    for label in SETUPS:
        check_setup(label, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
