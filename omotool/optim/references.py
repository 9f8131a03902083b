"""Setting up online merging for an optimizer's parameters: the merge options taken as
keyword arguments (``takes_merge_options``, ``merge_options_of``), the settings checked and
``T = F(τ)`` built per parameter (``build_references``), once, before any step.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from omotool.config import default_of
from omotool.errors import InputError, UsageError
from omotool.optim.distributed import local_tensors, shard_delta
from omotool.optim.functional import MergeOptions, reference_tensor
from omotool.optim.options import MergeFields
from omotool.optim.task_vector import FlatDelta, TaskVector

NAN_POLICIES = ("skip", "raise")

Init = TypeVar("Init", bound=Callable[..., None])


def takes_merge_options(init: Init) -> Init:
    """Decorate an optimizer's ``__init__(self, ..., **merge_options)``: its signature (as
    ``inspect.signature`` and ``help`` show it) names every merge option of
    ``optim.options.MergeFields`` as a keyword argument with its declared default."""
    signature = inspect.signature(init)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    declared = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=default_of(MergeFields, f.name),
            annotation=f.type,
        )
        for f in dataclasses.fields(MergeFields)
    ]  # fmt: skip
    init.__signature__ = signature.replace(parameters=[*own, *declared])  # type: ignore[attr-defined]
    return init


def merge_options_of(owner: object, given: Mapping[str, Any]) -> MergeOptions:
    """The ``MergeOptions`` of the keyword arguments ``given`` to ``owner``'s constructor
    (those it does not name itself; ``set_up_merging`` checks their values); an unknown
    keyword is refused, naming the arguments the constructor takes."""
    fields = {f.name for f in dataclasses.fields(MergeOptions)}
    for key in given:
        if key not in fields:
            takes = [p for p in inspect.signature(type(owner)).parameters if p != "self"]
            close = difflib.get_close_matches(key, takes, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"{type(owner).__name__} has no argument {key!r}.{hint} It takes "
                f"{', '.join(takes)}."
            )
    return MergeOptions(**given)


def set_up_merging(
    param_groups: list[dict[str, Any]],
    task_vector: TaskVector | Mapping[str, torch.Tensor] | str | os.PathLike[str] | None,
    options: MergeOptions,
    nan_policy: str,
) -> tuple[dict[str, FlatDelta], str | None]:
    """Check the settings and build ``T`` per parameter: ``(references, τ fingerprint)``."""
    options.validate()
    if nan_policy not in NAN_POLICIES:
        raise UsageError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}.")
    if not options.merges:
        return {}, None
    if task_vector is None:
        raise UsageError(f"method {options.method!r} needs a task_vector (τ = θ_sft − θ_base).")
    tv = TaskVector.coerce(task_vector)
    references = build_references(named_parameters(param_groups), tv, options)
    return references, tv.sft_fingerprint


def named_parameters(param_groups: list[dict[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every group; names are required for merging."""
    named = []
    for group in param_groups:
        names = group.get("param_names")
        if names is None:
            raise UsageError(
                "online merging needs parameter names: pass model.named_parameters() (or "
                "param groups of (name, parameter) pairs) instead of model.parameters()."
            )
        named.extend(zip(names, group["params"], strict=True))
    return named


def build_references(
    named: list[tuple[str, torch.Tensor]],
    task_vector: TaskVector,
    options: MergeOptions,
) -> dict[str, FlatDelta]:
    """``T = F(τ)`` for every named parameter, checked against the parameter's shape; one
    the task vector lacks is refused or left unmerged (``options.missing``)."""
    absent = [name for name, _ in named if name not in task_vector]
    if absent and options.missing == "error":
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise InputError(
            f"the task vector has no entry for {len(absent)} parameter(s): "
            f"{', '.join(absent[:5])}{more}. Use the task vector of this model, or "
            "missing='adamw' to train those parameters without merging."
        )
    references = {}
    for name, param in named:
        if name in absent:
            continue
        shape = tuple(task_vector.shape(name))
        # DeepSpeed ZeRO-3 partitions parameters as they load; ds_shape is the whole shape.
        whole_shape = tuple(getattr(param, "ds_shape", param.shape))
        if shape != whole_shape:
            raise InputError(
                f"parameter {name} has shape {list(whole_shape)} but its task-vector entry "
                f"has shape {list(shape)}: the task vector belongs to another model."
            )
        local, _, shard = local_tensors(param)
        if shard is not None and options.resolved_rescale == "l1":
            raise UsageError("rescale='l1' is not supported with sharded (FSDP) parameters.")
        reference = reference_tensor(task_vector.get(name), name, options)
        # Whole under ZeRO (the runs take their parts: OnlineMergingAdamW.attach_zero_runs).
        whole = FlatDelta.from_dense(reference.view(whole_shape))
        if shard is not None:  # each rank keeps its own run of the whole T, in its form
            whole = shard_delta(whole, shard.offset, local.numel(), tuple(local.shape))
        references[name] = whole.to(local.device)
        references[name].sq_norm  # noqa: B018 - computed once here, not read during a step
    return references


def adapter_task_vector(adapter: str | os.PathLike[str]) -> TaskVector:
    """``τ`` of the SFT adapter folder ``adapter`` against its own base: ``s·B·A`` on each
    adapted weight, 0 elsewhere (``io.adapters.AdapterDelta``), read on request. Its SFT
    fingerprint is that of the adapter's model, as ``omotool delta BASE ADAPTER`` records it."""
    from omotool.io.adapters import AdapterDelta, AdapterReader
    from omotool.io.reader import fingerprint

    with AdapterReader(adapter) as model:  # (AdapterDelta's small tensors would sample τ)
        sft = {"path": str(model.adapter.absolute()), "fingerprint": fingerprint(model)}
    reader = AdapterDelta(adapter)
    return TaskVector(reader=reader, metadata={"sft": sft})
