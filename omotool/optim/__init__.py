"""Online-merging optimizers (Lu et al. 2024): OnDARE and OnTIES AdamW, step-K.

``OnlineMergingAdamW`` is the optimizer, ``OnlineMerging`` wraps any other one, ``TaskVector``
is the SFT delta they merge with; ``omotool.optim.functional`` holds the math.
"""

from omotool.optim.functional import MergeOptions, StepStats
from omotool.optim.gradients import NonFiniteGradientError
from omotool.optim.online_merging import OnlineMergingAdamW
from omotool.optim.task_vector import FlatDelta, TaskVector
from omotool.optim.wrapper import OnlineMerging

__all__ = [
    "FlatDelta",
    "MergeOptions",
    "NonFiniteGradientError",
    "OnlineMerging",
    "OnlineMergingAdamW",
    "StepStats",
    "TaskVector",
]
