"""What a DeepSpeed ZeRO optimizer hands its client optimizer, as runs of parameters' flat elements.

DeepSpeed's ZeRO stages 1-3 never show the client optimizer a model parameter: each ``step()``
sees one *flat* fp32 tensor per param group, and that tensor is a concatenation of pieces of
parameters (plus padding). This module describes those pieces once, after
``deepspeed.initialize``, from DeepSpeed's own records:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each param group's trainable parameters are flattened
  in ``round_robin_bit16_groups`` order (the group's order unless ``round_robin_gradients``), at
  ``round_robin_bit16_offsets``, and the flat buffer is split evenly (``partition_size``) over the
  data-parallel ranks; this rank's piece, cloned to fp32, is ``single_partition_of_fp32_groups[g]``.
  A parameter may straddle two (or more) ranks. The runs follow that layout, and must equal
  DeepSpeed's per-parameter fragments ``param._hp_mapping`` (``lp_fragment_address.start``
  inside the parameter, ``hp_fragment_address.start`` inside the partition); those are wrong
  in DeepSpeed 0.19 under ``round_robin_gradients``, so they are not consulted there.
- bf16 under ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``): the same split of
  ``bf16_groups`` flattened in order, into ``fp32_groups_flat_partition[g]``.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split on its own; rank ``r`` of
  the sub-group's process group holds its flat elements ``[r·ps, (r+1)·ps)`` with
  ``ps = param.ds_tensor.ds_numel`` (the parameter padded up to a multiple of the world size).
  ``grad_position[param.ds_id] = (sub_group, offset, ps)`` places that partition in the
  sub-group's flat tensor ``fp32_partitioned_groups_flat[sub_group]``.

The contract, for each flat tensor ``flat`` the client optimizer is stepped on::

    for run in runs.of(flat):  # Run(name, start, offset, length)
        flat[run.offset : run.offset + run.length]
        # holds param(name).reshape(-1)[run.start : run.start + run.length]

- ``start`` is the *global* flat offset inside the whole parameter ``name`` (row-major, of
  ``runs.params[name].numel`` elements): a DARE mask drawn over the whole parameter and keyed by
  the global element index is kept on ``[start, start + length)``; a task vector's transform
  ``T = F(τ)`` of the whole parameter is sliced by ``[start, start + length)``.
- ``offset`` is where those elements sit in ``flat``; runs of one flat tensor never overlap.
  Flat elements covered by no run are padding: they belong to no parameter.
- Across the ranks of the data-parallel group, the runs of a parameter tile ``[0, numel)``
  exactly once; ``runs.params[name].ranks`` lists the ranks holding some of it (more than one
  under ZeRO-3 always, under ZeRO-1/2 when the parameter straddles a partition boundary), which
  is the group an exact top-k over the whole parameter must all-reduce over.
- Flat tensors are matched by identity: DeepSpeed swaps ``param_groups[g]["params"]`` to
  ``[flat]`` for each ``step()`` call, and the same tensor object is used at every step.

Only parameters that DeepSpeed trains appear (frozen ones are not in any flat tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from omotool.errors import UsageError


@dataclass(frozen=True)
class Run:
    """``length`` elements of parameter ``name`` from ``start``, at ``offset`` in a flat tensor."""

    name: str
    start: int  # first element inside the whole parameter (flattened, row-major)
    offset: int  # first element inside the flat tensor
    length: int


@dataclass(frozen=True)
class ParamLayout:
    """The whole parameter, and the data-parallel ranks that hold some of its elements."""

    numel: int
    shape: tuple[int, ...]
    ranks: tuple[int, ...]  # ranks within the parameter's data-parallel group, ascending


@dataclass(frozen=True)
class ZeroRuns:
    """This rank's runs, per flat tensor the client optimizer is stepped on."""

    stage: int
    rank: int  # within the data-parallel group every flat tensor is partitioned over
    world_size: int
    flats: tuple[torch.Tensor, ...]  # the flat fp32 tensors, in DeepSpeed's group order
    runs: tuple[tuple[Run, ...], ...]  # runs[i]: the runs of flats[i], by ascending offset
    params: dict[str, ParamLayout]
    # orders[i]: every parameter of flats[i]'s group, held here or not, in DeepSpeed's order:
    # the same on every rank, so collectives over those parameters are called in one order.
    orders: tuple[tuple[str, ...], ...] = ()
    group: Any = None  # the data-parallel process group (None: the default group)

    def of(self, flat: torch.Tensor) -> tuple[Run, ...]:
        """The runs of ``flat`` (one of ``flats``, matched by identity)."""
        for candidate, runs in zip(self.flats, self.runs, strict=True):
            if candidate is flat:
                return runs
        raise UsageError(
            f"a flat tensor of {flat.numel()} elements that DeepSpeed did not hand out at set-up: "
            "build the runs after deepspeed.initialize, from the same engine"
        )


