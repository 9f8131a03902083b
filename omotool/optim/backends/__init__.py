"""The backends of ``OnlineMergingAdamW``: one ``Backend.step`` over ``TensorStep`` records
(``base``), registered by name in ``BACKENDS``: ``reference`` (the spec), ``cpu`` (fused AdamW
plus numba kernels), ``torch`` (sync-free tensor ops, any device), ``triton`` (fused kernels).
"""

from omotool.optim.backends.base import BACKENDS, Backend, TensorStep, resolve_backend

# Imported to register, in the order they are listed (reference first: the spec).
# isort: off
from omotool.optim.backends import reference, cpu, sync_free, triton  # noqa: F401, E402
# isort: on

__all__ = ["BACKENDS", "Backend", "TensorStep", "resolve_backend"]
