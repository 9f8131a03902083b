"""scripts/gpu-check.sh (the GPU acceptance run): its syntax, its dry run, its refusal without CUDA.

The run itself needs a CUDA GPU; see docs/gpu.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu-check.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def test_the_script_parses() -> None:
    done = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_dry_run_prints_every_step_and_runs_nothing(tmp_path) -> None:
    done = run("--dry-run", GPU_CHECK_WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "--no-index --no-deps --no-build-isolation -e ." in out
    assert "-m pytest -q -m cuda" in out
    for dtype in ("float32", "bfloat16"):
        assert "--device cuda --shapes qwen2.5-1.5b" in out and f"--dtype {dtype}" in out
    assert "[bench-given-norm]" in out and "ondare-triton-given-norm" in out
    for merge in ("none", "dare", "ties"):
        assert f"[train-ddp-{merge}]" in out and f"[train-fsdp-{merge}]" in out
    assert out.count("torch.distributed.run --standalone --nnodes 1 --nproc_per_node 1") == 10
    assert "[train-grpo-ties]" in out and "--algo grpo --merge ties" in out
    assert "[train-fsdp-ties-triton]" in out and "--fsdp --optimizer-backend triton" in out
    assert "[train-zero2-ties]" in out and "--merge ties" in out and "--deepspeed zero2" in out
    assert "[train-zero3-dare]" in out and "--deepspeed zero3" in out
    assert "[triton-tests]" in out and "tests/unit/optim/test_triton_backend.py" in out
    assert "eval" in out and "--device cuda --json" in out
    assert "| step | status | seconds | key figure |" in out
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path) -> None:
    done = run(GPU_CHECK_WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"))
    assert done.returncode == 2
    assert "gpu-check: no CUDA device" in done.stderr and "nothing was run" in done.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_an_unknown_argument_is_refused() -> None:
    done = run("--bogus")
    assert done.returncode == 64 and "unknown argument --bogus" in done.stderr
