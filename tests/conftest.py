"""Shared fixtures: tiny real models built from configs (no downloads), and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels (the optimizer's ``triton`` backend) run in Triton's interpreter
# on CPU tensors; set before any kernel module is imported (``triton.jit`` reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from typer.testing import CliRunner

from omotool.cli import app
from omotool.tiny_models import build_pair


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Untied Llama base + SFT, single-file safetensors."""
    return build_pair(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="session")
def sharded_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Llama base + SFT stored as several shards with an index."""
    return build_pair(tmp_path_factory.mktemp("sharded"), arch="llama", max_shard_size="100KB")


@pytest.fixture(scope="session")
def tied_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Qwen2 with tied embeddings: no lm_head.weight on disk."""
    return build_pair(tmp_path_factory.mktemp("qwen2"), arch="qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """GPT-2 (tied, transformer.* names)."""
    return build_pair(tmp_path_factory.mktemp("gpt2"), arch="gpt2", tie_word_embeddings=True)


REAL_MODEL = Path(
    os.environ.get("OMOTOOL_SMOLLM2_DIR")
    or Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct from ``make real-model`` (tests marked ``real``): skipped when
    absent, except under ``CI=true``, where a missing model fails the test."""
    if not (REAL_MODEL / "omotool-source.json").is_file():
        message = f"no real model in {REAL_MODEL}: run `make real-model`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return REAL_MODEL


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """The model's parameters as transformers loads them (the reference for comparisons)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


class Cli:
    """Runs ``omotool ARGS`` in-process; returns the result with ``exit_code`` and ``output``."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object, expect: int | None = 0):
        result = self.runner.invoke(app, [str(a) for a in args])
        if expect is not None:
            assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders left by an interrupted write."""
    return [p.name for p in parent.iterdir() if ".omotool-" in p.name]


TINY_TOKENS = torch.tensor([[5, 9, 17, 33, 40]])


def tiny_logits(model: torch.nn.Module) -> torch.Tensor:
    """A tiny model's logits on a fixed 5-token input (without gradients): compares models."""
    with torch.no_grad():
        return model(TINY_TOKENS).logits
