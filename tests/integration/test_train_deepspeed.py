"""`omotool train --deepspeed` as CPU processes under torchrun (gloo, DS_ACCELERATOR=cpu).

ZeRO-1 in one process is the run without DeepSpeed bit for bit; ZeRO-2 and ZeRO-3 runs in 2
processes with `--merge none` end where the same run in one process without DeepSpeed ends,
save a model folder transformers loads, and a ZeRO-3 run resumed from its checkpoint ends
bit-identical to the uninterrupted one. With `--merge dare` a ZeRO-3 run ends where the
merging run in one process ends and resumes bit-exactly; with `--merge ties` a ZeRO-2 run ends
where the 2-process run without DeepSpeed ends. `--merge none` under ZeRO-2 ends where TRL's
own DPOTrainer with its default AdamW ends under the same config. (The first DeepSpeed use on
a machine compiles a C++ communication op, about a minute, cached in ~/.cache/torch_extensions.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from omotool.train.runner import TrainConfig, run_training
from tests.integration.test_distributed import free_port

pytestmark = [
    pytest.mark.slow,  # torchrun: several processes
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no deepspeed"),
]

ROOT = Path(__file__).parents[2]
PREFS = ROOT / "recipes" / "data" / "tiny-prefs.jsonl"
# 3 DPO steps of 4 examples (2 per process), with a learning rate that moves every weight.
SETTINGS = dict(merge="none", lr=1e-3, batch_size=4, max_steps=3, max_length=32, save_steps=2)


def command_line(config: TrainConfig) -> list[str]:
    """``omotool train`` flags giving ``config`` (its options that differ from the defaults)."""
    defaults = TrainConfig()
    flags = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if value is True:
            flags.append(flag)
        elif value != getattr(defaults, field.name):
            flags += [flag, str(value)]
    return flags


def launch(arguments: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``arguments`` (what follows torchrun's options) run as ``processes`` CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
        str(processes), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip
    return subprocess.run(
        [*launcher, *arguments], env=env, capture_output=True, text=True, timeout=300
    )


def train(config: TrainConfig, processes: int = 2) -> subprocess.CompletedProcess:
    """``config`` trained by ``processes`` CPU processes under torchrun."""
    return launch(["-m", "omotool", "train", *command_line(config)], processes)


def parameters(folder: Path | str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {name: param.detach() for name, param in model.named_parameters()}


@pytest.fixture(scope="module")
def one_process(llama_pair, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The run in one process without DeepSpeed: both processes' batches together."""
    out = tmp_path_factory.mktemp("one")
    config = TrainConfig(model=str(llama_pair[1]), dataset=str(PREFS), out=str(out), **SETTINGS)
    assert run_training(config).steps == 3
    return parameters(out)


def two_process_run(llama_pair, out: Path, stage: int, **merging: Any) -> TrainConfig:
    """The run under ``--deepspeed zero{stage}``, checked against what omotool.json says."""
    config = TrainConfig(
        model=str(llama_pair[1]), dataset=str(PREFS), out=str(out), deepspeed=f"zero{stage}",
        **(SETTINGS | {"batch_size": 2} | merging),
    )  # fmt: skip
    done = train(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "omotool.json").read_text())
    assert record["steps"] == 3
    assert record["deepspeed"]["zero_stage"] == stage and record["deepspeed"]["world_size"] == 2
    assert json.loads((out / "deepspeed.json").read_text()) == record["deepspeed"]
    # OnlineMergingAdamW stepped DeepSpeed's flat partitions (the CPU backend ran)
    assert record["optimizer_backend"] == "cpu"
    return config


def assert_matches_one_process(out: Path, one_process: dict[str, torch.Tensor]) -> None:
    """The saved folder loads as a float32 model equal to the one-process run's.

    Not bit-equal: the processes' gradients are averaged by a reduce-scatter/all-reduce, in
    another summation order than one process's batch mean, so gradients differ in float32's
    last bits, and Adam's step (m / sqrt(v), whose magnitude is lr whatever the gradient's)
    carries such differences into the weights. Measured: ≤ 3e-6 after 3 steps that move
    each weight by ≈ 2e-3 (lr 1e-3); the bound is the one DDP's test uses.
    """
    saved = parameters(out)
    assert set(saved) == set(one_process)
    for name, param in saved.items():
        assert param.dtype == torch.float32 and param.shape == one_process[name].shape
        torch.testing.assert_close(param, one_process[name], rtol=1e-4, atol=1e-5)


def assert_resumes_bit_exactly(out: Path, config: TrainConfig) -> TrainConfig:
    """As if stopped after checkpoint-2: the resumed run ends where the whole one did."""
    uninterrupted = parameters(out)
    shutil.rmtree(out / "checkpoint-3")
    for name in ("model.safetensors", "omotool.json"):
        (out / name).unlink()
    resumed = dataclasses.replace(config, resume=True)
    done = train(resumed)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "omotool.json").read_text())["resumed_from"].endswith("checkpoint-2")
    for name, param in parameters(out).items():
        assert torch.equal(param, uninterrupted[name]), name
    return resumed


def test_zero1_in_one_process_is_the_plain_run_bit_for_bit(llama_pair, tmp_path, one_process):
    """One process: no gradient is reduced, and the optimizer's step on DeepSpeed's flat
    partition is elementwise the same as on each parameter."""
    config = TrainConfig(
        model=str(llama_pair[1]), dataset=str(PREFS), out=str(tmp_path), deepspeed="zero1",
        **SETTINGS,
    )  # fmt: skip
    done = train(config, processes=1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "omotool.json").read_text())["deepspeed"]["zero_stage"] == 1
    for name, param in parameters(tmp_path).items():
        assert torch.equal(param, one_process[name]), name


