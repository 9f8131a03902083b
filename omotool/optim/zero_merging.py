"""Online merging on DeepSpeed ZeRO-1/2/3 partitions: each run of a flat tensor merged as the
FSDP2 shard of its parameter that it is.

A ZeRO flat fp32 tensor (``optim.zero_runs``) is cut into *pieces*, in one order that every
rank of the data-parallel group shares (the flat's param group, in DeepSpeed's order):

- a run ``Run(name, start, offset, length)`` of a parameter held by several ranks is a
  ``distributed.Shard(numel, offset=start, group)`` of that parameter: DARE masks are drawn
  over the whole parameter and keyed by global element offset, ``T = F(τ)`` of the whole
  parameter is sliced by ``[start, start + length)`` (in the whole's form, so that every rank
  batches its pieces alike), the OnTIES top-k is that of the whole parameter (agreed for all
  shared pieces of a step at once in the ``cpu`` backend, ``backends.cpu_shards``; piece by
  piece, ``sharded_magnitude_mask``, in the others). Within a parameter lower ranks hold
  lower elements (ZeRO-1/2: the flat buffer is split in rank order; ZeRO-3: rank ``r`` holds
  ``[r·ps, (r+1)·ps)``), which is what the shard's tie-break assumes;
- a run of a parameter held by this rank alone is the whole parameter (no shard, no collective);
- where a rule reads the whole update (OnTIES) and other ranks hold a parameter this rank does
  not, an empty piece takes part in their collectives (they are called in the same order on
  every rank, or they would deadlock);
- elements covered by no run (padding) get plain AdamW.

Adam itself is elementwise, so it is the same over the pieces as over the whole flat tensor;
the step count is the flat tensor's (``state[flat]["step"]``), shared by its pieces.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from omotool.errors import UsageError
from omotool.optim.backends.base import TensorStep
from omotool.optim.distributed import Shard, shard_delta
from omotool.optim.functional import MERGE_RULES, MergeOptions
from omotool.optim.task_vector import FlatDelta
from omotool.optim.zero_runs import Run, ZeroRuns

_PIECE_STATE = ("exp_avg", "exp_avg_sq", "master", "cache")  # sliced per piece; the rest shared


@dataclass(frozen=True)
class Piece:
    """``length`` elements of a flat tensor from ``offset``: a run of parameter ``name`` (``""``:
    padding), its ``shard`` (None: the whole parameter) and its part of ``T`` (None: plain
    AdamW)."""

    name: str
    offset: int
    length: int
    shard: Shard | None
    reference: FlatDelta | None


@dataclass(frozen=True)
class ZeroFlat:
    """One flat tensor and its pieces (in the order shared by every rank)."""

    flat: torch.Tensor
    pieces: tuple[Piece, ...]


def set_up_zero_merging(
    runs: ZeroRuns, references: Mapping[str, FlatDelta], options: MergeOptions, backend: str
) -> tuple[dict[int, ZeroFlat], dict[str, FlatDelta], Any]:
    """``(pieces by id(flat), their parts of T by key, the data-parallel group)`` for the
    optimizer (``OnlineMergingAdamW.attach_zero_runs``), given ``T`` of the whole parameters;
    what is not done on partitions is refused by name."""
    if options.merges and options.resolved_rescale == "l1":
        raise UsageError("rescale='l1' is not supported on DeepSpeed ZeRO partitions.")
    if backend == "triton":  # its batched launches are not checked on runs yet
        raise UsageError(
            "backend='triton' is not supported on DeepSpeed ZeRO partitions; use 'torch'."
        )
    whole_update = MERGE_RULES.get(options.method).reads_whole_update
    flats = zero_pieces(runs, references, whole_update)
    parts = {
        f"{piece.name}@{i}:{piece.offset}": piece.reference
        for i, zero in enumerate(flats.values())
        for piece in zero.pieces
        if piece.reference is not None
    }
    return flats, parts, runs.group if runs.group is not None else dist.group.WORLD


def zero_pieces(
    runs: ZeroRuns, references: Mapping[str, FlatDelta], whole_update: bool
) -> dict[int, ZeroFlat]:
    """The pieces of every flat tensor of ``runs``, by ``id(flat)``. ``references``: ``T`` of
    each whole parameter that merges (by name); ``whole_update``: the rule reads every entry
    of the update (a top-k), so ranks that hold nothing of a shared parameter take part."""
    group = runs.group if runs.group is not None else dist.group.WORLD
    by_flat = {}
    for flat, flat_runs, order in zip(runs.flats, runs.runs, runs.orders, strict=True):
        held = {run.name: run for run in flat_runs}
        pieces = []
        for name in order:
            layout, reference = runs.params[name], references.get(name)
            run = held.get(name)
            shared = len(layout.ranks) > 1
            if run is None:
                if not (whole_update and shared and reference is not None):
                    continue
                run = Run(name, start=0, offset=0, length=0)  # a part in the others' collectives
            shard = Shard(numel=layout.numel, offset=run.start, group=group) if shared else None
            if reference is not None:  # in the whole's form: alike on every rank
                reference = shard_delta(reference, run.start, run.length)
                reference.sq_norm  # noqa: B018 - computed once here, not read during a step
            pieces.append(Piece(name, run.offset, run.length, shard, reference))
        pieces.extend(_padding(flat.numel(), flat_runs))
        by_flat[id(flat)] = ZeroFlat(flat, tuple(pieces))
    return by_flat


def _padding(numel: int, runs: tuple[Run, ...]) -> Iterator[Piece]:
    """Plain-AdamW pieces for the elements no run covers (``runs`` by ascending offset)."""
    position = 0
    for run in (*runs, Run("", 0, numel, 0)):
        if run.offset > position:
            yield Piece("", position, run.offset - position, None, None)
        position = max(position, run.offset + run.length)


def piece_steps(
    whole: TensorStep, zero: ZeroFlat, options: MergeOptions, plain: MergeOptions
) -> Iterator[TensorStep]:
    """``whole`` (the flat tensor's step) as one step per piece: views of its tensors and
    state; the step count stays the flat tensor's (``state_owner``)."""
    for piece in zero.pieces:
        merges = options.merges and piece.reference is not None

        def cut(tensor: torch.Tensor, piece: Piece = piece) -> torch.Tensor:
            return tensor.reshape(-1).narrow(0, piece.offset, piece.length)

        views = {
            key: cut(value)
            for key, value in whole.state.items()
            if key in _PIECE_STATE and (key != "cache" or merges)
        }
        yield TensorStep(
            piece.name, cut(whole.local), cut(whole.work), cut(whole.grad), piece.shard,
            piece.reference, ChainMap(views, whole.state), whole.adam,
            options if merges else plain,
        )  # fmt: skip


def state_owner(state: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The state that owns a step's count: a piece's flat tensor's, else ``state`` itself."""
    return state.maps[-1] if isinstance(state, ChainMap) else state
