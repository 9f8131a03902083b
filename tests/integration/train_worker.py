"""Run ``run_training`` from a JSON config in a process of its own (killed by the tests)."""

import json
import sys

from omotool.train.runner import TrainConfig, run_training

if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        result = run_training(TrainConfig(**json.load(handle)))
    print(json.dumps({"steps": result.steps, "interrupted": result.interrupted}), flush=True)
