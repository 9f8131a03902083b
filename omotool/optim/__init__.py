"""Online-merging optimizers (Lu et al. 2024): OnDARE and OnTIES AdamW, step-K.

``OnlineMergingAdamW`` is the optimizer; ``TaskVector`` is the SFT delta it merges with;
``omotool.optim.functional`` holds the math as pure functions.
"""

from omotool.optim.functional import MergeOptions, StepStats
from omotool.optim.online_merging import OnlineMergingAdamW
from omotool.optim.task_vector import FlatDelta, TaskVector

__all__ = ["FlatDelta", "MergeOptions", "OnlineMergingAdamW", "StepStats", "TaskVector"]