def test_zero2_matches_one_process(llama_pair, tmp_path, one_process) -> None:
    two_process_run(llama_pair, tmp_path / "zero2", stage=2)
    assert_matches_one_process(tmp_path / "zero2", one_process)
    assert (tmp_path / "zero2" / "checkpoint-2" / "global_step2").is_dir()


def test_zero3_matches_one_process_and_resumes_bit_exactly(
    llama_pair, tmp_path, one_process
) -> None:
    out = tmp_path / "zero3"
    config = two_process_run(llama_pair, out, stage=3)
    assert_matches_one_process(out, one_process)  # the gathered weights, not partitions
    resumed = assert_resumes_bit_exactly(out, config)
    # Its optimizer state is partitioned over 2 processes: one process may not resume it.
    alone = train(resumed, processes=1)
    assert alone.returncode != 0, alone.stderr[-3000:]  # torchrun's code for a failed rank
    assert "made by 2 DeepSpeed processes, this one has 1" in alone.stdout + alone.stderr


def merging(llama_pair, method: str) -> dict[str, Any]:
    """The options of a merging run: τ from the pair's base, a kept fraction and an α large
    enough that the merge moves the weights by more than the runs may differ."""
    return dict(merge=method, base=str(llama_pair[0]), reserve_p=0.2, alpha=0.01)


def test_ondare_under_zero3_matches_one_process_and_resumes(llama_pair, tmp_path) -> None:
    """Each partition's runs are merged as parts of their whole parameters (masks keyed by
    global offset, T cut from the whole parameter's), so the run ends where one process ends,
    to the tolerance of the --merge none runs (assert_matches_one_process says why not
    bit-equal); resumed from its checkpoint it ends bit-identical."""
    options = merging(llama_pair, "dare")
    alone = TrainConfig(
        model=str(llama_pair[1]), dataset=str(PREFS), out=str(tmp_path / "one"),
        **(SETTINGS | options),
    )  # fmt: skip
    assert run_training(alone).steps == 3
    config = two_process_run(llama_pair, tmp_path / "zero3", stage=3, **options)
    assert_matches_one_process(tmp_path / "zero3", parameters(tmp_path / "one"))
    assert_resumes_bit_exactly(tmp_path / "zero3", config)  # masks keyed by the step


def test_onties_under_zero2_matches_two_processes_without_deepspeed(llama_pair, tmp_path):
    """OnTIES's top-k of the whole parameter across the partitions.

    Compared with the 2-process run without DeepSpeed (DDP), not with one process: a top-k is
    discontinuous, and Adam's first update is ±lr almost everywhere, so the last-bit gradient
    differences of another reduction order (see assert_matches_one_process) swap a few entries
    at the threshold (measured against one process: ~0.3% of entries, each off by one update,
    lr·(1 − α)). With 2 processes both runs sum the same two gradients (a + b, exact in either
    order; DDP's mean and ZeRO's pre-division by 2 are exact), so the kept sets are the same
    and the runs end bit for bit equal (the gradients' norm stays under the clipping bound,
    which the two compute in other orders).
    """
    options = merging(llama_pair, "ties")
    ddp = TrainConfig(
        model=str(llama_pair[1]), dataset=str(PREFS), out=str(tmp_path / "ddp"),
        **(SETTINGS | {"batch_size": 2} | options),
    )  # fmt: skip
    done = train(ddp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two_process_run(llama_pair, tmp_path / "zero2", stage=2, **options)
    without = parameters(tmp_path / "ddp")
    for name, param in parameters(tmp_path / "zero2").items():
        assert torch.equal(param, without[name]), name


# omotool's run with TRL's own trainer class in place of omotool's: TRL's DPOTrainer, which
# builds the optimizer its arguments name (``optim``, transformers' default), under the same
# DeepSpeed config, data and arguments.
TRL_OWN_TRAINER = """
import json, sys
from omotool.train import runner

def own(trainer_class, task_vector=None, **options):
    class Own(trainer_class):  # TRL's trainer, saying which optimizer it built
        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            fused = optimizer.defaults.get("fused")
            name = getattr(self.args.optim, "value", self.args.optim)
            print("TRL optimizer:", name, type(optimizer).__name__, "fused", fused)
            return optimizer
    return Own

runner.online_merging_trainer = own
runner.run_training(runner.TrainConfig(**json.loads(sys.argv[1])))
"""


def test_merge_none_under_zero2_ends_where_trls_own_deepspeed_run_ends(llama_pair, tmp_path):
    """``--merge none`` (OnlineMergingAdamW as AdamW on DeepSpeed's flat partitions) against
    TRL's DPOTrainer with its default optimizer (transformers' ``adamw_torch_fused``:
    ``torch.optim.AdamW(fused=True)``), both under ``--deepspeed zero2`` over 2 processes, on
    the same data and arguments: equal to the tolerance of assert_matches_one_process.
    Measured (2026-12-01, CPU): bit-identical (max |difference| 0 where the weights moved by
    up to 2e-3); the tolerance allows for a fused kernel that rounds otherwise elsewhere."""
    ours = two_process_run(llama_pair, tmp_path / "omotool", stage=2)
    theirs = dataclasses.replace(ours, out=str(tmp_path / "trl"))
    done = launch(
        ["--no-python", sys.executable, "-c", TRL_OWN_TRAINER,
         json.dumps(dataclasses.asdict(theirs))]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TRL optimizer: adamw_torch_fused AdamW fused True" in done.stdout
    assert json.loads((tmp_path / "trl" / "omotool.json").read_text())["steps"] == 3
    assert_matches_one_process(tmp_path / "omotool", parameters(tmp_path / "trl"))
