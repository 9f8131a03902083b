"""The contract every backend of ``OnlineMergingAdamW`` keeps: one per-tensor record
(``TensorStep``), one ``Backend.step``, and the registry of backends by name.

The optimizer resolves its backend once (``resolve_backend``: by name, ``auto`` by the
parameters' devices, as ``torch.optim`` picks its fused/foreach paths), counts the step, and
hands the backend every parameter with a gradient. A backend refuses at construction, by
name, an option or a device it cannot do; after that its ``step`` runs any step it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from omotool.errors import UsageError
from omotool.optim.distributed import Shard
from omotool.optim.functional import MergeOptions, StepStats, Workspace
from omotool.optim.task_vector import FlatDelta
from omotool.registry import Registry


@dataclass
class TensorStep:
    """One parameter's part of a step: its tensors, state and settings."""

    name: str
    local: torch.Tensor  # the parameter (this rank's shard)
    work: torch.Tensor  # its float32 working copy: itself, its master, or a float32 copy
    grad: torch.Tensor
    shard: Shard | None
    reference: FlatDelta | None  # T, or None (no merging for this tensor)
    state: dict[str, Any]  # step (device, counts this step unless skipped), moments, cache
    adam: dict[str, float]  # lr, beta1, beta2, eps, weight_decay
    options: MergeOptions  # the optimizer's, or plain AdamW where this tensor has no T

    @property
    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state["exp_avg"], self.state["exp_avg_sq"]

    @property
    def step(self) -> torch.Tensor:
        """The step count on the parameter's device (float32, as torch keeps it)."""
        return self.state["step"]

    @property
    def host_step(self) -> int:
        """The step count on the host, skipped steps included (sync-free backends: it keys
        the masks and step-K's phase)."""
        return self.state["host_step"]

    @property
    def cache(self) -> torch.Tensor | None:
        """Step-K's cached plain updates (``None`` when K = 1 or no merging)."""
        return self.state.get("cache")

    @property
    def low(self) -> torch.Tensor | None:
        """The bf16/fp16 parameter that kernels write along with ``work``, or None when the
        parameter is ``work`` itself."""
        return self.local if self.work is not self.local else None

    def write_back(self) -> None:
        """Copy the working copy into the parameter when they differ (bf16/fp16)."""
        if self.low is not None:
            self.low.copy_(self.work)


Keep = torch.Tensor | None
"""A step's ``keep``: ``None`` (applied), or a 0-d bool on the device, false to change nothing."""


class Backend(ABC):
    """How a step is computed. ``step`` changes parameters, moments and caches of the given
    tensors, and adds to ``stats``; the step count is already advanced.

    Class attributes: ``name`` (as registered), ``sync_free`` (the step never reads a device
    value on the host: a skipped step is decided on the device and given as ``keep``; else
    the optimizer checks gradients on the host and only calls ``step`` for finite ones),
    ``rules`` (the merging methods it implements, by ``MERGE_RULES`` name).
    """

    name: ClassVar[str]
    sync_free: ClassVar[bool] = False
    rules: ClassVar[Collection[str]]

    def __init__(self, options: MergeOptions, devices: Collection[torch.device]) -> None:
        if options.merges and options.method not in self.rules:
            raise UsageError(
                f"backend={self.name!r} does not implement method={options.method!r} "
                f"(it does {', '.join(self.rules)}); use backend='auto'."
            )
        self.options = options

    @abstractmethod
    def step(
        self, tensors: list[TensorStep], *, keep: Keep, stats: StepStats, workspace: Workspace
    ) -> None:
        """One step of ``tensors``. ``keep``: ``None`` (the step is applied), or for a
        ``sync_free`` backend a 0-d bool on the device, false when the step is to change
        nothing (non-finite gradients). ``workspace``: scratch buffers kept across steps."""


BACKENDS: Registry[type[Backend]] = Registry("optimizer backend")


def register(name: str, help: str = "") -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: the backend, registered as ``name``."""

    def add(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        return BACKENDS.register(name, help=help)(cls)

    return add


def resolve_backend(name: str, options: MergeOptions, devices: Collection[torch.device]) -> Backend:
    """The backend ``name`` for parameters on ``devices``; ``auto``: ``cpu`` when every
    parameter is on the CPU, else ``torch`` (``triton`` only on request until its kernels
    have been compiled and checked on a GPU: ``scripts/gpu-check.sh``)."""
    if name == "auto":
        name = "cpu" if all(device.type == "cpu" for device in devices) else "torch"
    return BACKENDS.get(name)(options, devices)


def by_hyper_parameters(tensors: list[TensorStep]) -> Mapping[tuple, list[TensorStep]]:
    """``tensors`` grouped by their Adam settings (one param group's), in order."""
    groups: dict[tuple, list[TensorStep]] = {}
    for t in tensors:
        groups.setdefault(tuple(t.adam.items()), []).append(t)
    return groups