def zero_runs(engine_or_optimizer: Any, named_parameters: Iterable[tuple[str, Any]]) -> ZeroRuns:
    """The runs of every flat tensor of a DeepSpeed ZeRO-1/2/3 engine (or its ZeRO optimizer).

    ``named_parameters``: the model's ``named_parameters()`` (the module given to
    ``deepspeed.initialize``, or ``engine.module``): they name the parameters DeepSpeed holds.
    """
    names = {id(param): name for name, param in named_parameters}
    # The engine holds the ZeRO optimizer as ``.optimizer``; that one holds the client's.
    for optimizer in (engine_or_optimizer, getattr(engine_or_optimizer, "optimizer", None)):
        if hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(
            optimizer, "grad_position"
        ):
            return _stage3_runs(optimizer, names)
        if hasattr(optimizer, "single_partition_of_fp32_groups") and hasattr(
            optimizer, "bit16_groups"
        ):
            return _stage12_runs(optimizer, names)
        if hasattr(optimizer, "fp32_groups_flat_partition") and hasattr(optimizer, "bf16_groups"):
            return _bf16_runs(optimizer, names)
    optimizer = getattr(engine_or_optimizer, "optimizer", engine_or_optimizer)
    raise UsageError(
        f"{type(optimizer).__name__} is not a DeepSpeed ZeRO-1/2/3 optimizer "
        "(expected the engine of a zero_optimization stage 1, 2 or 3 run)"
    )


def run_views(flat: torch.Tensor, runs: Iterable[Run]) -> Iterator[tuple[Run, torch.Tensor]]:
    """``(run, flat[run.offset : run.offset + run.length])`` for each run: views, not copies."""
    for run in runs:
        yield run, flat.narrow(0, run.offset, run.length)


def _name(names: dict[int, str], param: Any) -> str:
    try:
        return names[id(param)]
    except KeyError:
        shape = tuple(getattr(param, "ds_shape", param.shape))
        raise UsageError(
            f"DeepSpeed holds a parameter of shape {shape} "
            "that named_parameters() does not list: pass the named parameters of the module "
            "given to deepspeed.initialize"
        ) from None


def _one_group(coordinates: set[tuple[int, int]]) -> tuple[int, int]:
    """``(rank, world size)``: every group must be partitioned over the same ranks."""
    if len(coordinates) != 1:
        raise UsageError(
            "param groups partitioned over different process groups (expert parallelism) "
            "are not supported"
        )
    return next(iter(coordinates))


