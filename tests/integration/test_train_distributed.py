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


def launch_two_ranks(config: TrainConfig, folder: Path) -> list[dict[str, torch.Tensor]]:
    """``config`` trained by 2 CPU processes under torchrun (gloo); each rank's parameters at
    the end, after checking that both ranks took ``max_steps`` steps, ended bit-identical, and
    that the saved model is theirs."""
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
        str(config_path), str(folder),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    facts = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = config.max_steps
    assert [f["world_size"] for f in facts] == [2, 2] and [f["steps"] for f in facts] == [steps] * 2
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    saved = AutoModelForCausalLM.from_pretrained(config.out, dtype=torch.float32)
    assert all(torch.equal(p, ranks[0][n]) for n, p in saved.named_parameters())
    return ranks


def test_ddp_ranks_end_bit_identical_and_match_one_process(llama_pair, tmp_path) -> None:
    config = settings(llama_pair, tmp_path / "ddp")
    ranks = launch_two_ranks(config, tmp_path)
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


def test_grpo_with_ondare_under_ddp(llama_pair, tmp_path) -> None:
    """Online RL as 2 processes: each samples completions for its own prompts, the gradients
    are averaged, and OnDARE's masks agree, so the ranks end bit-identical."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"{a} + {b} =", "reference": str(a + b)} for a in range(4) for b in range(4)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = settings(
        llama_pair, tmp_path / "grpo", algo="grpo", dataset=str(prompts), reward=["last_number"],
        num_generations=4, max_completion_length=4, max_length=1024,
    )  # fmt: skip
    launch_two_ranks(config, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2, 3]
    assert all("merge/kept_fraction" in r for r in logged if "reward" in r)
