"""``OnlineMerging``: online merging around any torch optimizer (SGD, Adafactor, RMSprop, ...).

``Δθ`` is what the inner optimizer would apply (its own momentum, scaling and weight decay
included): each step snapshots the parameters, lets the inner optimizer step, takes the
difference, restores the snapshot and applies the merged update
(``omotool.optim.functional.merge_update_``). The snapshot costs one float32 copy of the
parameters during the step.

Under DeepSpeed ZeRO-1/2/3 (``attach_zero_runs``, as ``OnlineMergingAdamW``'s) the inner
optimizer steps DeepSpeed's flat partitions and each run of a parameter in them is merged as
its part of the whole parameter (``optim.zero_merging``); the inner optimizer sees flat 1-D
tensors, so this is the unsharded run only for an elementwise one (SGD, AdamW, RMSprop, ...),
not for Adafactor's factored moments.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from omotool.errors import InputError, UsageError
from omotool.optim.distributed import local_tensors
from omotool.optim.functional import MergeContext, MergeOptions, StepStats, merge_update_
from omotool.optim.gradients import GivenGradNorm, closure_and_check
from omotool.optim.references import (
    merge_options_of,
    named_parameters,
    set_up_merging,
    takes_merge_options,
)
from omotool.optim.task_vector import TaskVector
from omotool.optim.zero_merging import Piece, ZeroFlat, set_up_zero_merging
from omotool.optim.zero_runs import ZeroRuns


class WrappedOptimizer(torch.optim.Optimizer):
    """An optimizer around ``self.optimizer`` (set by the subclass's ``__init__``, which does
    not call ``Optimizer.__init__``): ``torch.optim.Optimizer``'s attributes are the inner
    optimizer's, so learning-rate schedulers and checkpoints see its param groups."""

    optimizer: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise UsageError("add parameter groups to the inner optimizer before wrapping it.")


class OnlineMerging(GivenGradNorm, WrappedOptimizer):
    """Wraps ``optimizer`` (built on ``model.named_parameters()``) with online merging.

    The merge options (keyword arguments, declared in ``omotool.optim.options``) and
    ``nan_policy`` mean what they mean for ``OnlineMergingAdamW``. Learning-rate schedulers see
    the inner optimizer's param groups.
    """

    @takes_merge_options
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        task_vector: TaskVector | Mapping[str, torch.Tensor] | str | os.PathLike[str],
        *,
        nan_policy: str = "skip",
        **merge_options: Any,
    ) -> None:
        # No Optimizer.__init__: the inner optimizer owns the param groups and their state.
        self.optimizer = optimizer
        self.options = merge_options_of(self, merge_options)
        if any(
            local_tensors(param)[2] is not None
            for group in optimizer.param_groups
            for param in group["params"]
        ):
            raise UsageError(
                "OnlineMerging does not support sharded (FSDP) parameters; use "
                "OnlineMergingAdamW, or DDP."
            )
        self.nan_policy = nan_policy
        self.skipped_steps = 0
        self.last_stats = StepStats()
        self.merge_state: dict[str, dict[str, Any]] = {}
        self._zero_flats: dict[int, ZeroFlat] = {}  # by id(flat): set by attach_zero_runs
        self.references, self.task_vector_fingerprint = set_up_merging(
            optimizer.param_groups, task_vector, self.options, nan_policy
        )

    def __repr__(self) -> str:
        return f"OnlineMerging({self.options}, {self.optimizer!r})"

    def attach_zero_runs(self, runs: ZeroRuns) -> None:
        """Merge on DeepSpeed ZeRO-1/2/3 flat partitions as ``runs`` describes them
        (``optim.zero_runs.zero_runs(engine, model.named_parameters())`` after
        ``deepspeed.initialize``), as ``OnlineMergingAdamW.attach_zero_runs`` does: each run of
        a flat tensor's update ``Δθ`` is merged as its part of the whole parameter; elements of
        no run keep the inner optimizer's step. The merge step count is the flat tensor's."""
        self._zero_flats, self.references, group = set_up_zero_merging(
            runs, self.references, self.options, backend="torch"
        )
        for param_group in self.param_groups:
            param_group.pop("param_names", None)
        self.agreement_groups = (group,)

    def _merging(self) -> list[tuple[str, torch.Tensor, tuple[Piece, ...]]]:
        """``(state key, tensor, its merging pieces)`` of every tensor with a gradient that
        merges: a whole parameter is one piece; a ZeRO flat tensor its runs' (by position,
        stable over a resume, the key)."""
        if not self._zero_flats:
            return [
                (name, param, (Piece(name, 0, param.numel(), None, self.references[name]),))
                for name, param in named_parameters(self.param_groups)
                if param.grad is not None and name in self.references
            ]
        merging = []
        for index, zero in enumerate(self._zero_flats.values()):
            pieces = tuple(piece for piece in zero.pieces if piece.reference is not None)
            if zero.flat.grad is not None and pieces and self._holds(zero.flat):
                merging.append((f"zero-flat-{index}", zero.flat, pieces))
        return merging

    def _holds(self, flat: torch.Tensor) -> bool:
        """Whether ``flat`` is in the groups this step (DeepSpeed steps one group at a time)."""
        return any(param is flat for group in self.param_groups for param in group["params"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Inner step, then each updated parameter is rolled back and given the merged update."""
        loss, finite = closure_and_check(self, closure)
        if not finite:
            return loss
        merging = self._merging()
        before = {key: param.detach().to(torch.float32, copy=True) for key, param, _ in merging}
        self.optimizer.step()
        stats = StepStats()
        for key, param, pieces in merging:
            work = before[key]
            update = param.detach().float() - work
            state = self.merge_state.setdefault(key, {"step": 0})
            state["step"] += 1
            if self.options.online_step > 1 and "cache" not in state:
                state["cache"] = torch.zeros_like(work)
            for piece in pieces:
                cut = _cutter(piece, flat=bool(self._zero_flats))
                merged = cut(work)
                merge_update_(
                    merged,
                    lambda index, u=cut(update): u if index is None else u.reshape(-1)[index],
                    None if "cache" not in state else cut(state["cache"]),
                    piece.reference,
                    MergeContext(piece.name, state["step"], self.options, stats, piece.shard),
                )
                cut(param.detach()).copy_(merged)  # other elements keep the inner step
        if stats.merged:
            self.last_stats = stats
        return loss

    def stats(self) -> dict[str, float]:
        return self.last_stats.as_dict(self.skipped_steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.optimizer.state_dict(),
            "online_merging": {
                "options": dataclasses.asdict(self.options),
                "skipped_steps": self.skipped_steps,
                "task_vector_fingerprint": self.task_vector_fingerprint,
                "state": copy.deepcopy(self.merge_state),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict["online_merging"]
        if MergeOptions.from_saved(extra["options"], self.options) != self.options:
            raise InputError("the checkpoint was made with other merge options.")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.merge_state = copy.deepcopy(extra["state"])


def _cutter(piece: Piece, flat: bool) -> Any:
    """The view of a tensor that ``piece`` covers: a ZeRO ``flat`` tensor's elements
    ``[offset, offset + length)``, else the whole tensor (a whole parameter)."""
    if not flat:
        return lambda tensor: tensor
    return lambda tensor: tensor.reshape(-1).narrow(0, piece.offset, piece.length)
