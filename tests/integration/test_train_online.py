"""`omotool train --algo grpo|rloo`: TRL's online trainers with every reward kind and online
merging, on a tiny model that half-solves its task.

The task: every prompt's right answer is "1". The SFT model was taught "1" and "2" equally
often, so it samples the right answer about half the time; a reward that prefers "1" must raise
P("1" | prompt) (measured exactly, from the model's log-probabilities, not from samples).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

from omotool.config import build_config, load_recipe
from omotool.errors import InputError, UsageError
from omotool.eval.reward_model import _render, rewards
from omotool.eval.scoring import encode_pair, token_logprobs
from omotool.tiny_models import (
    build_model,
    build_pair,
    build_tokenizer,
    model_config,
    save_model,
)
from omotool.train.arguments import TRL_VALUES, trl_arguments
from omotool.train.options import train_options
from omotool.train.rewards import RewardError, load_reward, parse_rewards, reward_model_function
from omotool.train.runner import CONFIG_FILE, TrainConfig, run_training
from tests.conftest import Cli
from tests.integration.test_train import assert_same_model, start_worker, wait_for

PROMPTS = [f"pick {a} or {b} ?" for a in "abcd" for b in "wxyz"]
ANSWERS = ("1", "2")  # "1" is right


def _batch(tokenizer, encoded):
    width = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(encoded):
        end = len(prompt) + len(completion)
        ids[row, :end], mask[row, :end] = torch.tensor(prompt + completion), 1
        labels[row, len(prompt) : end] = torch.tensor(completion)
    return ids, mask, labels


@pytest.fixture(scope="module")
def half_solver(tmp_path_factory) -> tuple[Path, Path]:
    """(base, SFT): SFT fine-tuned on "1" and "2" equally for every prompt."""
    folder = tmp_path_factory.mktemp("half")
    base = build_model(folder / "base", arch="llama", seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(0)
    encoded = [encode_pair(tokenizer, p, a) for p in PROMPTS for a in ANSWERS]
    ids, mask, labels = _batch(tokenizer, encoded)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sft = save_model(model, folder / "sft")
    assert 0.35 < p_right(sft) < 0.65  # it half-solves the task
    return base, sft


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A 1-output classifier trained to score the answer "1" at +1 and "2" at −1."""
    folder = tmp_path_factory.mktemp("rm") / "rm"
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(model_config("llama", vocab_size=320))
    model.config.num_labels, model.config.pad_token_id = 1, tokenizer.pad_token_id
    model.score = torch.nn.Linear(model.config.hidden_size, 1, bias=False)
    texts = [_render(tokenizer, p, a) for p in PROMPTS for a in ANSWERS]
    target = torch.tensor([1.0, -1.0] * len(PROMPTS))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = ((model(**batch).logits[:, 0] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": p, "reference": "1", "topic": "pick"} for p in PROMPTS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def p_right(model_path: Path) -> float:
    """Mean over the prompts of P("1" then end of text | prompt)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    scores, _ = token_logprobs(model, tokenizer, [encode_pair(tokenizer, p, "1") for p in PROMPTS])
    return sum(math.exp(s) for s in scores) / len(scores)


def online(half_solver, data: Path, out: Path, **options) -> TrainConfig:
    base, sft = half_solver
    values = dict(
        model=str(sft), dataset=str(data), out=str(out), algo="grpo", merge="none",
        reward=["exact"], num_generations=4, batch_size=8, max_completion_length=3,
        max_steps=8, lr=3e-3,
    )  # fmt: skip
    if options.get("merge", "none") != "none":
        values.update(base=str(base), reserve_p=0.1)
    return TrainConfig(**(values | options))


def records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


REWARD_FILE = '''
def right(completions, reference, **kwargs):
    """1 for the reference answer, 0 otherwise."""
    return [float(c.strip() == r) for c, r in zip(completions, reference)]

def shorter(completions, **kwargs):
    return [-len(c) / 10 for c in completions]

def flaky(completions, trainer_state, **kwargs):
    if trainer_state.global_step >= 2:
        raise ValueError("no answer fits")
    return [0.0] * len(completions)
'''


def rewards_module(tmp_path_factory, name: str, text: str) -> Path:
    """``text`` written as the Python file ``name``.py in a new folder."""
    path = tmp_path_factory.mktemp(name) / f"{name}.py"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    return rewards_module(tmp_path_factory, "my_rewards", REWARD_FILE)


KINDS = ["exact", "regex", "last_number", "file", "module", "reward-model"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_reward_kind_raises_the_reward(
    half_solver, prompts, reward_file, reward_model, tmp_path, monkeypatch, kind
) -> None:
    options: dict = {"reward": [kind]}
    name = kind
    if kind == "regex":
        options["reward_pattern"] = r"(\d)"
    elif kind in ("file", "module"):
        monkeypatch.syspath_prepend(str(reward_file.parent))
        source = f"{reward_file}:right" if kind == "file" else "my_rewards:right"
        options, name = {"reward": [source]}, "right"
    elif kind == "reward-model":
        options, name = {"reward": [], "reward_model": [str(reward_model)]}, "rm"
    out = tmp_path / "run"
    result = run_training(online(half_solver, prompts, out, **options))
    assert result.steps == 8
    before, after = p_right(half_solver[1]), p_right(out)
    assert after > before + 0.08, (before, after)
    logged = [r for r in records(out) if "reward" in r]
    assert len(logged) == 8 and all(f"rewards/{name}/mean" in r for r in logged)
    assert {"reward_std", "completions/mean_length", "loss"} <= set(logged[0])
    metadata = json.loads((out / "omotool.json").read_text())
    assert metadata["config"]["algo"] == "grpo" and metadata["config"]["beta"] == 0.0


def test_the_reward_model_reward_is_evals_score(reward_model, half_solver) -> None:
    from omotool.eval.reward_model import load_reward_model

    model, tokenizer = load_reward_model(str(reward_model))
    score = reward_model_function(model, tokenizer)
    chat = [{"role": "user", "content": PROMPTS[0]}]
    got = score(prompts=[PROMPTS[0], chat], completions=["1", [{"content": "2"}]])
    assert got == rewards(model, tokenizer, [PROMPTS[0], chat], ["1", "2"])
    assert got[0] > got[1]  # the trained reward model prefers the right answer


@pytest.mark.parametrize(("algo", "merge"), [("grpo", "dare"), ("grpo", "ties"), ("rloo", "ties")])
def test_online_merging_trains_grpo_and_rloo(half_solver, prompts, tmp_path, algo, merge) -> None:
    out = tmp_path / "run"
    run_training(online(half_solver, prompts, out, algo=algo, merge=merge))
    assert p_right(out) > p_right(half_solver[1]) + 0.08
    logged = [r for r in records(out) if "reward" in r]
    assert all(0 < r["merge/kept_fraction"] <= 0.11 for r in logged)
    if algo == "rloo":
        assert json.loads((out / "omotool.json").read_text())["config"]["beta"] == 0.05


def test_weighted_rewards_on_the_command_line(cli, half_solver, prompts, reward_file, tmp_path):
    base, sft = half_solver
    out = tmp_path / "cli"
    result = cli(
        "train", "--algo", "grpo", "--merge", "ties", "--model", sft, "--base", base,
        "--dataset", prompts, "-o", out, "--reward", f"{reward_file}:shorter", "--reward",
        "exact", "--reward-weights", "0.5,1", "--num-generations", "4", "--batch-size", "8",
        "--max-completion-length", "3", "--max-steps", "2", "--lr", "1e-3", "--beta", "0.04",
        "--json",
    )  # fmt: skip
    report = json.loads(result.output)
    assert report["steps"] == 2 and report["examples"] == len(PROMPTS)
    last = records(out)[-2]  # (the last line is the run's summary)
    assert {"rewards/shorter/mean", "rewards/exact/mean", "merge/kept_fraction"} <= set(last)
    assert "kl" in last  # --beta > 0: TRL loads the SFT model as the reference and logs the KL
    weighted = 0.5 * last["rewards/shorter/mean"] + last["rewards/exact/mean"]
    assert last["reward"] == pytest.approx(weighted, abs=1e-6)


def test_a_reward_that_raises_stops_the_run_keeping_the_last_checkpoint(
    cli, half_solver, prompts, reward_file, tmp_path
) -> None:
    base, sft = half_solver
    out = tmp_path / "flaky"
    result = cli(
        "train", "--algo", "grpo", "--merge", "none", "--model", sft, "--dataset", prompts,
        "-o", out, "--reward", f"{reward_file}:flaky", "--num-generations", "4",
        "--batch-size", "8", "--max-completion-length", "3", "--max-steps", "5",
        "--save-steps", "1", expect=1,
    )  # fmt: skip
    message = " ".join(result.output.split())
    assert f"reward --reward {reward_file}:flaky raised ValueError: no answer fits" in message
    assert "(prompt: 'pick" in message and "Traceback" not in result.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "omotool.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / ".staging").exists()


def test_bad_reward_inputs_fail_before_training(
    cli, half_solver, prompts, reward_file, tmp_path
) -> None:
    base, sft = half_solver
    common = ["train", "--algo", "grpo", "--merge", "none", "--model", sft,
              "--num-generations", "4", "--batch-size", "8", "-o", tmp_path / "bad"]  # fmt: skip
    no_reference = tmp_path / "no_reference.jsonl"
    no_reference.write_text(json.dumps({"prompt": "a"}) + "\n")
    cases = [
        (["--dataset", no_reference, "--reward", "last_number"],
         "no_reference.jsonl:1: field 'reference' is missing, but --reward last_number reads it"),
        (["--dataset", prompts, "--reward", f"{reward_file}:missing"],
         "has no 'missing' (it defines: flaky, right, shorter)"),
        (["--dataset", no_reference, "--reward", f"{reward_file}:right"],
         "field 'reference' is missing, but --reward"),
        (["--dataset", prompts, "--reward-model", sft], "not a sequence classifier"),
    ]  # fmt: skip
    for options, message in cases:
        result = cli(*common, *options, expect=1)
        assert message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    with pytest.raises(InputError):
        run_training(online(half_solver, no_reference, tmp_path / "lib", reward=["exact"]))


def test_a_nan_reward_stops_the_run(half_solver, prompts, tmp_path) -> None:
    module = tmp_path / "nan_reward.py"
    module.write_text("def nan(completions, **kw):\n    return [float('nan')] * len(completions)\n")
    config = online(half_solver, prompts, tmp_path / "run", reward=[f"{module}:nan"], max_steps=2)
    with pytest.raises(RewardError, match=r"returned nan for the prompt 'pick"):
        run_training(config)


@pytest.mark.slow  # subprocesses killed and resumed
def test_sigkill_then_resume_is_bit_identical(half_solver, prompts, tmp_path) -> None:
    whole = online(half_solver, prompts, tmp_path / "whole", merge="ties", max_steps=6,
                   save_steps=2)  # fmt: skip
    run_training(whole)
    killed = dataclasses.replace(whole, out=str(tmp_path / "killed"))
    process = start_worker(killed, tmp_path)
    wait_for(Path(killed.out) / "checkpoint-2", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (Path(killed.out) / "omotool.json").exists()
    result = run_training(dataclasses.replace(killed, resume=True))
    assert result.resumed_from is not None and result.steps == 6
    assert_same_model(Path(killed.out), Path(whole.out))
    rewards_whole = [r["reward"] for r in records(Path(whole.out)) if "reward" in r]
    rewards_resumed = [r["reward"] for r in records(Path(killed.out)) if "reward" in r]
    assert rewards_resumed == rewards_whole  # the same completions were sampled
    completions = [records(Path(run.out), "completions.jsonl") for run in (whole, killed)]
    assert completions[1] == completions[0]  # steps past the checkpoint written once


def resumed_copy(run: Path, folder: Path, newest: int) -> Path:
    """A copy of the finished ``run`` whose newest checkpoint is checkpoint-``newest``."""
    shutil.copytree(run, folder)
    saved = folder / CONFIG_FILE  # the run's settings, --out included
    saved.write_text(saved.read_text().replace(str(run), str(folder)))
    for path in folder.glob("checkpoint-*"):
        if int(path.name.split("-")[1]) > newest:
            shutil.rmtree(path)
    return folder


def test_resume_with_two_iterations_is_exact_at_a_generation_boundary(
    half_solver, prompts, tmp_path
) -> None:
    """With --num-iterations 2, TRL samples every 2 steps and keeps the completions in memory,
    which no checkpoint holds: from checkpoint-2 the resumed run is the uninterrupted one (the
    same parameters, the same rewards); from checkpoint-3 it would sample anew and end
    elsewhere, so it is refused before anything loads, naming the checkpoint to resume from."""
    whole = online(half_solver, prompts, tmp_path / "whole", num_iterations=2, max_steps=4,
                   save_steps=1)  # fmt: skip
    run_training(whole)
    boundary = resumed_copy(Path(whole.out), tmp_path / "from2", newest=2)
    result = run_training(dataclasses.replace(whole, out=str(boundary), resume=True))
    assert result.resumed_from.endswith("checkpoint-2") and result.steps == 4
    assert_same_model(boundary, Path(whole.out))
    rewards_whole = [r["reward"] for r in records(Path(whole.out)) if "reward" in r]
    assert [r["reward"] for r in records(boundary) if "reward" in r] == rewards_whole
    inside = resumed_copy(Path(whole.out), tmp_path / "from3", newest=3)
    with pytest.raises(
        UsageError,
        match="checkpoint-3 lies inside a generation buffer of 2 "
        r"steps .* Resume from checkpoint-2 .* multiples of 2 with --save-steps",
    ):
        run_training(dataclasses.replace(whole, out=str(inside), resume=True))


RECIPES = Path(__file__).parents[2] / "recipes" / "train"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, Path]:
    """(SFT, task vector) of the models ``make quickstart`` builds (scripts/make_tiny_models.py)."""
    folder = tmp_path_factory.mktemp("quickstart")
    base, sft = build_pair(folder, arch="llama", hidden_size=64, layers=2)
    Cli()("delta", base, sft, "-o", folder / "tau")
    return sft, folder / "tau"


def run_tiny_recipe(cli, quickstart, name: str, out: Path, **settings) -> dict:
    """``omotool train --config recipes/train/NAME`` on the quickstart's models into ``out``;
    returns the recipe's values with the ``--set`` ones applied (what the run was asked)."""
    sft, tau = quickstart
    overrides = dict(model=str(sft), task_vector=str(tau), out=str(out), **settings)
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    cli("train", "--config", RECIPES / name, *sets)
    return load_recipe(RECIPES / name) | overrides


def test_the_tiny_grpo_recipe_learns_on_the_quickstart_models(cli, quickstart, tmp_path) -> None:
    """The recipe on the models ``make quickstart`` builds (scripts/make_tiny_models.py), 4 of
    its 8 steps: its reward differs among a prompt's completions (TRL's frac_reward_zero_std
    below 1) and the policy moves (gradient and update norms above 0), on every step. Whether
    the mean reward rises is not asserted: 8 completions a step make it too noisy to say."""
    out = tmp_path / "grpo"
    run_tiny_recipe(cli, quickstart, "tiny-grpo-onties.yaml", out, max_steps=4, save_steps=0)
    steps = [r for r in records(out) if "reward" in r]
    assert len(steps) == 4 and "rewards/has_lowercase_letter/mean" in steps[0]
    assert all(r["frac_reward_zero_std"] < 1 for r in steps)
    assert all(r["grad_norm"] > 0 and r["merge/update_norm"] > 0 for r in steps)
    assert json.loads((out / "omotool.json").read_text())["steps"] == 4


# What makes each GRPO variant, as fields of TRL's GRPOConfig (the papers' choices, as the
# recipes' comments give them); its recipes are recipes/train/{qwen2.5-1.5b,tiny}-NAME-onties.yaml.
VARIANTS = {
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                 mask_truncated_completions=True, beta=0.0),
    "dr-grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.0),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
                 epsilon_high=4e-4, beta=0.0),
}  # fmt: skip


