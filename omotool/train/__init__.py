"""RLHF training with online merging: data checking, algorithms, and the glue to TRL.

The names below are imported on first use, so that the command line can read the options'
declaration (``omotool.train.options``) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "omotool.train.arguments",
    "TrainResult": "omotool.train.runner",
    "run_training": "omotool.train.runner",
    "online_merging_trainer": "omotool.train.trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omotool.train' has no attribute {name!r}")
