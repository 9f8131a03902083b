"""Sharded parameters (FSDP2 / DTensor): each rank merges its own shard, exactly as one rank would.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter along dim 0: rank ``r``
holds a contiguous run of rows, i.e. a contiguous run ``[offset, offset + n_local)`` of the
row-major flattened tensor. With that geometry:

- DARE masks are drawn over the whole tensor (O(p·n) by geometric skips) and each rank keeps
  the indices inside its run, so the mask does not depend on the sharding;
- ``T = F(τ)`` is computed from the whole τ (one tensor at a time, at set-up) and each rank keeps
  its run only;
- the TIES top-k is the top-k of the whole tensor: its exact threshold comes from the union of
  the ranks' local candidates (``sharded_magnitude_mask``), or, for all shards of a step at
  once, from the ranks' candidates above an agreed floor (``agree_floors_``,
  ``sharded_thresholds``: the ``cpu`` backend), or, in the ``triton`` backend, from
  radix-select histograms summed over the ranks (``all_reduce_on_device``); ties at the
  threshold go to the lowest global indices, as in ``omotool.merging.magnitude_mask``.
Replicated DTensors (and plain tensors, e.g. under DDP) need none of this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from omotool.errors import UsageError
from omotool.merging import kept_count, kth_largest
from omotool.optim.task_vector import FlatDelta


@dataclass(frozen=True)
class Shard:
    """Where a rank's local tensor sits in the whole parameter (flattened, row-major): an
    FSDP2 shard, or a run of a DeepSpeed ZeRO flat partition (``offset``: the run's global
    ``start``; ``optim.zero_merging``). Within ``group``, lower ranks hold lower offsets."""

    numel: int  # entries of the whole tensor
    offset: int  # flat index of the first local entry
    group: Any  # process group of the ranks sharing the tensor

    def local_indices(self, indices: torch.Tensor, local_numel: int) -> torch.Tensor:
        """The whole-tensor ``indices`` that fall in this shard, made local."""
        inside = (indices >= self.offset) & (indices < self.offset + local_numel)
        return indices[inside] - self.offset

    def local_part(self, whole: torch.Tensor, local_numel: int) -> torch.Tensor:
        return whole.reshape(-1)[self.offset : self.offset + local_numel]


def shard_delta(
    whole: FlatDelta, start: int, length: int, shape: tuple[int, ...] | None = None
) -> FlatDelta:
    """The entries ``[start, start + length)`` of a whole tensor's ``T``, in the whole's form:
    sparse (local int32 indices) where the whole is sparse, else dense (of ``shape``, or
    1-D). So every rank of a group holds its part of a tensor in the same form, whatever its
    part's density: the batched steps decide by that form, alike on every rank."""
    if whole.indices is None:
        values = whole.values.reshape(-1)[start : start + length].clone()
        return FlatDelta(values.view(shape or (length,)), None, length)
    indices = whole.indices.long()
    bounds = torch.tensor([start, start + length], dtype=indices.dtype)
    lo, hi = torch.searchsorted(indices, bounds).tolist()
    dtype = torch.int32 if length < 2**31 else torch.long
    return FlatDelta(whole.values[lo:hi].clone(), (indices[lo:hi] - start).to(dtype), length)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def local_tensors(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Shard | None]:
    """``(local parameter, local gradient, shard)``; ``shard`` is None when not sharded."""
    if type(param) in _PLAIN_TENSORS:  # the common case, without the imports below (per step)
        return param, param.grad, None
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import Shard as ShardPlacement

    if not isinstance(param, DTensor):
        return param, param.grad, None
    grad = param.grad.to_local() if param.grad is not None else None
    placements = tuple(param.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return param.to_local(), grad, None
    if len(placements) != 1 or placements[0] != ShardPlacement(0):
        raise UsageError(
            f"parameters sharded as {placements} are not supported; online merging supports "
            "FSDP2's dim-0 sharding on a 1-D mesh, replicated parameters and DDP."
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    row = math.prod(param.shape[1:])
    shard = Shard(numel=param.numel(), offset=offset[0] * row, group=param.device_mesh.get_group())
    return param.to_local(), grad, shard


def group_device(group: Any) -> torch.device:
    """The device a collective of ``group`` takes tensors on: CUDA for NCCL, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(group: Any, like: torch.Tensor) -> torch.device:
    """Where a collective of ``group`` on data like ``like`` runs: ``like``'s device, unless
    the group takes only CPU tensors (gloo) and ``like`` is elsewhere."""
    if like.device.type == "cpu" or group_device(group).type != "cpu":
        return like.device
    return torch.device("cpu")


def any_rank(flag: bool, groups: list[Any]) -> bool:
    """Whether ``flag`` is true on any rank of any of ``groups`` (one tiny all-reduce each,
    on each group's device)."""
    value = flag
    for group in groups:
        device = group_device(group)
        tensor = torch.full((1,), 1.0 if value else 0.0, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        value = bool(tensor.item() > 0)
    return value


def any_rank_on_device(flag: torch.Tensor, groups: list[Any]) -> torch.Tensor:
    """``any_rank`` of a 0-d bool tensor, kept on its device (no host read)."""
    value = flag.reshape(1).to(torch.float32)
    for group in groups:
        device = collective_device(group, value)
        moved = value.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX, group=group)
        value = moved.to(flag.device)
    return value.reshape(()) > 0


def all_reduce_on_device(tensor: torch.Tensor, group: Any) -> None:
    """Sum ``tensor`` over the ranks of ``group`` in place, on the group's device; nothing is
    read on the host (for histograms: the exact TIES threshold across shards)."""
    device = collective_device(group, tensor)
    moved = tensor if device == tensor.device else tensor.to(device)
    dist.all_reduce(moved, group=group)
    if moved is not tensor:
        tensor.copy_(moved)


def sum_over_lower_ranks(count: torch.Tensor, group: Any) -> torch.Tensor:
    """``count`` summed over the ranks of ``group`` below this one (0 on rank 0), entry by
    entry, as int64 of ``count``'s shape on its device; nothing is read on the host. Under
    FSDP2's dim-0 sharding lower ranks hold lower flat indices, so this is how many ties
    precede this rank's."""
    device = collective_device(group, count)
    value = count.reshape(-1).to(device, torch.long)
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, value, group=group)
    before = torch.stack(gathered[: dist.get_rank(group)] + [torch.zeros_like(value)]).sum(0)
    return before.reshape(count.shape).to(count.device)


def sharded_magnitude_mask(local: torch.Tensor, density: float, shard: Shard) -> torch.Tensor:
    """Local part of ``magnitude_mask`` of the whole tensor (exactly k entries across ranks)."""
    magnitudes = local.detach().abs().flatten().float()
    k = kept_count(shard.numel, density)
    # The global top-k lies within the union of each rank's local top-min(k, n_local).
    local_k = min(k, magnitudes.numel())
    candidates = (
        magnitudes[magnitudes >= kth_largest(magnitudes, local_k)]
        if local_k > 0
        else magnitudes[:0]
    )
    gathered = _all_gather_ragged(candidates, shard.group)
    threshold = kth_largest(gathered, k)
    mask = magnitudes > threshold
    ties = torch.nonzero(magnitudes == threshold).flatten()
    device = collective_device(shard.group, magnitudes)
    counts = torch.stack([mask.sum(), torch.full((), ties.numel(), device=mask.device)])
    counts = counts.to(device, torch.long)
    per_rank = [torch.zeros_like(counts) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(per_rank, counts, group=shard.group)
    rank = dist.get_rank(shard.group)
    per_rank_counts = torch.stack(per_rank).tolist()  # one host read of world × 2 counts
    above = sum(c[0] for c in per_rank_counts)
    ties_before = sum(c[1] for c in per_rank_counts[:rank])  # ranks hold increasing indices
    take = min(max(k - above - ties_before, 0), ties.numel())
    mask[ties[:take]] = True
    return mask.view(local.shape)


def _all_gather_ragged(values: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenation of every rank's 1-D ``values`` (sizes may differ)."""
    world = dist.get_world_size(group)
    device = collective_device(group, values)
    size = torch.full((1,), values.numel(), dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in torch.cat(sizes).tolist()]  # sizes decide shapes: a host read
    padded = torch.full((max(counts),), -1.0, dtype=values.dtype, device=device)
    padded[: values.numel()] = values
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    whole = torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)])
    return whole.to(values.device)


@dataclass(frozen=True)
class ShardSelections:
    """Each sharded tensor's part of its whole tensor's top-k (``sharded_thresholds``), one
    entry per tensor: keep this rank's entries above ``thresholds`` and the first ``ties`` of
    its entries equal to it, in index order (``kept`` is how many that is here). ``short``:
    the candidates held fewer than k entries (nothing is decided: select from the whole
    update); a tensor whose k is 0 keeps nothing (threshold ``inf``)."""

    thresholds: np.ndarray  # float32
    ties: np.ndarray  # int64
    kept: np.ndarray  # int64
    short: np.ndarray  # bool


def agree_floors_(floors: torch.Tensor, group: Any) -> None:
    """The least of every rank's ``floors`` (float32, one per sharded tensor, in an order
    every rank shares), in place: one all-reduce for all of them. A rank that holds nothing
    of a tensor gives ``inf``.

    Each rank's floor lies at or below its ``⌈k·n_local/n⌉``-th largest entry (a sampled
    floor), so the least of them lies at or below the k-th largest of the whole tensor: the
    ranks' entries above it hold the whole top-k."""
    moved = floors.to(group_device(group))
    dist.all_reduce(moved, op=dist.ReduceOp.MIN, group=group)
    floors.copy_(moved)


def sharded_thresholds(
    magnitudes: np.ndarray,
    counts: np.ndarray,
    ties: np.ndarray,
    floors: np.ndarray,
    ks: np.ndarray,
    group: Any,
    take: Callable[[str, int, torch.dtype], torch.Tensor] | None = None,
) -> ShardSelections:
    """The exact top-k of many sharded tensors at once, in two gathers for all of them.

    Tensor j's ranks share the floor ``floors[j]`` (``agree_floors_``); this rank holds
    ``counts[j]`` entries above it, whose ``magnitudes`` (float32, tensor after tensor, each
    in index order) are given, and ``ties[j]`` entries equal to it; ``ks[j]``: the whole
    tensor's k. Every rank gathers every rank's counts, then magnitudes, and finds the same
    k-th largest of each tensor (one sort of all of them); ties at it go to the lowest global
    indices (lower ranks hold lower offsets), as in ``magnitude_mask``. ``take(purpose,
    numel, dtype)``: a reusable 1-D CPU buffer (``Workspace.take``) for the gathered
    magnitudes and their sort keys, so that they are held and counted (``memory_report``);
    by default they are temporaries.
    """
    if take is None:
        take = lambda _, numel, dtype: torch.empty(numel, dtype=dtype)  # noqa: E731
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device, tensors = group_device(group), len(ks)
    mine = torch.from_numpy(np.stack([counts, ties], axis=1).astype(np.int64)).to(device)
    gathered_counts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered_counts, mine, group=group)
    per_rank = torch.stack(gathered_counts).cpu().numpy()  # [rank, tensor, (above, ties)]
    above_floor, at_floor = per_rank[:, :, 0], per_rank[:, :, 1]
    sizes = above_floor.sum(axis=1)
    width = max(1, int(sizes.max(initial=0)))
    rows = take("shard_candidates", (world + 1) * width, torch.float32).view(world + 1, width)
    padded = rows[world]
    padded[: magnitudes.size] = torch.from_numpy(magnitudes)
    padded[magnitudes.size :] = 0.0
    if device.type == "cpu":
        gathered = list(rows[:world].unbind())
        dist.all_gather(gathered, padded, group=group)
    else:
        gathered = [torch.empty(width, device=device) for _ in range(world)]
        dist.all_gather(gathered, padded.to(device), group=group)
    # Magnitudes as (tensor, float32 bits) keys: bits of non-negative floats sort as values.
    owner = [np.repeat(np.arange(tensors, dtype=np.int64), above_floor[r]) for r in range(world)]
    bits = [g.cpu().numpy()[: sizes[r]].view(np.int32) for r, g in enumerate(gathered)]
    keys = take("shard_keys", int(sizes.sum()), torch.long).numpy()
    np.concatenate([(o << 32) | b for o, b in zip(owner, bits, strict=True)], out=keys)
    keys.sort()
    total_above, total_ties = above_floor.sum(axis=0), at_floor.sum(axis=0)
    ends = np.cumsum(total_above)
    inside = (total_above >= ks) & (ks > 0)  # the k-th largest is a candidate
    at_floor_only = ~inside & (total_above + total_ties >= ks) & (ks > 0)
    short = ~inside & ~at_floor_only & (ks > 0)
    threshold_bits = np.full(tensors, np.float32(np.inf).view(np.int32), dtype=np.int64)
    picked = keys[np.where(inside, ends - ks, 0)] & 0xFFFFFFFF if keys.size else threshold_bits
    threshold_bits = np.where(inside, picked, threshold_bits)
    threshold_bits = np.where(
        at_floor_only, floors.astype(np.float32).view(np.int32), threshold_bits
    )
    equal = np.zeros((world, tensors), dtype=np.int64)
    above = np.zeros((world, tensors), dtype=np.int64)
    for r in range(world):
        limit = threshold_bits[owner[r]]
        equal[r] = np.bincount(owner[r][bits[r] == limit], minlength=tensors)
        above[r] = np.bincount(owner[r][bits[r] > limit], minlength=tensors)
    equal = np.where(at_floor_only, at_floor, equal)
    above = np.where(at_floor_only, above_floor, above)
    before = equal[:rank].sum(axis=0)
    take = np.clip(ks - above.sum(axis=0) - before, 0, equal[rank])
    take = np.where(short | (ks <= 0), 0, take)
    kept = np.where(short | (ks <= 0), 0, above[rank] + take)
    thresholds = threshold_bits.astype(np.int32).view(np.float32)
    return ShardSelections(thresholds, take, kept, short)