def assert_reaches_trl(values: dict, arguments) -> None:
    """Each of the recipe ``values`` that names a TRL field (an option's ``TrainOption.trl``
    taken as is, or a ``trl:`` field) holds that value in the TRL config ``arguments``:
    none dropped or changed on the way."""
    options = train_options()
    checked = []
    for key, value in values.items():
        if key == "trl":
            fields = dict(value)
        elif options[key].trl and key not in TRL_VALUES:
            fields = dict.fromkeys(options[key].trl, value)
            if key == "gradient_checkpointing":  # TRL/transformers name it one way or the other
                fields = {name: value for name in fields if hasattr(arguments, name)}
        else:
            continue
        for name, expected in fields.items():
            assert getattr(arguments, name) == expected, (key, name, getattr(arguments, name))
            checked.append(name)
    assert checked


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_variant_recipes_reach_trls_config(variant, tmp_path) -> None:
    """The full-size recipe and its tiny counterpart: the TRL config omotool builds from each
    holds the variant's fields and every other value the recipe sets."""
    for name in (f"qwen2.5-1.5b-{variant}-onties.yaml", f"tiny-{variant}-onties.yaml"):
        values = load_recipe(RECIPES / name)
        config = build_config(TrainConfig, values, {})
        config.validate()
        arguments = trl_arguments(config, tmp_path)
        assert {field: getattr(arguments, field) for field in VARIANTS[variant]} == VARIANTS[
            variant
        ], name
        assert_reaches_trl(values, arguments)


