"""``run_training`` under torchrun: each rank also saves its own parameters at the end."""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from omotool.train.runner import TrainConfig, run_training


class SaveRankParameters(TrainerCallback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        named = {}
        for name, param in model.named_parameters():
            local = param.full_tensor() if hasattr(param, "full_tensor") else param
            named[name] = local.detach().clone()
        torch.save(named, self.folder / f"rank{rank}.pt")
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
        facts = {"world_size": args.world_size, "steps": state.global_step, "sharded": sharded}
        (self.folder / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        config = TrainConfig(**json.load(handle))
    folder = Path(sys.argv[2])
    run_training(config, callbacks=[SaveRankParameters(folder)])
    if int(os.environ.get("RANK", "0")) == 0:
        print("done", flush=True)
