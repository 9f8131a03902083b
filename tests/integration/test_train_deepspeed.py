"""`omotool train --deepspeed` as CPU processes under torchrun (gloo, DS_ACCELERATOR=cpu).

ZeRO-1 in one process is the run without DeepSpeed bit for bit; ZeRO-2 and ZeRO-3 runs in 2
processes with `--merge none` end where the same run in one process without DeepSpeed ends,
save a model folder transformers loads, and a ZeRO-3 run resumed from its checkpoint ends
bit-identical to the uninterrupted one. With `--merge dare` ZeRO-1 and ZeRO-3 runs end where
the merging run in one process ends (ZeRO-3 also resumes bit-exactly), and in bf16 under ZeRO-3
where the bf16 run in one process ends, to the tolerances its test states; with `--merge ties`
a ZeRO-2 run ends where the 2-process run without DeepSpeed ends, and killed by SIGKILL after a
checkpoint and resumed it ends bit-identical. `--merge none` under ZeRO-2 ends where TRL's own
DPOTrainer with its default AdamW ends under the same config. Only the main process prints the
summary. (The first DeepSpeed use on a machine compiles a C++ communication op, about a minute,
cached in ~/.cache/torch_extensions.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from omotool.train.runner import TrainConfig, run_training
from tests.integration.test_distributed import free_port
from tests.integration.test_train import wait_for

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


def torchrun(arguments: list[str], processes: int = 2) -> tuple[list[str], dict[str, str]]:
    """The command line and environment running ``arguments`` (what follows torchrun's
    options) as ``processes`` CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
        str(processes), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip
    return [*launcher, *arguments], env