@pytest.mark.slow  # 3 runs of 4 steps: about a minute
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_tiny_variant_recipes_learn(cli, quickstart, tmp_path, variant) -> None:
    """Each tiny variant recipe, 4 steps through the command line: the TRL config the trainer
    ran with (saved in the checkpoint) holds the variant's fields and the recipe's values, and
    every step has a learning signal: rewards that differ within some prompt's completions
    (frac_reward_zero_std below 1), a gradient and an update (norms above 0). A recipe whose
    rewards never differ, or whose loss masks every completion, trains nothing and fails."""
    out = tmp_path / variant
    asked = run_tiny_recipe(cli, quickstart, f"tiny-{variant}-onties.yaml", out, max_steps=4,
                            save_steps=4)  # fmt: skip
    arguments = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert {field: getattr(arguments, field) for field in VARIANTS[variant]} == VARIANTS[variant]
    assert_reaches_trl(asked, arguments)
    stepped = [r for r in records(out) if "grad_norm" in r]
    sampled = [r for r in stepped if "reward" in r]  # (GSPO: every other step samples)
    assert len(stepped) == 4 and sampled
    assert all(r["frac_reward_zero_std"] < 1 for r in sampled)
    assert all(r["grad_norm"] > 0 and r["merge/update_norm"] > 0 for r in stepped)


