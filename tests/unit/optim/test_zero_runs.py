"""The parts of omotool.optim.zero_runs that need no DeepSpeed run (those: test_zero_runs in
tests/integration, under torchrun)."""

from __future__ import annotations

import pytest
import torch

from omotool.errors import UsageError
from omotool.optim.zero_runs import Run, ZeroRuns, run_views, zero_runs


def test_run_views_are_views_of_the_flat_tensor() -> None:
    flat = torch.arange(10.0)
    runs = [Run("a", start=3, offset=0, length=4), Run("b", start=0, offset=5, length=5)]
    views = list(run_views(flat, runs))
    assert [run for run, _ in views] == runs
    assert torch.equal(views[0][1], flat[0:4]) and torch.equal(views[1][1], flat[5:10])
    views[1][1].zero_()  # writes reach the flat tensor
    assert flat[5:].eq(0).all() and flat[4] == 4


def test_runs_are_found_by_identity_only() -> None:
    flat = torch.zeros(4)
    runs = ZeroRuns(1, 0, 2, (flat,), ((Run("a", 0, 0, 4),),), {})
    assert runs.of(flat) == (Run("a", 0, 0, 4),)
    with pytest.raises(UsageError, match="did not hand out"):
        runs.of(flat.clone())  # equal values, another tensor


def test_a_plain_optimizer_is_refused_by_name() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UsageError, match="SGD is not a DeepSpeed ZeRO"):
        zero_runs(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