def launch(arguments: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``arguments`` run as ``processes`` CPU processes under torchrun, to the end."""
    command, env = torchrun(arguments, processes)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


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
    # Only the main process prints the summary (its title: "dpo with dare → OUT").
    assert done.stdout.count(f"{config.algo} with {config.merge}") == 1, done.stdout[-3000:]
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


def one_process_run(llama_pair, out: Path, **options: Any) -> dict[str, torch.Tensor]:
    """The parameters the run with ``options`` ends at in one process without DeepSpeed."""
    config = TrainConfig(
        model=str(llama_pair[1]), dataset=str(PREFS), out=str(out), **(SETTINGS | options)
    )
    assert run_training(config).steps == 3
    return parameters(out)


@pytest.fixture(scope="module")
def ondare_one_process(llama_pair, tmp_path_factory) -> dict[str, torch.Tensor]:
    return one_process_run(
        llama_pair, tmp_path_factory.mktemp("ondare"), **merging(llama_pair, "dare")
    )


def test_ondare_under_zero3_matches_one_process_and_resumes(
    llama_pair, tmp_path, ondare_one_process
) -> None:
    """Each partition's runs are merged as parts of their whole parameters (masks keyed by
    global offset, T cut from the whole parameter's), so the run ends where one process ends,
    to the tolerance of the --merge none runs (assert_matches_one_process says why not
    bit-equal); resumed from its checkpoint it ends bit-identical."""
    options = merging(llama_pair, "dare")
    config = two_process_run(llama_pair, tmp_path / "zero3", stage=3, **options)
    assert_matches_one_process(tmp_path / "zero3", ondare_one_process)
    assert_resumes_bit_exactly(tmp_path / "zero3", config)  # masks keyed by the step


def test_ondare_under_zero1_in_two_processes_matches_one_process(
    llama_pair, tmp_path, ondare_one_process
) -> None:
    """ZeRO-1 (gradients all-reduced whole, each rank steps its part of the flat group, a
    parameter straddling the two parts merged as one): as ZeRO-3, to the tolerance of
    assert_matches_one_process."""
    two_process_run(llama_pair, tmp_path / "zero1", stage=1, **merging(llama_pair, "dare"))
    assert_matches_one_process(tmp_path / "zero1", ondare_one_process)


def test_ondare_in_bf16_under_zero3_matches_one_process_in_bf16(llama_pair, tmp_path) -> None:
    """``--bf16`` (bfloat16 weights, float32 moments and master copy) under ZeRO-3 against
    the same run in one process without DeepSpeed, where OnlineMergingAdamW keeps the float32
    master copy. Both save bfloat16 weights; two tolerances, and why:

    - most entries within one bfloat16 step (rtol 2⁻⁷, the spacing at the bottom of a binade;
      atol 1e-5 near 0): the gradients are computed in bfloat16 (8 significant bits) and
      summed in another order over 2 processes, so the float32 masters differ by more than
      float32 rounding, and a master near the midpoint of two bfloat16 numbers rounds to
      either;
    - a few entries (at most 5% of a parameter's) by up to two merged updates a step: where
      the gradient is near 0 and the bfloat16 roundings differ in sign or cancel to 0 in one
      run only, Adam's normalised step (m / √v: ±lr whatever the gradient's size on the first
      step) goes another way, and OnDARE rescales a kept entry's step by 1 / reserve_p. Hence
      atol 2 · steps · lr / reserve_p for every entry.

    Measured (2026-12-02, 2-core AMD EPYC VM, no GPU): 0–2% of a parameter's entries beyond one
    bfloat16 step, the largest difference 0.0098 (two merged updates, lr / reserve_p = 0.005);
    the float32 runs of this file agree to 3e-6."""
    options = merging(llama_pair, "dare") | {"bf16": True}
    alone = one_process_run(llama_pair, tmp_path / "one", **options)
    two_process_run(llama_pair, tmp_path / "zero3", stage=3, **options)
    saved = parameters(tmp_path / "zero3")
    assert set(saved) == set(alone)
    merged_update = SETTINGS["lr"] / options["reserve_p"]
    for name, param in saved.items():
        expected = alone[name]
        assert param.to(torch.bfloat16).float().equal(param), name  # bfloat16 values
        beyond_rounding = (param - expected).abs() > 1e-5 + 2**-7 * expected.abs()
        assert beyond_rounding.float().mean() <= 0.05, (name, beyond_rounding.float().mean())
        bound = 2 * SETTINGS["max_steps"] * merged_update
        torch.testing.assert_close(param, expected, rtol=0, atol=bound, msg=name)


@pytest.fixture(scope="module")
def onties_zero2(llama_pair, tmp_path_factory) -> TrainConfig:
    """The OnTIES run under ``--deepspeed zero2`` over 2 processes, uninterrupted."""
    out = tmp_path_factory.mktemp("onties") / "zero2"
    return two_process_run(llama_pair, out, stage=2, **merging(llama_pair, "ties"))


def test_onties_under_zero2_matches_two_processes_without_deepspeed(
    llama_pair, tmp_path, onties_zero2
) -> None:
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
    ddp = dataclasses.replace(onties_zero2, out=str(tmp_path / "ddp"), deepspeed=None)
    done = train(ddp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    without = parameters(tmp_path / "ddp")
    for name, param in parameters(onties_zero2.out).items():
        assert torch.equal(param, without[name]), name


def test_onties_under_zero2_killed_after_a_checkpoint_resumes_bit_exactly(
    tmp_path, onties_zero2
) -> None:
    """The whole job (torchrun and both processes) killed by SIGKILL once checkpoint-2 is in
    place, as a lost node or the OOM killer would, then ``--resume``: the run ends bit-identical
    to the uninterrupted one (the DeepSpeed checkpoint holds each rank's partitions of the
    moments, the master weights and the optimizer's step count, which keys the merge)."""
    killed = dataclasses.replace(onties_zero2, out=str(tmp_path / "killed"))
    command, env = torchrun(["-m", "omotool", "train", *command_line(killed)])
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(Path(killed.out) / "checkpoint-2", job, timeout=300)  # as launch allows
    finally:
        # torchrun starts each rank in a session of its own: kill torchrun and every rank.
        ranks = psutil.Process(job.pid).children(recursive=True)
        for process in (psutil.Process(job.pid), *ranks):
            with contextlib.suppress(psutil.NoSuchProcess):  # (one that ended already)
                process.send_signal(signal.SIGKILL)
        job.wait()
        psutil.wait_procs(ranks, timeout=30)
    assert not (Path(killed.out) / "omotool.json").exists()  # it did not finish
    done = train(dataclasses.replace(killed, resume=True))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((Path(killed.out) / "omotool.json").read_text())
    assert record["steps"] == 3 and record["resumed_from"].endswith("checkpoint-2")
    whole = parameters(onties_zero2.out)
    for name, param in parameters(killed.out).items():
        assert torch.equal(param, whole[name]), name


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
