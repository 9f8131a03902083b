"""The ``cpu`` backend's batched OnTIES step over shards: one top-k agreement per batch.

A shard (an FSDP2 shard, a DeepSpeed ZeRO run of a parameter that other ranks also hold:
``TensorStep.shard``) keeps the entries of its whole tensor's top-k that it holds. In the
batched step (``kernels.ties_steps_``) the ranks agree on every shard's selection at once
(``ShardTopK``), with three collectives per process group and batch however many shards it
holds (``optim.distributed``):

1. each rank draws a sampled floor for its share of k, and the least of the ranks' floors is
   the whole tensor's (one all-reduce of all the floors): every entry of the whole top-k is
   above it or equal to it on some rank;
2. each rank collects its entries above that floor (the kernel's candidates, as unsharded)
   and the ranks gather each other's counts and candidates (two all-gathers), from which each
   finds the same k-th largest magnitude and its own share of the ties at it (ties to the
   lowest global indices, lower ranks holding lower offsets).

The batch is the same on every rank: its shards are those of the step's tensors, in the
tensors' order, which every rank shares, and whether a shard joins it depends only on the
options and on the form of ``T`` (which every rank cuts alike), never on local sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from omotool.optim.distributed import Shard, agree_floors_, sharded_thresholds
from omotool.optim.functional import Workspace
from omotool.optim.kernels import Candidates, Selection

_NOTHING = np.int32(0x7FFFFFFF)  # a threshold no magnitude reaches (cpu_kernels.MAGNITUDE_BITS)


class ShardTopK:
    """``kernels.SharedTopK`` for the shards among a batch's tensors (``shards[t]``: tensor
    t's shard, or None for a whole tensor). After the step, ``kept[t]`` is how many entries
    shard t kept here and ``short[t]`` whether it was left to the caller."""

    def __init__(self, shards: list[Shard | None], workspace: Workspace) -> None:
        self.shards = shards
        self.workspace = workspace
        self.groups: dict[int, tuple[Any, list[int]]] = {}  # in order of first appearance
        for t, shard in enumerate(shards):
            if shard is not None:
                self.groups.setdefault(id(shard.group), (shard.group, []))[1].append(t)
        self.whole_keep: list[int] = []
        self.kept: dict[int, int] = {}

    def mask(self, count: int) -> np.ndarray:
        return np.array([shard is not None for shard in self.shards[:count]], dtype=np.bool_)

    def floor_keep(self, keep: list[int], sizes: np.ndarray) -> list[int]:
        self.whole_keep = list(keep)
        return [
            k if shard is None else math.ceil(k * int(n) / shard.numel)
            for k, n, shard in zip(keep, sizes, self.shards, strict=True)
        ]

    def floors_(self, floors: np.ndarray, sizes: np.ndarray) -> None:
        for group, positions in self.groups.values():
            mine = [float(floors[t]) if sizes[t] else math.inf for t in positions]
            agreed = torch.tensor(mine, dtype=torch.float32)
            agree_floors_(agreed, group)
            floors[positions] = agreed.numpy()

    def select_(self, candidates: Candidates, selection: Selection) -> None:
        c = candidates
        short, thresholds = selection.short, selection.thresholds
        cutoffs, tie_keep = selection.cutoffs, selection.tie_keep
        for group, positions in self.groups.values():
            tensors = np.asarray(positions, dtype=np.int64)
            firsts, lasts = c.item_first[tensors], c.item_first[tensors + 1]
            items = np.concatenate([np.arange(a, z) for a, z in zip(firsts, lasts, strict=True)])
            item_owner = np.repeat(np.arange(tensors.size), lasts - firsts)
            held = c.counts[items]
            # Every item's candidates, tensor after tensor (in index order), as one gather.
            starts = c.base[tensors[item_owner]] + c.item_start[items]
            steps = np.repeat(starts - (np.cumsum(held) - held), held)
            at = steps + np.arange(int(held.sum()))
            owner = np.repeat(item_owner, held)
            magnitudes = np.abs(c.out_v[at])
            per_tensor = np.bincount(item_owner, weights=held, minlength=tensors.size)
            ties = np.bincount(item_owner, weights=c.ties[items], minlength=tensors.size)
            found = sharded_thresholds(
                magnitudes, per_tensor.astype(np.int64), ties.astype(np.int64),
                c.floors[tensors], np.asarray([self.whole_keep[t] for t in positions]), group,
                self._take,
            )  # fmt: skip
            at_floor = found.thresholds == c.floors[tensors]  # ties counted, not candidates
            nothing = found.short | (found.kept == 0)
            thresholds[tensors] = np.where(nothing, _NOTHING, found.thresholds.view(np.int32))
            short[tensors] = found.short
            tie_keep[items] = 0
            cutoffs[tensors] = -1
            # A tensor's last kept candidate equal to the threshold (ties by index).
            equal = magnitudes == found.thresholds[owner]
            order = np.cumsum(equal) - _first_counts(equal, owner, tensors.size)
            last = equal & (order == found.ties[owner]) & ~at_floor[owner] & ~nothing[owner]
            cutoffs[tensors[owner[last]]] = c.out_i[at[last]]
            for j, t in enumerate(positions):
                self.kept[t] = int(found.kept[j])
                if at_floor[j] and not nothing[j] and found.ties[j]:
                    a, z = firsts[j], lasts[j]
                    _share_in_order(c.ties[a:z], int(found.ties[j]), tie_keep[a:z])

    def _take(self, purpose: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.workspace.take(purpose, numel, dtype, torch.device("cpu"))


def _first_counts(flags: np.ndarray, owner: np.ndarray, tensors: int) -> np.ndarray:
    """Per entry: how many ``flags`` precede its tensor's first entry (``owner``: the tensor of
    each entry, ascending), so that a running count minus it counts within the tensor."""
    before = np.zeros(tensors + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[flags], minlength=tensors), out=before[1:])
    return before[owner]


def _share_in_order(counts: np.ndarray, quota: int, shares: np.ndarray) -> None:
    """``shares[c]``: how many of ``counts[c]`` the first ``quota`` take, in order
    (``cpu_kernels.share_in_order``)."""
    for i, count in enumerate(counts):
        shares[i] = min(int(count), quota)
        quota -= int(shares[i])