def _holders(first: int, numel: int, partition_size: int) -> tuple[int, ...]:
    """Ranks whose partition ``[r·ps, (r+1)·ps)`` meets ``[first, first + numel)``."""
    return tuple(range(first // partition_size, (first + numel - 1) // partition_size + 1))


def _stage12_runs(optimizer: Any, names: dict[int, str]) -> ZeroRuns:
    """``DeepSpeedZeroOptimizer``: groups flattened at ``round_robin_bit16_offsets``."""
    return _partition_runs(
        2 if optimizer.partition_gradients else 1,
        groups=optimizer.round_robin_bit16_groups,
        offsets=optimizer.round_robin_bit16_offsets,
        partition_sizes=optimizer.partition_size,
        process_groups=optimizer.real_dp_process_group,
        flats=optimizer.single_partition_of_fp32_groups,
        names=names,
        check_fragments=not optimizer.round_robin_gradients,
    )


def _bf16_runs(optimizer: Any, names: dict[int, str]) -> ZeroRuns:
    """``BF16_Optimizer`` (bf16 under ZeRO-1 with fp32 gradient accumulation): each group
    flattened in its order, no padding between parameters, split evenly over the ranks."""
    offsets = []
    for group in optimizer.bf16_groups:
        numels = [param.numel() for param in group]
        offsets.append([sum(numels[:index]) for index in range(len(numels))])
    return _partition_runs(
        1,
        groups=optimizer.bf16_groups,
        offsets=offsets,
        partition_sizes=[
            flat.numel() // count
            for flat, count in zip(
                optimizer.bf16_groups_flat, optimizer.partition_count, strict=True
            )
        ],
        process_groups=optimizer.real_dp_process_group,
        flats=optimizer.fp32_groups_flat_partition,
        names=names,
        check_fragments=True,
    )


def _partition_runs(
    stage: int,
    *,
    groups: list[list[Any]],
    offsets: list[list[int]],
    partition_sizes: list[int],
    process_groups: list[Any],
    flats: list[torch.Tensor],
    names: dict[int, str],
    check_fragments: bool,
) -> ZeroRuns:
    """Group ``g``'s parameters flattened at ``offsets[g]`` into one buffer, split evenly in
    ``partition_sizes[g]`` elements per rank; this rank's partition is ``flats[g]``."""
    import deepspeed.comm as dist

    all_runs, orders, params, coordinates = [], [], {}, set()
    for g, group in enumerate(groups):
        rank = dist.get_rank(group=process_groups[g])
        coordinates.add((rank, dist.get_world_size(group=process_groups[g])))
        partition_size = partition_sizes[g]
        low, high = rank * partition_size, (rank + 1) * partition_size  # in the group's buffer
        runs = []
        orders.append(tuple(_name(names, param) for param in group))
        for param, first in zip(group, offsets[g], strict=True):
            name, numel = _name(names, param), param.numel()
            ranks = _holders(first, numel, partition_size)
            params[name] = ParamLayout(numel, tuple(param.shape), ranks)
            begin, end = max(first, low), min(first + numel, high)
            if begin < end:
                runs.append(Run(name, start=begin - first, offset=begin - low, length=end - begin))
        runs.sort(key=lambda run: run.offset)
        if check_fragments:
            _check_fragments(runs, group, names)
        all_runs.append(tuple(runs))
    return ZeroRuns(
        stage, *_one_group(coordinates), tuple(flats), tuple(all_runs), params, tuple(orders),
        process_groups[0] if process_groups else None,
    )  # fmt: skip


def _check_fragments(runs: list[Run], group: list[Any], names: dict[int, str]) -> None:
    """The runs must be DeepSpeed's own fragments (``param._hp_mapping``).

    Not consulted under ``round_robin_gradients``: there DeepSpeed 0.19 flattens the group in
    round-robin order but, when no parameter needs alignment padding, records its fragments at
    offsets in the original order, so ``_hp_mapping`` points at other parameters' elements.
    """
    fragments = []
    for param in group:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            fragments.append(
                Run(
                    names[id(param)],
                    start=mapping.lp_fragment_address.start,
                    offset=mapping.hp_fragment_address.start,
                    length=mapping.lp_fragment_address.numel,
                )
            )
    if sorted(fragments, key=lambda run: run.offset) != runs:
        raise UsageError(
            "DeepSpeed's parameter fragments (_hp_mapping) disagree with its flat layout: "
            "this DeepSpeed version lays out ZeRO-1/2 partitions differently"
        )


def _stage3_runs(optimizer: Any, names: dict[int, str]) -> ZeroRuns:
    import deepspeed.comm as dist

    flats, all_runs, orders, params, coordinates = [], [], [], {}, set()
    for i, group in enumerate(optimizer.fp16_groups):
        process_group = optimizer.sub_group_process_groups[i]
        rank, world = dist.get_rank(group=process_group), dist.get_world_size(group=process_group)
        coordinates.add((rank, world))
        runs = []
        orders.append(tuple(_name(names, param) for param in group))
        for param in group:
            name, numel = _name(names, param), param.ds_numel
            sub_group, offset, partition_size = optimizer.grad_position[
                optimizer.get_param_id(param)
            ]
            if sub_group != i or partition_size != param.ds_tensor.ds_numel:
                raise UsageError(f"DeepSpeed's position of {name} disagrees with its partition")
            params[name] = ParamLayout(
                numel, tuple(param.ds_shape), _holders(0, numel, partition_size)
            )
            start = rank * partition_size
            length = min(partition_size, numel - start)  # the rest of the partition is padding
            if length > 0:
                runs.append(Run(name, start=start, offset=offset, length=length))
        flats.append(optimizer.fp32_partitioned_groups_flat[i])
        all_runs.append(tuple(runs))
    groups = optimizer.sub_group_process_groups
    return ZeroRuns(
        3, *_one_group(coordinates), tuple(flats), tuple(all_runs), params, tuple(orders),
        groups[0] if groups else None,
    )  # fmt: skip