UNUSUAL_REWARDS = """
import asyncio

def not_applicable(completions, **kwargs):
    return [None] * len(completions)

async def right_later(completions, reference, **kwargs):
    await asyncio.sleep(0)
    return [float(c.strip() == r) for c, r in zip(completions, reference)]

def constant(completions, **kwargs):
    return [1.0] * len(completions)
"""


@pytest.fixture(scope="module")
def unusual_rewards(tmp_path_factory) -> Path:
    return rewards_module(tmp_path_factory, "unusual_rewards", UNUSUAL_REWARDS)


def train_cli(cli, half_solver, data: Path, out: Path, algo: str, reward: str, steps: int) -> str:
    """The output of ``omotool train --algo ALGO --reward REWARD`` (no terminal: no bar)."""
    base, sft = half_solver
    return cli(
        "train", "--algo", algo, "--merge", "none", "--model", sft, "--dataset", data, "-o", out,
        "--reward", reward, "--num-generations", "4", "--batch-size", "8",
        "--max-completion-length", "3", "--max-steps", steps,
    ).output  # fmt: skip


def test_a_reward_that_never_applies_runs_with_a_bar_and_a_summary(
    cli, half_solver, prompts, unusual_rewards, tmp_path
) -> None:
    import io

    from rich.console import Console

    from omotool.train.progress import progress_callback

    terminal = Console(file=io.StringIO(), force_terminal=True)
    config = online(half_solver, prompts, tmp_path / "lib", max_steps=2,
                    reward=[f"{unusual_rewards}:not_applicable"])  # fmt: skip
    result = run_training(config, callbacks=[progress_callback(terminal)])  # TRL logs None
    assert result.steps == 2 and result.metrics["reward"] is None
    assert all(r["reward"] is None for r in records(tmp_path / "lib") if "reward" in r)
    logged = records(tmp_path / "lib", "completions.jsonl")
    assert logged and all(r["rewards"] == {"not_applicable": None} for r in logged)
    shown = train_cli(cli, half_solver, prompts, tmp_path / "cli", "grpo",
                      f"{unusual_rewards}:not_applicable", steps=1)  # fmt: skip
    assert re.search(r"reward\s+│ –", shown) and "internal error" not in shown


