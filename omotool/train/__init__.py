"""RLHF training with online merging: data checking, algorithms, and the glue to TRL."""

from omotool.train.runner import TrainConfig, TrainResult, run_training
from omotool.train.trainer import online_merging_trainer

__all__ = ["TrainConfig", "TrainResult", "online_merging_trainer", "run_training"]
