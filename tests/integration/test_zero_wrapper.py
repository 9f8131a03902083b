"""``OnlineMerging`` (any inner optimizer) on DeepSpeed ZeRO-2/3 partitions (2 CPU processes,
gloo) merges each parameter as the unsharded wrapper does (the worker's docstring says how)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_train_deepspeed import launch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # torchrun: two processes

WORKER = Path(__file__).with_name("zero_wrapper_worker.py")


def test_wrapper_on_zero_partitions_merges_as_unsharded() -> None:
    done = launch([str(WORKER)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "zero wrapper: all equal" in done.stdout