def test_an_async_reward_is_awaited(half_solver, prompts, unusual_rewards, tmp_path) -> None:
    config = online(half_solver, prompts, tmp_path / "run", max_steps=2,
                    reward=[f"{unusual_rewards}:right_later"])  # fmt: skip
    assert run_training(config).steps == 2
    logged = [r for r in records(tmp_path / "run") if "rewards/right_later/mean" in r]
    assert len(logged) == 2 and all(0 <= r["rewards/right_later/mean"] <= 1 for r in logged)


def test_rewards_without_spread_are_warned_about(
    cli, half_solver, prompts, unusual_rewards, tmp_path
) -> None:
    with pytest.warns(UserWarning, match="NO LEARNING SIGNAL"):
        shown = train_cli(cli, half_solver, prompts, tmp_path / "flat", "rloo",
                          f"{unusual_rewards}:constant", steps=2)  # fmt: skip
    assert "no reward spread" in shown and "2 logged step(s)" in shown


@pytest.mark.parametrize(
    "evaluation", [dict(eval_batch_size=16), dict(num_generations_eval=4)], ids=["batch", "fewer"]
)
def test_evaluation_with_16_generations(half_solver, prompts, tmp_path, evaluation) -> None:
    config = online(half_solver, prompts, tmp_path / "run", num_generations=16, batch_size=16,
                    max_steps=1, eval_dataset=str(prompts), eval_steps=1, **evaluation)  # fmt: skip
    config.validate()
    assert run_training(config).steps == 1
    evaluated = [r for r in records(tmp_path / "run") if "eval_reward" in r]
    assert len(evaluated) == 1 and 0 <= evaluated[0]["eval_reward"] <= 1


