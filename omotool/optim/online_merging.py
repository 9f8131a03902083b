"""``OnlineMergingAdamW``: AdamW whose every update is merged with the SFT task vector.

A thin class over ``omotool.optim.functional`` (as ``torch.optim.AdamW`` over its functional
core): it gathers parameters, names and state, checks gradients, and calls one functional step
per parameter. Usage::

    opt = OnlineMergingAdamW(model.named_parameters(), task_vector=TaskVector.load("runs/tau"),
                             method="dare", reserve_p=0.01, alpha=1e-7, lr=1e-6)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from omotool.errors import InputError, UsageError
from omotool.optim import backends, kernels
from omotool.optim.backends import Backend, TensorStep, resolve_backend
from omotool.optim.distributed import local_tensors
from omotool.optim.functional import MergeOptions, StepStats, Workspace
from omotool.optim.gradients import (  # noqa: F401 - NonFiniteGradientError, gradients_*: public
    GivenGradNorm,
    NonFiniteGradientError,
    closure_and_check,
    gradients_finite,
    gradients_nonfinite,
    non_finite_error,
)
from omotool.optim.options import MISSING_POLICIES  # noqa: F401 - what `missing=` takes
from omotool.optim.references import (
    NAN_POLICIES,  # noqa: F401 - what `nan_policy=` takes
    merge_options_of,
    set_up_merging,
    takes_merge_options,
)
from omotool.optim.task_vector import TaskVector
from omotool.optim.zero_merging import ZeroFlat, piece_steps, set_up_zero_merging, state_owner
from omotool.optim.zero_runs import ZeroRuns

BACKENDS = ("auto", *backends.BACKENDS.names())
_FLOAT32_STATE = ("exp_avg", "exp_avg_sq", "master", "cache")  # kept in float32 on load
_PLAIN_ADAMW = MergeOptions(method="none")
_STATE_COMPONENT = {
    "exp_avg": "moments", "exp_avg_sq": "moments", "step": "steps", "master": "master",
    "cache": "cache",
}  # fmt: skip
_MEMORY_COMPONENTS = (
    "moments", "steps", "master", "cache", "task_vector_values", "task_vector_indices",
)  # fmt: skip


class OnlineMergingAdamW(GivenGradNorm, torch.optim.Optimizer):
    """AdamW with online merging (OnDARE / OnTIES), step-K, NaN skipping and exact resume.

    Args:
        params: ``model.named_parameters()`` or param groups whose ``params`` are
            ``(name, tensor)`` pairs; names are how each tensor finds its ``τ``.
        task_vector: a ``TaskVector``, a ``{name: tensor}`` mapping, or an ``omotool delta``
            output folder. Not needed for ``method="none"``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (per group where given).
        nan_policy: a non-finite gradient anywhere skips the whole step and counts it
            (``"skip"``) or raises ``NonFiniteGradientError`` (an ``OmoError`` and a
            ``FloatingPointError``: ``"raise"``); parameters are never
            written with non-finite values. Deciding that reads every gradient, unless
            the caller hands the step the gradients' norm (``note_grad_norm``).
        master_weights: keep a float32 copy of bf16/fp16 parameters so that updates far below
            the parameter's precision accumulate (moments and merges are float32 anyway).
        backend: how the step is computed (``BACKENDS``; the model is ``torch.optim.adam``:
            one functional step, implementations chosen by device). All agree with the
            readable ``"reference"`` (plain tensor ops, ``functional.online_merging_adamw_``;
            any device, reads values on the host; with ``method="none"`` it follows
            ``AdamW(foreach=False)`` bit for bit) to float32 rounding:
            ``"cpu"``: CPU tensors; OnDARE/OnTIES steps of float32 tensors in a few numba
            kernels over all tensors at once (``optim.backends.cpu``, ``optim.kernels``),
            others in torch's fused AdamW kernel. ``"torch"``: tensor ops that never wait on
            the device (``optim.backends.sync_free``): state on the parameters'
            device, no value read on the host during ``step()`` (NaN skipping decided on the
            device; statistics read only by ``stats()``); any device. ``"triton"``: fused
            Triton kernels (``optim.backends.triton``; CUDA, or CPU tensors under
            ``TRITON_INTERPRET=1``), sync-free as ``"torch"``; refuses by name what it does
            not do (step-K, ``rescale="l1"``); not yet compiled on a GPU, so only on request.
            ``"auto"`` (default): ``"cpu"`` when every parameter is on the CPU, else
            ``"torch"``. Exceptions to sync-free:
            ``nan_policy="raise"`` reads one flag per step (it must raise), and the OnTIES
            threshold of FSDP-sharded tensors (``"torch"`` only) gathers candidates on the host.
            OnDARE's masks come from the backend's generator: ``"triton"`` draws from
            Philox by element offset, the others by geometric gaps (same law, other draws).
        **merge_options: ``method``, ``reserve_p``, ``alpha``, ... : the merge options, as
            declared (default, meaning, allowed values) in ``omotool.optim.options``; the
            equations are in ``omotool.optim.functional``. An unknown keyword is refused.
    """

    @takes_merge_options
    def __init__(
        self,
        params: Iterable[Any],
        task_vector: TaskVector | Mapping[str, torch.Tensor] | str | os.PathLike[str] | None = None,
        *,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        nan_policy: str = "skip",
        master_weights: bool = True,
        backend: str = "auto",
        **merge_options: Any,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise UsageError(
                f"invalid AdamW setting: lr={lr}, betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}."
            )
        self.options = merge_options_of(self, merge_options)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.nan_policy = nan_policy
        self.master_weights = master_weights
        self._zero_flats: dict[int, ZeroFlat] = {}  # by id(flat): set by attach_zero_runs
        if backend not in BACKENDS:
            raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
        self.backend = backend
        self._backend: Backend | None = None  # resolved by the first step
        self._workspace = Workspace()
        self._skipped_on_device: torch.Tensor | None = None  # the sync-free path's count
        self.skipped_steps = 0
        self.last_stats = StepStats()
        self.references, self.task_vector_fingerprint = set_up_merging(
            self.param_groups, task_vector, self.options, nan_policy
        )

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reads the device count: a sync)."""
        on_device = self._skipped_on_device
        return self._skipped_steps + (0 if on_device is None else int(on_device.item()))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps = int(value)
        self._skipped_on_device = None

    # -- set-up ----------------------------------------------------------------------------
    def _state_for(self, param: torch.Tensor, local: torch.Tensor, merges: bool) -> dict[str, Any]:
        """Lazily created state; tensors are shaped like the local shard, in float32, on its
        device (``step`` too, as torch keeps it for its fused kernels)."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
            state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32)
            if self.master_weights and local.dtype != torch.float32:
                state["master"] = local.detach().to(torch.float32, copy=True)
            if merges and self.options.online_step > 1:
                state["cache"] = torch.zeros_like(local, dtype=torch.float32)
        return state

    # -- the step --------------------------------------------------------------------------
    @property
    def resolved_backend(self) -> str:
        """The name of the backend ``step()`` uses (``backend``, with ``"auto"`` decided by
        the devices)."""
        return self._resolved().name

    def _resolved(self) -> Backend:
        """The backend, resolved once from the parameters' devices (``resolve_backend``)."""
        if self._backend is None:
            devices = {p.device for group in self.param_groups for p in group["params"]}
            self._backend = resolve_backend(self.backend, self.options, devices)
        return self._backend

    def _tensor_steps(self) -> Iterator[TensorStep]:
        """Every parameter with a gradient, with its state, ``T`` and float32 working copy."""
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            if len(names) != len(group["params"]):
                raise UsageError(
                    "the optimizer's parameters were replaced (DeepSpeed ZeRO's flat "
                    "partitions?): call attach_zero_runs after deepspeed.initialize."
                )
            for name, param in zip(names, group["params"], strict=True):
                local, grad, shard = local_tensors(param)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise UsageError("sparse gradients are not supported")
                zero = self._zero_flats.get(id(param))
                zero = zero if zero is not None and zero.flat is param else None
                reference = self.references.get(name) if name is not None else None
                merges = self.options.merges and (reference is not None or zero is not None)
                state = self._state_for(param, local, merges)
                work = state.get("master")
                if work is None:
                    work = local if local.dtype == torch.float32 else local.float()
                beta1, beta2 = group["betas"]
                whole = TensorStep(
                    name or "", local, work, grad, shard, reference, state,
                    dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"]),
                    self.options if merges else _PLAIN_ADAMW,
                )  # fmt: skip
                if zero is None:
                    yield whole
                else:
                    yield from piece_steps(whole, zero, self.options, _PLAIN_ADAMW)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step for every parameter with a gradient (all or none of them: see nan_policy)."""
        backend = self._resolved()
        if backend.sync_free:
            loss, keep = self._check_on_device(closure)
        else:
            loss, finite = closure_and_check(self, closure)
            if not finite:
                return loss
            keep = None
        tensors = list(self._tensor_steps())
        # One count per tensor; a ZeRO flat tensor's pieces share their flat tensor's.
        owners = list({id(s): s for s in (state_owner(t.state) for t in tensors)}.values())
        if owners:  # every tensor's step count at once (a few multi-tensor launches)
            counted = 1.0 if keep is None else keep.to(torch.float32)
            torch._foreach_add_([state["step"] for state in owners], counted)
        if backend.sync_free:  # keys the masks and step-K's phase, skipped steps included
            for state in owners:
                state["host_step"] = state.get("host_step", 0) + 1
        stats = StepStats()
        backend.step(tensors, keep=keep, stats=stats, workspace=self._workspace)
        if stats.merged:  # plain steps of step-K leave the last merge's figures in place
            self.last_stats = stats.select(keep, self.last_stats)
        return loss

    # -- DeepSpeed ZeRO ----------------------------------------------------------------------
    def attach_zero_runs(self, runs: ZeroRuns) -> None:
        """Merge on DeepSpeed ZeRO-1/2/3 flat partitions as ``runs`` describes them
        (``optim.zero_runs.zero_runs(engine, model.named_parameters())`` after
        ``deepspeed.initialize``; ``omotool train`` calls it). Explicit, not found by the first
        ``step()``: DeepSpeed hands the step a flat tensor, whose layout only the engine knows.

        Adam runs elementwise over each flat tensor, the merge per run, each run as the shard
        of its parameter (``optim.zero_merging``): masks, ``T`` (cut from the whole
        parameter's, built at construction) and the OnTIES top-k are the whole parameter's.
        The groups' parameter names are dropped: DeepSpeed swaps its flat tensors in.
        """
        self._zero_flats, self.references, group = set_up_zero_merging(
            runs, self.references, self.options, self.backend
        )
        for param_group in self.param_groups:
            param_group.pop("param_names", None)
        self.agreement_groups = (group,)

    def _check_on_device(self, closure: Any) -> tuple[Any, torch.Tensor | None]:
        """``(loss, keep)`` for a sync-free backend: nothing read on the host.

        A non-finite gradient is found on the device (``gradients_nonfinite``); under
        ``nan_policy="skip"`` the step is then applied as no change (``keep`` false: the
        device ``step`` stays, ``state["host_step"]``, which keys the masks and step-K's
        phase, moves on).
        """
        given = self._take_grad_norm(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        nonfinite = gradients_nonfinite(self.param_groups, given, self.agreement_groups)
        if nonfinite is None:
            return loss, None
        if self.nan_policy == "raise":
            if bool(nonfinite):  # the one read of this path: raising needs the host
                raise non_finite_error()
            return loss, None
        skipped = nonfinite.to(torch.float64)
        before = self._skipped_on_device
        self._skipped_on_device = skipped if before is None else before + skipped
        return loss, ~nonfinite

    def stats(self) -> dict[str, float]:
        """Metrics of the last merging step: kept and sign-conflict fractions, norms, skips."""
        return self.last_stats.as_dict(self.skipped_steps)

    # -- memory ----------------------------------------------------------------------------
    def memory_report(self) -> dict[str, float]:
        """Bytes of every buffer the optimizer holds, by component, and per parameter.

        Components (``<component>_bytes`` and ``<component>_bytes_per_parameter``):
        ``moments`` (``exp_avg``, ``exp_avg_sq``), ``steps`` (step counts), ``master``
        (float32 copies of bf16/fp16 parameters), ``cache`` (step-K's cached updates),
        ``task_vector_values`` and ``task_vector_indices`` (``T``; indices only where sparse),
        and ``workspace_<purpose>``: the fast path's scratch buffers, allocated by the first
        step that needs them and grown to the largest request (the largest tensor; for
        batched OnTIES all batched entries, of which only the pages that receive candidates
        become resident; for shards, ``shard_candidates`` and ``shard_keys``: every rank's
        candidates above the agreed floor and their sort keys, ``backends.cpu_shards``).
        A shard stepped alone (backends ``torch``, ``reference``; a dense ``T``) makes
        temporaries of its own size during its step, freed after it: at most one largest
        tensor's, not counted here. Sizes are those of the tensors' storages, each counted
        once.
        ``total`` is their sum; ``extra`` is what torch.optim.AdamW does not hold (all but
        moments and steps). ``kernel_scratch_bytes``: the numba kernels' per-thread rows,
        shared by every optimizer of the process, not in the totals.
        """
        parameters = sum(p.numel() for group in self.param_groups for p in group["params"])
        sizes: dict[str, int] = dict.fromkeys(_MEMORY_COMPONENTS, 0)
        seen: set[tuple[str, int]] = set()

        def count(component: str, tensor: torch.Tensor | None) -> None:
            if tensor is None:
                return
            storage = tensor.untyped_storage()
            key = (str(storage.device), storage.data_ptr() or id(storage))
            if key not in seen:
                seen.add(key)
                sizes[component] = sizes.get(component, 0) + storage.nbytes()

        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    count(_STATE_COMPONENT.get(key, f"state_{key}"), value)
        for reference in self.references.values():
            count("task_vector_values", reference.values)
            count("task_vector_indices", reference.indices)
        for purpose, buffer in sorted(self._workspace.buffers().items()):
            count(f"workspace_{purpose}", buffer)
        total = sum(sizes.values())
        extra = total - sizes["moments"] - sizes["steps"]
        per = 1 / parameters if parameters else 0.0
        report: dict[str, float] = {"parameters": float(parameters)}
        for component, size in sizes.items():
            report[f"{component}_bytes"] = float(size)
            report[f"{component}_bytes_per_parameter"] = size * per
        task_vector = sizes["task_vector_values"] + sizes["task_vector_indices"]
        return {
            **report,
            "task_vector_bytes": float(task_vector),
            "task_vector_bytes_per_parameter": task_vector * per,
            "total_bytes": float(total),
            "total_bytes_per_parameter": total * per,
            "extra_bytes": float(extra),
            "extra_bytes_per_parameter": extra * per,
            "kernel_scratch_bytes": float(kernels.scratch_bytes()),
        }

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``online_merging``: options, skipped steps, τ identity.

        The masks need no RNG state: they are keyed by (seed, step, name); ``T`` is rebuilt
        from the task vector and the seed when the optimizer is constructed.
        """
        state = super().state_dict()
        state["online_merging"] = {
            "options": dataclasses.asdict(self.options),
            "skipped_steps": self.skipped_steps,
            "task_vector_fingerprint": self.task_vector_fingerprint,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise InputError("not an optimizer state dict (no 'state' and 'param_groups').")
        state_dict = copy.copy(state_dict)
        extra = state_dict.pop("online_merging", None)
        if extra is not None:
            saved = MergeOptions.from_saved(extra["options"], self.options)
            if saved != self.options:
                raise InputError(
                    f"the checkpoint was made with merge options {saved}, this optimizer has "
                    f"{self.options}; resume with the same options."
                )
            fingerprint = extra.get("task_vector_fingerprint")
            if (
                fingerprint
                and self.task_vector_fingerprint
                and fingerprint != self.task_vector_fingerprint
            ):
                raise InputError("the checkpoint was made with a different task vector.")
            self.skipped_steps = int(extra.get("skipped_steps", 0))
        # torch would cast every state tensor to the parameter's dtype; ours stay float32.
        kept: dict[int, dict[str, torch.Tensor]] = {}
        inner_state = {}
        for key, values in state_dict["state"].items():
            kept[key] = {k: v for k, v in values.items() if k in _FLOAT32_STATE}
            inner_state[key] = {k: v for k, v in values.items() if k not in _FLOAT32_STATE}
        try:
            super().load_state_dict({**state_dict, "state": inner_state})
        except ValueError as exc:  # torch's: another number or size of parameter groups
            raise InputError(f"the checkpoint does not fit this optimizer: {exc}") from exc
        params = [p for group in self.param_groups for p in group["params"]]
        for key, values in kept.items():
            param = params[key]
            for name, value in values.items():
                self.state[param][name] = value.to(param.device, torch.float32, copy=True)
        for param in params:  # torch leaves `step` where it was saved (the CPU, often)
            state = self.state.get(param)
            if state and isinstance(state.get("step"), torch.Tensor):
                step = state["step"]
                state["step"] = step.to(param.device, torch.float32, copy=True)
                state.setdefault("host_step", int(step.item()))
