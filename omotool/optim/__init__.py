"""Online-merging optimizers (Lu et al. 2024): OnDARE and OnTIES AdamW, step-K.

``OnlineMergingAdamW`` is the optimizer, ``OnlineMerging`` wraps any other one, ``TaskVector``
is the SFT delta they merge with; ``omotool.optim.functional`` holds the math and
``omotool.optim.options`` declares the merge options. Names are imported on first use, so
that the declaration (read by ``omotool train --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omotool.optim.functional import MergeOptions, StepStats
    from omotool.optim.gradients import NonFiniteGradientError
    from omotool.optim.online_merging import OnlineMergingAdamW
    from omotool.optim.task_vector import FlatDelta, TaskVector
    from omotool.optim.wrapper import OnlineMerging

_EXPORTS = {
    "FlatDelta": "omotool.optim.task_vector",
    "MergeOptions": "omotool.optim.functional",
    "NonFiniteGradientError": "omotool.optim.gradients",
    "OnlineMerging": "omotool.optim.wrapper",
    "OnlineMergingAdamW": "omotool.optim.online_merging",
    "StepStats": "omotool.optim.functional",
    "TaskVector": "omotool.optim.task_vector",
}

__all__ = [
    "FlatDelta",
    "MergeOptions",
    "NonFiniteGradientError",
    "OnlineMerging",
    "OnlineMergingAdamW",
    "StepStats",
    "TaskVector",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omotool.optim' has no attribute {name!r}")
