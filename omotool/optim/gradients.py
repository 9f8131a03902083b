"""Whether a step's gradients are finite, decided once per step for all parameters (and all
ranks): from a norm the caller hands over (``GivenGradNorm.note_grad_norm``), on the host
(``gradients_finite``: the ``reference`` and ``cpu`` backends) or on the device
(``gradients_nonfinite``: the sync-free backends).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from omotool.errors import OmoError
from omotool.optim import kernels
from omotool.optim.distributed import any_rank, any_rank_on_device, local_tensors


class GivenGradNorm:
    """``note_grad_norm``: the caller hands the next ``step()`` the gradients' total norm.

    Mixed into the online-merging optimizers; their steps read it through
    ``closure_and_check`` (CPU) or ``gradients_nonfinite`` (devices).
    """

    # The norm and the gradients it was given for (``_gradient_versions``), or None.
    _given: tuple[torch.Tensor, list[tuple[int, int]]] | None = None
    param_groups: list[dict[str, Any]]
    # Process groups whose ranks skip a step together besides sharded parameters' (DeepSpeed
    # ZeRO's data-parallel group: each rank sees only its partition's gradients).
    agreement_groups: tuple[Any, ...] = ()

    def note_grad_norm(self, total_norm: torch.Tensor | float) -> None:
        """The total norm of the gradients the next ``step()`` applies, as the caller computed
        it: ``torch.nn.utils.clip_grad_norm_``'s result, which the transformers ``Trainer``
        computes before every optimizer step (``omotool train`` hands it over).

        NaN and ±inf propagate into a norm, so a finite norm proves every gradient finite
        and the step does not read the gradients for its own check (on CPU that read costs
        about 0.2 of a fused AdamW step). A non-finite norm makes the step skip (or raise,
        per ``nan_policy``) as a non-finite gradient does; a norm overflows only past
        float32's range, and clipping by such a norm leaves no usable gradient anyway. Only
        the next ``step()`` uses it, and not when that step is given a closure (which
        computes new gradients), nor when a gradient has been replaced or changed in place
        since (the step then reads the gradients itself). Call it right before ``step()``,
        after the last change to the gradients (clipping by a finite norm keeps them
        finite). With sharded parameters a DTensor norm's local part is used, and the
        verdict is still agreed across ranks. Never read on the host by the sync-free
        backends.
        """
        if not isinstance(total_norm, torch.Tensor):
            total_norm = torch.tensor(float(total_norm))
        self._given = (total_norm.detach(), self._gradient_versions())

    def _take_grad_norm(self, closure: Any) -> torch.Tensor | None:
        """The norm given for this step's gradients (None when none, when a closure
        recomputes them, or when they are not the ones it was given for), forgotten so that
        no later step uses it."""
        given, self._given = self._given, None
        if given is None or closure is not None or given[1] != self._gradient_versions():
            return None
        norm = given[0]
        to_local = getattr(norm, "to_local", None)  # a DTensor: this rank's part
        return to_local() if to_local is not None else norm

    def _gradient_versions(self) -> list[tuple[int, int]]:
        """Which gradient tensors there are and how often each was changed in place (the
        tensors' version counters): equal lists mean the same gradients, unchanged."""
        return [
            (id(p.grad), p.grad._version)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]


class NonFiniteGradientError(OmoError, FloatingPointError):
    """A NaN or inf gradient under ``nan_policy="raise"`` (no parameter was changed)."""


def closure_and_check(optimizer: GivenGradNorm, closure: Any) -> tuple[Any, bool]:
    """Run ``closure`` (with grad enabled); then ``(loss, gradients finite)``, from the norm
    the optimizer was given (``note_grad_norm``) or else by reading the gradients.

    A non-finite gradient raises under ``nan_policy="raise"``, else it is counted in
    ``optimizer.skipped_steps`` and the step must change nothing.
    """
    given = optimizer._take_grad_norm(closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if gradients_finite(optimizer.param_groups, given, optimizer.agreement_groups):
        return loss, True
    if optimizer.nan_policy == "raise":
        raise non_finite_error()
    optimizer.skipped_steps += 1
    return loss, False


def non_finite_error() -> NonFiniteGradientError:
    return NonFiniteGradientError(
        "a gradient holds NaN or inf values; no parameter was changed. Lower the learning "
        "rate or check the data, or use nan_policy='skip' to skip such steps."
    )


def gradients_nonfinite(
    param_groups: list[dict[str, Any]],
    given_norm: torch.Tensor | None = None,
    agreement_groups: tuple[Any, ...] = (),
) -> torch.Tensor | None:
    """Whether any gradient, on any rank, holds NaN or inf: a 0-d bool on the gradients'
    device, never read here (``None`` when there is no gradient).

    From ``given_norm`` (``GivenGradNorm.note_grad_norm``: not finite ⇔ skip) when given,
    else from the max-norms of all the gradients in a few multi-tensor launches
    (``_foreach_norm``: NaN and ±inf propagate into a max-norm, and a finite value cannot
    overflow it); with sharded parameters the flag is all-reduced on the device
    (``any_rank_on_device``).
    """
    grads, groups = _gradients_and_groups(param_groups, agreement_groups)
    if not grads:
        return None
    device = grads[0].device
    if given_norm is not None:
        nonfinite = ~torch.isfinite(given_norm.to(device)).all()
    else:
        by_kind: dict[tuple, list[torch.Tensor]] = {}  # stacked per dtype: no op per tensor
        for norm in torch._foreach_norm(grads, ord=math.inf):
            by_kind.setdefault((norm.dtype, norm.device), []).append(norm)
        finite = [torch.isfinite(torch.stack(ns)).all().to(device) for ns in by_kind.values()]
        nonfinite = ~torch.stack(finite).all()
    return any_rank_on_device(nonfinite, groups) if groups else nonfinite


def gradients_finite(
    param_groups: list[dict[str, Any]],
    given_norm: torch.Tensor | None = None,
    agreement_groups: tuple[Any, ...] = (),
) -> bool:
    """Whether every gradient, on every rank, is free of NaN and inf.

    From ``given_norm`` (``GivenGradNorm.note_grad_norm``: finite ⇔ finite gradients) when
    given. Else contiguous float32 CPU gradients are checked together in one numba pass
    (``kernels.all_finite``) where the kernels are on; others by one min/max pass each (NaN
    and ±inf propagate into them; far cheaper here than ``isfinite`` or a max-norm). With
    sharded parameters the verdict is agreed across ranks (one all-reduce), so that all
    ranks skip a step together.
    """
    grads, groups = _gradients_and_groups(param_groups, agreement_groups)
    if given_norm is not None:
        bad = bool(grads) and not bool(torch.isfinite(given_norm).all())
    else:
        batched, extremes = [], []
        for grad in grads:
            if kernels.usable(grad):
                batched.append(grad)
            else:
                extremes.extend(extreme.float() for extreme in torch.aminmax(grad))
        bad = bool(extremes) and not bool(torch.isfinite(torch.stack(extremes)).all())
        bad = bad or not kernels.all_finite(batched)
    return not any_rank(bad, groups) if groups else not bad


def _gradients_and_groups(
    param_groups: list[dict[str, Any]], agreement_groups: tuple[Any, ...] = ()
) -> tuple[list[torch.Tensor], list]:
    """This rank's non-empty gradients (dense) and the process groups of sharded parameters
    (after ``agreement_groups``)."""
    grads, groups = [], list(agreement_groups)
    for group in param_groups:
        for param in group["params"]:
            _, grad, shard = local_tensors(param)
            if grad is not None and grad.numel():
                grads.append(grad.to_dense() if grad.is_sparse else grad)
            if shard is not None and shard.group not in groups:
                groups.append(shard.group)
    return grads, groups