def test_completions_are_logged_with_each_rewards_value(
    half_solver, prompts, tmp_path, capsys
) -> None:
    config = online(
        half_solver, prompts, tmp_path / "run", reward=["exact", "regex"], reward_pattern="([0-9])",
        max_steps=2, log_completions=6, print_completions=2,
    )  # fmt: skip
    run_training(config)
    rows = records(tmp_path / "run", "completions.jsonl")
    assert [row["step"] for row in rows] == [1] * 6 + [2] * 6  # 6 of the 8 completions a step
    exact, regex = (
        load_reward(spec, pattern="([0-9])") for spec in parse_rewards(["exact", "regex"])
    )
    for row in rows:
        assert set(row) == {"step", "prompt", "completion", "rewards", "advantage"}
        assert row["prompt"] in PROMPTS and isinstance(row["advantage"], float)
        kwargs = dict(prompts=[row["prompt"]], completions=[row["completion"]], reference=["1"])
        assert row["rewards"] == {"exact": exact(**kwargs)[0], "regex": regex(**kwargs)[0]}
    shown = capsys.readouterr().err  # --print-completions 2: a table a step, on stderr
    assert "completions at step 1" in shown and "completions at step 2" in shown


def test_rloo_completions_are_logged_with_their_leave_one_out_advantage(
    half_solver, prompts, tmp_path
) -> None:
    """RLOO's rows: the first 4 completions of a step are one prompt's group (TRL samples a
    prompt's completions together), each advantage its reward minus the mean of the other 3
    (RLOO's baseline; --beta 0: no KL term in the reward)."""
    config = online(half_solver, prompts, tmp_path / "run", algo="rloo", beta=0.0, max_steps=2,
                    log_completions=4)  # fmt: skip
    run_training(config)
    rows = records(tmp_path / "run", "completions.jsonl")
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4
    for group in (rows[:4], rows[4:]):
        assert len({row["prompt"] for row in group}) == 1
        rewards = [row["rewards"]["exact"] for row in group]
        for row, reward in zip(group, rewards, strict=True):
            baseline = (sum(rewards) - reward) / 3
            assert row["advantage"] == pytest.approx(reward - baseline, abs=1e-6)
