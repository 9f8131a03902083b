"""The CLI shell: subcommands, version, usage errors, help kept in step with the configs."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import typer

from omotool import __version__
from omotool.delta import DeltaConfig
from omotool.errors import UsageError
from omotool.merging import SPARSIFIERS


def test_help_lists_every_subcommand(cli) -> None:
    out = cli("--help").output
    for name in ("delta", "train", "merge-offline", "eval", "demo"):
        assert name in out
    assert "--install-completion" in out


def test_version(cli) -> None:
    assert cli("--version").output.strip() == f"omotool {__version__}"


def test_demo_refuses_a_folder_it_did_not_make(cli, tmp_path) -> None:
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "mine.txt").write_text("keep")
    result = cli("demo", "--fast", "--workdir", str(tmp_path), expect=1)
    assert "holds files the demo did not make" in result.output
    assert (tmp_path / "sft" / "mine.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli("demo", "--workdir", str(tmp_path / "file"), expect=1).output


def test_demo_rejects_zero_seeds(cli, tmp_path) -> None:
    result = cli("demo", "--seeds", "0", "--workdir", str(tmp_path / "d"), expect=2)
    assert "--seeds" in result.output
    assert not (tmp_path / "d").exists()


def test_delta_help_defaults_match_config_and_registry(cli) -> None:
    text = " ".join(cli("delta", "--help").output.split())
    for name in SPARSIFIERS.names():
        assert name in text
    for field in dataclasses.fields(DeltaConfig):
        if field.default in (dataclasses.MISSING, None, False):
            continue
        option = "--" + field.name.replace("_", "-")
        pattern = re.escape(option) + r".*?\[default: ([^\]]+)\]"
        shown = re.search(pattern, text)
        assert shown and shown.group(1).strip() == str(field.default), option


def test_merge_offline_help_defaults_match_config_and_registry(cli) -> None:
    from omotool.merge_offline import MergeConfig
    from omotool.merging.methods import MERGE_METHODS

    text = " ".join(cli("merge-offline", "--help").output.split())
    for name in MERGE_METHODS.names():
        assert name in text
    for field in dataclasses.fields(MergeConfig):
        if field.default in (dataclasses.MISSING, None, False):
            continue
        option = "--" + field.name.replace("_", "-")
        shown = re.search(re.escape(option) + r".*?\[default: ([^\]]+)\]", text)
        assert shown and shown.group(1).strip() == str(field.default), option


def _train_command() -> Any:
    import typer.main

    from omotool.cli import app

    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def test_train_help_fits_80_columns_with_every_flag_whole(cli) -> None:
    """Panels, no line wider than 80 columns, no flag cut short (also the ``--no-`` forms)."""
    from omotool.cli import app
    from omotool.train.options import train_options

    result = cli.runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    flags = [f for p in _train_command().params for f in (*p.opts, *p.secondary_opts)]
    assert len(flags) > len(train_options())
    for name in flags:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), name
    for panel in {option.panel for option in train_options().values()}:
        assert f"─ {panel} ─" in result.output, panel


def test_train_help_lists_the_registries_and_trl_defaults_read_from_trl(cli) -> None:
    from omotool.cli import app
    from omotool.train.options import trl_default

    wide = cli.runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    text = " ".join(wide.output.replace("│", " ").split())
    grpo, rloo = trl_default("grpo", "num_generations"), trl_default("rloo", "num_generations")
    expected = f"[default: TRL's: {grpo}; rloo {rloo}]" if grpo != rloo else f"TRL's: {grpo}]"
    assert re.search(r"--num-generations .*?" + re.escape(expected), text)
    assert re.search(r"--beta .*?\[default: TRL's: 0\.1; grpo 0, rloo 0\.05\]", text)
    assert "--rescale <str> none, inverse (1/p) or l1. [default: inverse for dare" in text
    from omotool.train.algorithms import ALGORITHMS
    from omotool.train.options import MERGES

    for name in [*ALGORITHMS.names(), *MERGES]:
        assert name in text


def test_every_declared_option_is_a_flag_and_a_recipe_key(tmp_path) -> None:
    """The train command's parameters are TrainConfig's fields (plus the command's own), with
    the declared defaults and panels; each field is a recipe key."""
    from omotool.config import build_config, default_of, load_recipe
    from omotool.train.arguments import TrainConfig
    from omotool.train.options import train_options

    params = {p.name: p for p in _train_command().params}
    assert set(params) == {*train_options(), "config", "set_", "json_output", "debug"}
    for name, option in train_options().items():
        assert params[name].opts[-1] == "--" + name.replace("_", "-")
        assert params[name].rich_help_panel == option.panel
        default = default_of(TrainConfig, name)
        if not isinstance(default, list) and option.none == "" and name != "reward_weights":
            assert params[name].default == default, name
    recipe = tmp_path / "all.yaml"
    recipe.write_text("".join(f"{name.replace('_', '-')}: null\n" for name in train_options()))
    assert set(load_recipe(recipe)) == set(train_options())  # every option is a recipe key
    values = {name: default_of(TrainConfig, name) for name in train_options()}
    assert build_config(TrainConfig, values, {}) == TrainConfig()


def test_a_new_declared_field_needs_no_other_edit() -> None:
    """A field added to a config is a command option (parsed into the config, flags over
    recipe keys) and a recipe key, range-checked, with no other edit."""
    from typer.testing import CliRunner

    from omotool.config import build_config, check_declared, command_options, declare, within
    from omotool.train.arguments import TrainConfig
    from omotool.train.options import TrainOption

    @dataclasses.dataclass
    class Extended(TrainConfig):
        warmup_ratio: float = declare(
            0.0, TrainOption("Share of steps warming up.", "Optimizer", bounds=within("[0, 1]"))
        )
        rounds: int = declare(2, TrainOption("Rounds.", "Run"))

    app = typer.Typer()
    seen: dict[str, Any] = {}

    @app.command()
    @command_options(Extended)
    def run(ctx: typer.Context, **options: Any) -> None:
        given = {k: v for k, v in ctx.params.items()
                 if ctx.get_parameter_source(k).name != "DEFAULT"}  # fmt: skip
        seen["config"] = build_config(Extended, {"rounds": 5, "lr": 1e-3}, given)

    result = CliRunner().invoke(app, ["--warmup-ratio", "0.1", "--lr", "0.5"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.warmup_ratio, config.rounds, config.lr) == (0.1, 5, 0.5)
    check_declared(config)
    with pytest.raises(UsageError, match=r"^--warmup-ratio must be in \[0, 1\]\.$"):
        check_declared(dataclasses.replace(config, warmup_ratio=1.5))


def test_set_overrides_are_read_as_yaml() -> None:
    from omotool.config import parse_overrides

    assert parse_overrides(["lr=5e-7", "merge=ties", "max-steps=10", "bf16=true"]) == {
        "lr": "5e-7", "merge": "ties", "max_steps": 10, "bf16": True,
    }  # fmt: skip
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_overrides(["lr"])


def test_unknown_option_is_usage_error(cli) -> None:
    assert cli("delta", "a", "b", "--bogus", expect=2).exit_code == 2


def test_public_api_is_reexported_lazily() -> None:
    import subprocess
    import sys

    import omotool

    assert omotool.compute_delta.__module__ == "omotool.delta"
    assert omotool.ModelReader.__module__ == "omotool.io.reader"
    assert omotool.OnlineMergingAdamW.__module__ == "omotool.optim.online_merging"
    assert omotool.run_merge.__module__ == "omotool.merge_offline"
    code = "import sys, omotool.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # --help does not pay for importing torch


# -- eval: generation options ----------------------------------------------------------------
def test_eval_generation_options_are_checked_before_any_model(cli, tmp_path) -> None:
    data = tmp_path / "sums.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "reference": "2"}\n')
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks: [{{task: generate, data: {data}, category: capability}}]\n")
    model = tmp_path / "no-model"  # never loaded: every case fails first
    generate = ["eval", model, "--task", "generate", "--data", data]
    cases = [
        ([*generate, "--until", "\n", "--until", ""], "--until: a stop sequence cannot be empty"),
        (["eval", model, "--task", "choice", "--data", data, "--until", "Q:"],
         "--until has no effect on --task choice"),
        (["eval", model, "--task", "perplexity", "--data", data, "--no-chat"],
         "--chat/--no-chat has no effect on --task perplexity"),
        (["eval", model, "--suite", suite, "--until", "Q:"], "--until and --chat/--no-chat go"),
        (["eval", model, "--suite", suite, "--chat"], "a suite sets 'until' and 'chat'"),
        ([*generate, "--extract", "regex", "--pattern", "(("], "is not a regular expression"),
        ([*generate, "--extract", "fuzzy"], "unknown extract 'fuzzy'"),
        ([*generate, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["eval", model, "--task", "lm_eval", "--lm-tasks", ","], "--lm-tasks names no task"),
    ]  # fmt: skip
    for args, message in cases:
        result = cli(*args, expect=2)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output and len(result.output.splitlines()) <= 3
    assert "--chat" in cli("eval", "--help").output and "--until" in cli("eval", "--help").output


def test_eval_until_reads_backslash_escapes(tmp_path) -> None:
    from omotool.eval.suite import single_task_suite

    data = tmp_path / "sums.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "reference": "2"}\n')

    def suite(*until):
        return single_task_suite("generate", data, generation={"until": list(until)})

    assert suite(r"\n", r"Q:\t", r"a\\n").generation.until == ("\n", "Q:\t", "a\\n")
    assert suite().generation.until == ()


# -- eval and demo: device and dtype ---------------------------------------------------------
def test_demo_refuses_cuda_without_it_before_making_anything(cli, tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal without CUDA")
    result = cli("demo", "--device", "cuda", "--workdir", tmp_path / "d", expect=2)
    assert "--device cuda: CUDA is not available here" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert "--dtype must be one of" in cli("demo", "--dtype", "fp8", expect=2).output
    assert not (tmp_path / "d").exists()


def test_demo_passes_device_and_dtype_to_its_evaluation(cli, tmp_path, monkeypatch) -> None:
    import torch

    from omotool.demo import pipeline
    from omotool.errors import OmoError

    given = []

    def fake_run_demo(workdir, settings, **options):
        given.append(options["placement"])
        raise OmoError("stopped by the test")

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    cli("demo", "--fast", "--workdir", tmp_path / "d", expect=1)
    cli("demo", "--fast", "--workdir", tmp_path / "d", "--dtype", "bfloat16", expect=1)
    assert [(p.device.type, p.dtype) for p in given] == [
        ("cpu", torch.float32),  # the default: the committed results' placement
        ("cpu", torch.bfloat16),
    ]


def test_demo_eval_stage_key_changes_only_off_the_default(tmp_path, monkeypatch) -> None:
    """The CPU in float32 keys the evaluation stages as before (cached stages and the
    committed results stay valid); another placement is its own stage."""
    import json

    import torch

    from omotool.demo import pipeline
    from omotool.eval import runner, suite
    from omotool.eval.device import resolve_placement

    keys, runs = [], []

    class Stages:
        def run(self, name, folder, key, build):
            keys.append(key)
            build()
            return "digest"

    def fake_run_suite(paths, plan, device=None, dtype=None):
        runs.append((device, dtype))
        return {"models": [{"path": paths[0]}]}

    monkeypatch.setattr(suite, "load_suite", lambda path: path)
    monkeypatch.setattr(runner, "run_suite", fake_run_suite)
    world = ("world-digest", {"suite-validation": "v.yaml", "suite-test": "t.yaml"})
    model = pipeline._Model(tmp_path / "sft", "sft-digest", "sft", 0)
    evaluated = pipeline._eval_stages(Stages(), tmp_path, world, [model])
    assert evaluated[0][1]["test"] == {"path": str(tmp_path / "sft")}
    pipeline._eval_stages(Stages(), tmp_path, world, [model], resolve_placement("cpu", "auto"))
    pipeline._eval_stages(Stages(), tmp_path, world, [model], resolve_placement("cpu", "bfloat16"))
    before = {"stage": "eval", "world": "world-digest", "model": "sft-digest", "alpha": None}
    assert keys == [before, before, {**before, "device": "cpu", "dtype": "bfloat16"}]
    assert json.dumps(keys[0], sort_keys=True) == json.dumps(before, sort_keys=True)
    cpu = torch.device("cpu")
    assert runs == [(cpu, torch.float32)] * 4 + [(cpu, torch.bfloat16)] * 2


def test_train_summary_shows_none_nan_and_missing_metrics(tmp_path) -> None:
    import io

    from rich.console import Console

    from omotool.cli import _train_table
    from omotool.train.arguments import TrainConfig
    from omotool.train.runner import TrainResult
    from omotool.train.trainer import ZERO_SPREAD_KEY

    cfg = dataclasses.replace(TrainConfig(), algo="grpo", merge="none")
    metrics = {"loss": float("nan"), "reward": None, "reward_std": float("inf"),
               "frac_reward_zero_std": 1.0, ZERO_SPREAD_KEY: 3}  # fmt: skip
    result = TrainResult(str(tmp_path), 3, False, None, metrics, examples=16)
    console = Console(file=io.StringIO(), width=200)
    console.print(_train_table(cfg, result, online=True))
    shown = console.file.getvalue()
    assert re.search(r"loss\s+│ nan", shown) and re.search(r"reward\s+│ –", shown)
    assert re.search(r"reward_std\s+│ inf", shown) and "train_loss" not in shown  # missing
    assert "no reward spread" in shown and "3 logged step(s)" in shown
