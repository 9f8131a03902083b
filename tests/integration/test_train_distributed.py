"""`omotool train` as 2 CPU processes under torchrun (gloo): DDP ranks stay bit-identical."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from omotool.errors import UsageError
from omotool.train.runner import TrainConfig, run_training
from tests.integration.test_distributed import free_port

pytestmark = pytest.mark.slow  # torchrun: several processes

WORKER = Path(__file__).with_name("train_dist_worker.py")
PREFS = Path(__file__).parents[2] / "recipes" / "data" / "tiny-prefs.jsonl"


def settings(llama_pair, out: Path, **options) -> TrainConfig:
    base, sft = llama_pair
    values = dict(
        model=str(sft), base=str(base), dataset=str(PREFS), out=str(out), merge="dare",
        lr=1e-3, batch_size=4, max_steps=3, reserve_p=0.2, alpha=0.01, max_length=32,
    )  # fmt: skip
    return TrainConfig(**(values | options))


def test_ddp_ranks_end_bit_identical_and_match_one_process(llama_pair, tmp_path) -> None:
    config = settings(llama_pair, tmp_path / "ddp")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
        str(config_path), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [f["world_size"] for f in facts] == [2, 2] and [f["steps"] for f in facts] == [3, 3]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ddp"), dtype=torch.float32)
    assert all(torch.equal(p, ranks[0][n]) for n, p in saved.named_parameters())
    # One process with the two ranks' batches together (2 x 4) takes the same steps.
    single = run_training(dataclasses.replace(config, out=str(tmp_path / "one"), batch_size=8))
    assert single.steps == 3
    alone = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"), dtype=torch.float32)
    for name, param in alone.named_parameters():
        torch.testing.assert_close(param, ranks[0][name], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusal")
def test_fsdp_on_cpu_processes_is_refused_clearly(llama_pair, tmp_path) -> None:
    with pytest.raises(UsageError, match="accelerate runs FSDP only on GPU"):
        run_training(settings(llama_pair, tmp_path / "fsdp", fsdp=True))
