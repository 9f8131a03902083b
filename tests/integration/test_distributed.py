"""2-process CPU (gloo) runs under torchrun: DDP and FSDP2 end where one process ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # torchrun: several processes

WORKER = Path(__file__).with_name("dist_worker.py")
METHODS = (
    "dare", "ties", "dare+sync_free", "ties+sync_free", "dare+triton", "ties+triton",
    "dare+norm", "ties+sync_free+norm",
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    # Each launch gets its own free port: two concurrent `--standalone` launches would both
    # rendezvous on the default port, and one of them aborts.
    commands = [[sys.executable, str(WORKER), "single", str(out)]] + [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), mode,
         str(out)]
        for mode in ("ddp", "fsdp")
    ]  # fmt: skip
    processes = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    for command, process in zip(commands, processes, strict=True):
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            (out / "failed.log").write_text(output)
            errors = [line for line in output.splitlines() if "rror" in line or "what()" in line]
            pytest.fail(f"{command[3:]} exited {process.returncode}:\n" + "\n".join(errors[:40]))
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load(runs: Path, method: str, mode: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(runs / f"{method}-{mode}-rank{rank}.safetensors"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ranks_hold_identical_parameters(runs, method, mode) -> None:
    rank0, rank1 = load(runs, method, mode, 0), load(runs, method, mode, 1)
    assert set(rank0) == set(rank1)
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_end_where_one_ends(runs, method, mode) -> None:
    single, sharded = load(runs, method, "single"), load(runs, method, mode)
    assert set(single) == set(sharded)
    for name in single:
        assert torch.allclose(sharded[name], single[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("method", ["ties"])
def test_the_sync_free_path_ends_where_the_cpu_path_ends(runs, method) -> None:
    # The path a GPU takes (device-side NaN check, all-reduced flag, collectives on the
    # group's device), here on gloo: the same parameters as the CPU path, to rounding.
    # (OnDARE: the CPU backend draws its masks by chunks, other draws; the sync-free path
    # against itself in one process is test_two_ranks_end_where_one_ends.)
    cpu, sync_free = load(runs, method, "single"), load(runs, f"{method}+sync_free", "fsdp")
    for name in cpu:
        assert torch.allclose(sync_free[name], cpu[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("mode", ["single", "fsdp"])
def test_the_triton_kernels_end_where_the_cpu_path_ends(runs, mode) -> None:
    # OnTIES keeps the same entries in every backend; under FSDP the Triton backend sums the
    # radix-select histograms over the ranks. (OnDARE's Triton masks are other draws.)
    cpu, triton = load(runs, "ties", "single"), load(runs, "ties+triton", mode)
    for name in cpu:
        assert torch.allclose(triton[name], cpu[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("method", ["dare+norm", "ties+sync_free+norm"])
@pytest.mark.parametrize("mode", ["single", "ddp", "fsdp"])
def test_a_given_gradient_norm_changes_nothing(runs, method, mode) -> None:
    # note_grad_norm with clip_grad_norm_'s result (under FSDP2 a DTensor, its local part
    # used, the verdict all-reduced as without it): the same steps as the optimizer's own
    # NaN check, bit for bit.
    given, checked = load(runs, method, mode), load(runs, method.removesuffix("+norm"), mode)
    assert all(torch.equal(given[name], checked[name]) for name in checked)


def test_sharded_top_k_equals_whole_tensor_top_k_with_ties(runs) -> None:
    # Written by the FSDP run: every rank's mask equals its part of the single-process mask.
    for rank in (0, 1):
        assert (runs / f"topk-rank{rank}.ok").read_text() == "ok"


@pytest.mark.parametrize("method", METHODS)
def test_training_moved_the_parameters(runs, method) -> None:
    # Guards against a vacuous comparison: all runs must differ from the initial model.
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import build_model

    initial = dict(build_model().named_parameters())
    single = load(runs, method, "single")
    moved = sum(int((single[n] != initial[n].detach()).sum()) for n in single)
    assert moved > 0
