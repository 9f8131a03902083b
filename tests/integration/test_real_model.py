"""Every command on a real pretrained model: SmolLM2-135M-Instruct (``make real-model``).

What a real checkpoint brings that the tiny models of the other tests do not: ``lm_head`` tied to
``embed_tokens``, grouped-query attention, a 49k-token BPE tokenizer with a chat template,
bfloat16 storage. The chain: a short SFT on a skill the model lacks (two-digit sums in a fixed
format) → ``omotool delta`` → DPO and GRPO with ``--merge dare`` and ``ties`` → ``merge-offline``
→ ``omotool eval``; on the way, the checks real models break: the tied embedding is one entry of
``τ`` and of the optimizer (so it is merged once), TRL tokenizes conversations with the chat
template exactly as ``omotool eval`` scores them, and a bfloat16 run keeps float32 master
weights.

Sized for a 2-core CPU: one optimizer step per run, batches of 2, sequences of at most 32
tokens. The model folder is made by ``make real-model`` (a set-up step of ``make test`` and CI);
without it these tests skip, except under ``CI=true``, where a missing model fails them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from omotool.eval.scoring import encode_pair
from omotool.train.runner import TrainConfig, run_training
from tests.conftest import Cli

pytestmark = [pytest.mark.real, pytest.mark.slow]

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SYSTEM = [{"role": "system", "content": "Add."}]  # short: the default system prompt is long


@pytest.fixture(scope="module")
def base(real_model: Path) -> Path:
    return real_model


def _user(a: int, b: int) -> list[dict[str, str]]:
    return [*SYSTEM, {"role": "user", "content": f"{a}+{b}"}]


def _answer(text: object) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": str(text)}]


SUMS = [(17, 25), (38, 46), (29, 54), (63, 19), (45, 37), (58, 26)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real-data")
    files: dict[str, list[dict[str, Any]]] = {
        "sft.jsonl": [{"messages": _user(a, b) + _answer(a + b)} for a, b in SUMS],
        "prefs.jsonl": [
            {"prompt": _user(a, b), "chosen": _answer(a + b), "rejected": _answer(a + b + 10)}
            for a, b in SUMS
        ],
        "prompts.jsonl": [{"prompt": _user(a, b), "reference": str(a + b)} for a, b in SUMS],
        "sums.jsonl": [{"prompt": f"{a}+{b}", "reference": str(a + b)} for a, b in SUMS[:1]],
    }
    files["prefs-eval.jsonl"] = files["prefs.jsonl"][:2]
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    # GRPO's reward: the completion's length in characters (a real 3-token sample of sums is
    # rarely right, so a verifier would give every completion 0: no learning signal)
    (folder / "rewards.py").write_text(
        "def length(completions, **kwargs):\n"
        "    return [float(len(c[-1]['content'])) for c in completions]\n"
    )
    (folder / "prose.txt").write_text("The cat sat on the mat and looked out of the window.\n")
    return folder


class Capture(TrainerCallback):
    """The optimizer and the first training row as TRL prepared them (tokens)."""

    def __init__(self) -> None:
        self.optimizer: Any = None
        self.row: dict[str, Any] | None = None
        self.model: Any = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.row = dict(train_dataloader.dataset[0])

    def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self.model = model


def _train(out: Path, capture: Capture | None = None, **options: Any) -> Path:
    settings = dict(out=str(out), batch_size=2, max_steps=1, lr=1e-5, seed=0, logging_steps=1)
    if options["algo"] != "grpo":  # GRPO samples its completions: --max-completion-length
        settings["max_length"] = 32
    result = run_training(TrainConfig(**(settings | options)), callbacks=[capture or Capture()])
    assert result.steps == options.get("max_steps", 1) and not result.interrupted
    return out


@pytest.fixture(scope="module")
def sft(base: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real-runs") / "sft"
    return _train(out, model=str(base), dataset=str(data / "sft.jsonl"), algo="sft",
                  merge="none", lr=1e-4)  # fmt: skip


@pytest.fixture(scope="module")
def tau(base: Path, sft: Path) -> Path:
    out = sft.parent / "tau"
    Cli()("delta", base, sft, "-o", out)
    return out


def _names(folder: Path) -> dict[str, torch.dtype]:
    names = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names |= {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    return names


def _tied(folder: Path) -> bool:
    """Whether the model in ``folder`` loads with ``lm_head`` tied to ``embed_tokens`` (built on
    the meta device: the tie comes from the config, the weights are not needed)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    return model.lm_head.weight is model.model.embed_tokens.weight


