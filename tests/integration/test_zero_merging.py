"""OnlineMergingAdamW on DeepSpeed ZeRO-2/3 partitions (2 or 3 CPU processes, gloo) merges each
parameter as the unsharded optimizer does, a parameter straddling the ranks included: OnTIES's
kept set and OnDARE's masks are those of the whole parameter (the worker's docstring says how).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_zero_runs import free_port

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # torchrun: two processes

WORKER = Path(__file__).with_name("zero_merging_worker.py")


@pytest.mark.parametrize("processes", [2, 3])  # 3: a rank holds nothing of a shared parameter
def test_zero_partitions_merge_as_the_unsharded_optimizer(processes: int) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(WORKER.parents[2]),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(WORKER),
    ]  # fmt: skip
    process = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    if process.returncode != 0:
        errors = [
            line for line in process.stdout.splitlines() if "rror" in line or "Greatest" in line
        ]
        pytest.fail(f"the worker exited {process.returncode}:\n" + "\n".join(errors[:40]))
