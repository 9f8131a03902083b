"""DeepSpeed ZeRO-1/2/3 on 2 CPU processes (gloo): the flat tensors' runs tile every parameter.

The worker checks, on each rank, what needs the live tensors (each run's view holds the
parameter's values, runs built twice are equal, ``step()`` sees only described flat tensors);
here the two ranks' runs are checked together.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # torchrun: two processes

WORKER = Path(__file__).with_name("zero_runs_worker.py")
# label -> ZeRO stage (the worker's setups: "rr" round-robin gradients, "bf16" bf16 parameters)
SETUPS = {
    "stage1": 1, "stage2": 2, "stage2rr": 2, "stage3": 3,
    "stage1bf16": 1, "stage2bf16": 2, "stage3bf16": 3,
}  # fmt: skip
WORLD = 2


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("zero_runs")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(WORKER.parents[2]),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
        str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
        str(out),
    ]  # fmt: skip
    process = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    if process.returncode != 0:
        errors = [line for line in process.stdout.splitlines() if "rror" in line]
        pytest.fail(f"the worker exited {process.returncode}:\n" + "\n".join(errors[:40]))
    return {
        label: [json.loads((out / f"{label}-rank{rank}.json").read_text()) for rank in range(WORLD)]
        for label in SETUPS
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def covered(ranks: list[dict]) -> dict[str, list[tuple[int, int, int]]]:
    """name -> sorted ``(start, end, rank)`` of every run on every rank."""
    pieces: dict[str, list[tuple[int, int, int]]] = {}
    for record in ranks:
        for flat_runs in record["runs"]:
            for run in flat_runs:
                piece = (run["start"], run["start"] + run["length"], record["rank"])
                pieces.setdefault(run["name"], []).append(piece)
    return {name: sorted(found) for name, found in pieces.items()}


@pytest.mark.parametrize("label", SETUPS)
def test_ranks_agree_on_the_setup(records, label) -> None:
    rank0, rank1 = records[label]
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["stage"] == rank1["stage"] == SETUPS[label]
    assert rank0["world_size"] == rank1["world_size"] == WORLD
    assert rank0["params"] == rank1["params"]
    assert sum(rank0["step_calls"]) == len(rank0["flat_numels"])  # each flat stepped once


@pytest.mark.parametrize("label", SETUPS)
def test_how_step_is_called(records, label) -> None:
    # The ZeRO optimizers call step() once per group (sub-group under ZeRO-3), with param_groups
    # cut to that group; bf16 ZeRO-1 with fp32 gradient accumulation calls it once for all.
    groups = len(records[label][0]["flat_numels"])
    expected = [groups] if label == "stage1bf16" else [1] * groups
    assert records[label][0]["step_calls"] == expected


@pytest.mark.parametrize("label", SETUPS)
def test_runs_tile_every_parameter_exactly_once(records, label) -> None:
    params = records[label][0]["params"]
    pieces = covered(records[label])
    assert set(pieces) == set(params)
    assert "frozen.weight" not in params  # DeepSpeed does not hand frozen parameters over
    for name, layout in params.items():
        assert layout["numel"] == prod(layout["shape"]), name
        position = 0
        for start, end, _ in pieces[name]:
            assert start == position and end > start, f"{name}: a gap or an overlap at {start}"
            position = end
        assert position == layout["numel"], f"{name}: ends at {position} of {layout['numel']}"
        assert sorted({rank for _, _, rank in pieces[name]}) == layout["ranks"], name


@pytest.mark.parametrize("label", SETUPS)
def test_runs_of_a_flat_tensor_are_disjoint_and_inside_it(records, label) -> None:
    for record in records[label]:
        for numel, flat_runs in zip(record["flat_numels"], record["runs"], strict=True):
            spans = sorted((run["offset"], run["offset"] + run["length"]) for run in flat_runs)
            assert all(
                end <= following for (_, end), (following, _) in zip(spans, spans[1:], strict=False)
            )
            assert all(begin >= 0 and end <= numel for begin, end in spans)


@pytest.mark.parametrize("label", ["stage1", "stage2", "stage2rr", "stage1bf16", "stage2bf16"])
def test_a_parameter_straddles_the_two_ranks(records, label) -> None:
    params = records[label][0]["params"]
    assert any(layout["ranks"] == [0, 1] for layout in params.values())
    assert any(len(layout["ranks"]) == 1 for layout in params.values())


def test_round_robin_reorders_the_partition(records) -> None:
    # The reordering is real here, so the round-robin setup tests another layout.
    def layout(label: str) -> list:
        return [[run["name"] for run in flat] for flat in records[label][0]["runs"]]

    assert layout("stage2rr") != layout("stage2")


@pytest.mark.parametrize("label", ["stage3", "stage3bf16"])
def test_stage3_splits_every_parameter_over_both_ranks(records, label) -> None:
    params = records[label][0]["params"]
    assert all(layout["ranks"] == [0, 1] for layout in params.values())
    assert len(records[label][0]["flat_numels"]) > 1  # several sub-groups


def prod(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
