"""omotool: online merging optimizers for RLHF (Lu et al. 2024), as a library and a CLI.

The data path is ``delta`` (SFT task vector) → ``train`` (online merging optimizer) →
``merge-offline`` (offline baselines) → ``eval``. Everything the CLI does is reachable from
here; names are imported on first use so that ``import omotool`` (and ``omotool --help``)
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from omotool.errors import InputError, OmoError, OutputError, UsageError

__version__ = "0.1.0"

_EXPORTS = {
    "DeltaConfig": "omotool.delta",
    "DeltaSummary": "omotool.delta",
    "compute_delta": "omotool.delta",
    "ModelReader": "omotool.io",
    "ModelWriter": "omotool.io",
    "fingerprint": "omotool.io",
    "MergeConfig": "omotool.merge_offline",
    "run_merge": "omotool.merge_offline",
    "OnlineMergingAdamW": "omotool.optim",
    "OnlineMerging": "omotool.optim",
    "TaskVector": "omotool.optim",
}

__all__ = ["__version__", "OmoError", "InputError", "OutputError", "UsageError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omotool' has no attribute {name!r}")
