"""RLHF training with online merging: data checking, algorithms, and the glue to TRL."""

from omotool.train.runner import (
    TrainConfig,
    TrainResult,
    online_merging_trainer,
    run_training,
)

__all__ = ["TrainConfig", "TrainResult", "online_merging_trainer", "run_training"]