def _tensor(folder: Path, name: str) -> torch.Tensor:
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            if name in handle.keys():  # noqa: SIM118
                return handle.get_tensor(name).float()
    raise KeyError(name)


def test_the_model_is_the_real_one(base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and "quantization_config" not in config
    names = _names(base)
    assert EMBED in names and HEAD not in names  # tied: stored once
    assert set(map(str, names.values())) == {"BF16"}
    assert AutoTokenizer.from_pretrained(str(base)).chat_template


def test_sft_and_delta_keep_the_tied_embedding_once(base: Path, sft: Path, tau: Path) -> None:
    assert _tied(sft) and HEAD not in _names(sft)
    names = _names(tau)
    assert EMBED in names and HEAD not in names
    summary = json.loads((tau / "omotool.json").read_text())
    with safe_open(str(next(tau.glob("*.safetensors"))), "pt") as handle:
        assert any(handle.get_tensor(n).abs().max() > 0 for n in handle.keys())  # noqa: SIM118
    assert summary["base"]["fingerprint"] != summary["sft"]["fingerprint"]


@pytest.fixture(scope="module")
def dpo(base: Path, sft: Path, tau: Path, data: Path) -> dict[str, tuple[Path, Capture]]:
    """DPO from SFT: OnDARE in float32, OnTIES with bfloat16 weights."""
    runs = {}
    for merge, bf16 in (("dare", False), ("ties", True)):
        capture = Capture()
        out = _train(sft.parent / f"dpo-{merge}", capture, model=str(sft),
                     dataset=str(data / "prefs.jsonl"), algo="dpo", merge=merge,
                     task_vector=str(tau), alpha=0.01,
                     bf16=bf16)  # fmt: skip
        runs[merge] = (out, capture)
    return runs


@pytest.mark.parametrize("merge", ["dare", "ties"])
def test_dpo_merges_the_tied_embedding_once(dpo, merge: str) -> None:
    out, capture = dpo[merge]
    optimizer = capture.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = [n for group in optimizer.param_groups for n in group["param_names"]]
    assert len({id(p) for p in params}) == len(params)  # no parameter stepped twice
    assert names.count(EMBED) == 1 and HEAD not in names
    assert EMBED in optimizer.references and HEAD not in optimizer.references
    assert capture.model.lm_head.weight is capture.model.model.embed_tokens.weight
    assert optimizer.last_stats is not None
    assert _tied(out) and HEAD not in _names(out)


def test_chat_template_is_the_same_in_training_and_eval(dpo, data: Path, sft: Path) -> None:
    """TRL's tokens for the first pair are what ``omotool eval`` scores for it."""
    row = dpo["dare"][1].row
    example = json.loads((data / "prefs.jsonl").read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    prompt_ids, chosen_ids = encode_pair(tokenizer, example["prompt"], example["chosen"])
    _, rejected_ids = encode_pair(tokenizer, example["prompt"], example["rejected"])
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
        prompt_ids, chosen_ids, rejected_ids
    )  # fmt: skip
    assert tokenizer.decode(prompt_ids).startswith("<|im_start|>system\nAdd.<|im_end|>")


def test_bf16_weights_keep_float32_master_copies(dpo) -> None:
    out, capture = dpo["ties"]
    optimizer = capture.optimizer
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert param.dtype == torch.bfloat16
            master = optimizer.state[param]["master"]
            assert master.dtype == torch.float32
            assert torch.equal(master.to(torch.bfloat16), param.detach())
    assert set(map(str, _names(out).values())) == {"BF16"}


def test_grpo_merges_on_the_real_model(sft: Path, tau: Path, data: Path) -> None:
    """OnTIES under GRPO (DPO above runs both merges; one GRPO run keeps the suite short)."""
    capture = Capture()
    out = _train(sft.parent / "grpo-ties", capture, model=str(sft),
                 dataset=str(data / "prompts.jsonl"), algo="grpo", merge="ties",
                 task_vector=str(tau), alpha=0.01, reward=[f"{data / 'rewards.py'}:length"],
                 num_generations=2, max_completion_length=3)  # fmt: skip
    names = [n for group in capture.optimizer.param_groups for n in group["param_names"]]
    assert names.count(EMBED) == 1 and HEAD not in names
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:1]
    assert step["frac_reward_zero_std"] < 1  # the completions' rewards differ: a learning signal
    assert _tied(out) and HEAD not in _names(out)
    assert not torch.equal(_tensor(out, EMBED), _tensor(sft, EMBED))


