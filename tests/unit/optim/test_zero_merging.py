"""The pieces ``optim.zero_merging`` cuts a ZeRO flat tensor into (no process group needed:
the group is given); the merge itself is checked against the unsharded optimizer under torchrun
(tests/integration/test_zero_merging.py)."""

from __future__ import annotations

import re

import pytest
import torch

from omotool.errors import UsageError
from omotool.optim.functional import MergeOptions
from omotool.optim.task_vector import FlatDelta
from omotool.optim.zero_merging import Piece, set_up_zero_merging, zero_pieces
from omotool.optim.zero_runs import ParamLayout, Run, ZeroRuns

GROUP = object()  # stands for the data-parallel process group


def three_rank_runs() -> tuple[ZeroRuns, torch.Tensor]:
    """Rank 1 of 3: ``a`` (12 elements) is held by ranks 0 and 1, ``b`` (5) by rank 1 alone,
    ``c`` (9) by ranks 0 and 2 (rank 1 holds none of it); the
    flat tensor has 2 elements of padding at the end."""
    flat = torch.zeros(12)
    runs = (Run("a", start=7, offset=0, length=5), Run("b", start=0, offset=5, length=5))
    params = {
        "a": ParamLayout(12, (3, 4), (0, 1)),
        "b": ParamLayout(5, (5,), (1,)),
        "c": ParamLayout(9, (9,), (0, 2)),
    }
    return ZeroRuns(2, 1, 3, (flat,), (runs,), params, (("a", "b", "c"),), GROUP), flat


def test_pieces_follow_the_shared_order_with_shards_padding_and_parts_of_t() -> None:
    runs, flat = three_rank_runs()
    tau = {name: torch.arange(layout.numel, dtype=torch.float32) + 1 for name, layout in
           runs.params.items()}  # fmt: skip
    references = {name: FlatDelta.from_dense(values) for name, values in tau.items()}
    pieces = zero_pieces(runs, references, whole_update=True)[id(flat)].pieces
    a, b, c, padding = pieces
    assert (a.name, a.offset, a.length) == ("a", 0, 5)
    assert a.shard is not None and (a.shard.numel, a.shard.offset, a.shard.group) == (12, 7, GROUP)
    assert torch.equal(a.reference.to_dense(), tau["a"][7:12])
    assert b.shard is None and torch.equal(b.reference.to_dense(), tau["b"])  # held whole
    # c: held by others only; an empty piece takes part in their top-k collectives
    assert (c.name, c.length) == ("c", 0) and c.shard is not None and c.reference.numel == 0
    assert padding == Piece("", 10, 2, None, None)


def test_rules_that_read_only_kept_entries_skip_parameters_held_elsewhere() -> None:
    runs, flat = three_rank_runs()
    references = {"a": FlatDelta.from_dense(torch.ones(12))}  # b and c: no T (plain AdamW)
    pieces = zero_pieces(runs, references, whole_update=False)[id(flat)].pieces
    assert [(p.name, p.offset, p.length) for p in pieces] == [("a", 0, 5), ("b", 5, 5), ("", 10, 2)]
    assert pieces[1].reference is None


@pytest.mark.parametrize(
    ("options", "backend", "message"),
    [
        (MergeOptions(method="dare", rescale="l1"), "auto", "rescale='l1' is not supported"),
        (MergeOptions(method="ties"), "triton", "backend='triton' is not supported"),
    ],
)
def test_what_partitions_do_not_do_is_refused_by_name(options, backend, message) -> None:
    runs, _ = three_rank_runs()
    with pytest.raises(UsageError, match=re.escape(message)):
        set_up_zero_merging(runs, {}, options, backend)