def test_lora_ties_merges_through_the_adapter_on_the_real_model(
    sft: Path, tau: Path, data: Path, tmp_path: Path
) -> None:
    """DPO with a rank-8 adapter on every linear layer and OnTIES: a PEFT adapter over the SFT
    model, merged through the adapter's tangent space (its kept share logged), and ``omotool
    eval`` reads the adapter folder as its merged model."""
    from peft import PeftModel

    out = _train(sft.parent / "dpo-lora-ties", model=str(sft), dataset=str(data / "prefs.jsonl"),
                 algo="dpo", merge="ties", task_vector=str(tau), alpha=0.01, lr=1e-3,
                 lora_r=8, lora_alpha=16.0)  # fmt: skip
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:1]
    assert 0 < step["merge/lora_kept_share"] <= 1
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(model, str(out))
    factors = {n: p for n, p in tuned.named_parameters() if "lora_B" in n}
    assert len(factors) == 30 * 7  # every linear layer of the 30 blocks, not the tied head
    assert any(p.abs().max() > 0 for p in factors.values())  # the step moved B off its zeros
    tasks = [{"name": "prose", "task": "perplexity", "data": str(data / "prose.txt"),
              "category": "capability"}]  # fmt: skip
    suite = {"baseline": str(sft), "batch_size": 2, "tasks": tasks}
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    Cli()("eval", out, "--suite", tmp_path / "suite.yaml", "-o", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    scores = [m["tasks"]["prose"]["scores"]["perplexity"]["value"] for m in report["models"]]
    assert len(scores) == 2 and scores[0] != scores[1]  # the adapter is read, merged on load


@pytest.fixture(scope="module")
def merged(sft: Path, dpo) -> Path:
    out = sft.parent / "merged"
    Cli()("merge-offline", "--sft", sft, "--rlhf", dpo["dare"][0], "--alpha", "0.5", "-o", out)
    return out


def test_merge_offline_keeps_the_tied_embedding_once(sft: Path, dpo, merged: Path) -> None:
    assert HEAD not in _names(merged) and _tied(merged)
    assert (merged / "chat_template.jinja").is_file()
    tensors = {
        name: _tensor(folder, EMBED)
        for name, folder in (("sft", sft), ("rlhf", dpo["dare"][0]), ("merged", merged))
    }
    expected = tensors["sft"] + 0.5 * (tensors["rlhf"] - tensors["sft"])
    torch.testing.assert_close(tensors["merged"], expected)


def test_eval_scores_the_outputs(sft: Path, merged: Path, data: Path, tmp_path) -> None:
    tasks = [
        {"name": "prefs", "task": "preference", "data": str(data / "prefs-eval.jsonl"),
         "category": "reward", "beta": 0.1},
        {"name": "sums", "task": "generate", "data": str(data / "sums.jsonl"),
         "category": "capability", "extract": "last_number"},
        {"name": "prose", "task": "perplexity", "data": str(data / "prose.txt"),
         "category": "capability"},
    ]  # fmt: skip
    suite = {"baseline": str(sft), "reference": str(sft), "batch_size": 2, "tasks": tasks,
             "generation": {"max_new_tokens": 3}}  # fmt: skip
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    Cli()("eval", merged, "--suite", tmp_path / "suite.yaml", "-o", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [m["path"] for m in report["models"]] == [str(sft), str(merged)]
    sft_scores, merged_scores = (m["tasks"] for m in report["models"])
    assert sft_scores["prefs"]["scores"]["reward_margin"]["value"] == 0.0  # against itself
    assert merged_scores["prefs"]["scores"]["reward_margin"]["value"] != 0.0
    assert 1 < merged_scores["prose"]["scores"]["perplexity"]["value"] < 1000  # a language model
