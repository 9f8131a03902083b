"""--trl KEY=VALUE: any other field of the algorithm's TRL config reaches it, typed as the
field declares; a field omotool sets, or one that would do nothing, is refused by name."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Literal

import pytest
import yaml

from omotool.config import build_config, flag, load_recipe
from omotool.errors import UsageError
from omotool.train.algorithms import ALGORITHMS
from omotool.train.arguments import TRL_FIXED, TrainConfig, check_config, trl_arguments
from omotool.train.options import trl_owner
from omotool.train.trl_passthrough import REFUSED, field_value, trl_passthrough


def grpo(tmp_path, **options) -> TrainConfig:
    settings = dict(
        model="m", dataset="d", out=str(tmp_path), merge="none", algo="grpo", reward=["exact"],
        batch_size=8,
    )  # fmt: skip
    return TrainConfig(**(settings | options))


@pytest.mark.parametrize(
    ("given", "field", "value"),
    [
        ("epsilon_high=0.28", "epsilon_high", 0.28),  # float | None
        ("epsilon_high=none", "epsilon_high", None),
        ("epsilon_high=3", "epsilon_high", 3.0),  # an int, for a float
        ("epsilon_high=5e-1", "epsilon_high", 0.5),  # (YAML 1.1: a text)
        ("mask_truncated_completions=true", "mask_truncated_completions", True),  # bool
        ("mask_truncated_completions=false", "mask_truncated_completions", False),
        ("top_k=5", "top_k", 5),  # int
        ("repetition_penalty=1", "repetition_penalty", 1.0),  # float
        ("steps_per_generation=null", "steps_per_generation", None),  # int | None
        ("steps_per_generation=4", "steps_per_generation", 4),
        ("importance_sampling_level=sequence", "importance_sampling_level", "sequence"),  # str
        ("vllm_mode=colocate", "vllm_mode", "colocate"),
        ("generation_kwargs={min_p: 0.1, top_a: 2}", "generation_kwargs",
         {"min_p": 0.1, "top_a": 2}),
        ("chat_template_kwargs={enable_thinking: false}", "chat_template_kwargs",
         {"enable_thinking": False}),
        ("epsilon-high=0.3", "epsilon_high", 0.3),  # (dashes read as underscores)
    ],
)  # fmt: skip
def test_values_are_parsed_to_the_field_type(given, field, value) -> None:
    parsed = trl_passthrough("grpo", [given])
    assert parsed == {field: value}
    assert type(parsed[field]) is type(value)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("top_k=abc", r"top_k is int, got 'abc'"),
        ("top_k=1.5", r"top_k is int, got 1\.5"),
        ("mask_truncated_completions=maybe", r"mask_truncated_completions is bool, got 'maybe'"),
        ("mask_truncated_completions=1", r"mask_truncated_completions is bool, got 1\."),
        ("epsilon_high=wide", r"epsilon_high is float \| None, got 'wide'"),
        ("generation_kwargs=[1, 2]", r"generation_kwargs is dict \| str \| None, got \[1, 2\]"),
        ("top_k=null", r"top_k is int, got None"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_field_its_type_and_the_value(given, message):
    with pytest.raises(UsageError, match=r"^--trl \w+: GRPOConfig\." + message):
        trl_passthrough("grpo", [given])


def test_literal_list_and_any_fields() -> None:
    @dataclass
    class Config:
        mode: Literal["a", "b"] = "a"
        flag: Literal[False] | str | None = None
        sizes: list[int] | None = None

    assert field_value(Config, "mode", "b") == "b"
    with pytest.raises(UsageError, match=r"Config\.mode is Literal\['a', 'b'\], got 'c'"):
        field_value(Config, "mode", "c")
    assert field_value(Config, "flag", False) is False
    assert field_value(Config, "flag", 0) == "0"  # not False: 0 is no Literal[False]
    assert field_value(Config, "sizes", [1, "2"]) == [1, 2]
    assert field_value(Config, "sizes", 3) == [3]  # one item
    with pytest.raises(UsageError, match=r"sizes is list\[int\] \| None, got \['x'\]"):
        field_value(Config, "sizes", ["x"])


def test_an_unknown_field_is_refused_with_close_matches() -> None:
    with pytest.raises(UsageError, match=r"GRPOConfig \(--algo grpo\) has no field epsilon_hi\. "
                       r"Did you mean epsilon_high"):  # fmt: skip
        trl_passthrough("grpo", ["epsilon_hi=0.3"])
    with pytest.raises(UsageError, match=r"DPOConfig \(--algo dpo\) has no field top_k\.$"):
        trl_passthrough("dpo", ["top_k=3"])  # a GRPO field, not a DPO one


def test_every_field_an_option_sets_is_refused_naming_the_option() -> None:
    checked = 0
    for algo in ALGORITHMS:
        algorithm = ALGORITHMS.get(algo)
        for field in dataclasses.fields(algorithm.config_class()):
            owner = trl_owner(field.name)
            if owner is None or field.name in REFUSED or field.name in algorithm.settings:
                continue
            with pytest.raises(UsageError, match=rf"use {flag(owner)} instead of --trl "):
                trl_passthrough(algo, {field.name: 1})
            checked += 1
    assert checked > 100
    with pytest.raises(UsageError, match=r"--trl learning_rate: omotool sets learning_rate from "
                       r"--lr; use --lr instead of --trl learning_rate=\.\.\."):  # fmt: skip
        trl_passthrough("dpo", ["learning_rate=1e-3"])


@pytest.mark.parametrize(
    ("field", "named"),
    [
        ("optim", "OnlineMergingAdamW"), ("optim_args", "OnlineMergingAdamW"),
        ("optim_target_modules", "OnlineMergingAdamW"), ("deepspeed", "--deepspeed"),
        ("fsdp", "--fsdp"), ("fsdp_config", "--fsdp"), ("output_dir", "-o/--out"),
        ("overwrite_output_dir", "--overwrite"), ("resume_from_checkpoint", "--resume"),
        ("report_to", "--report-to"), ("save_strategy", "--save-steps"),
        ("save_only_model", "--resume"), ("hub_token", "hf auth login"),
        ("gradient_checkpointing", "--gradient-checkpointing"),
        ("activation_checkpointing", "--gradient-checkpointing"), ("use_cpu", "accelerator"),
    ],
)  # fmt: skip
def test_fields_that_would_undo_omotool_are_refused_naming_the_flag(field, named) -> None:
    with pytest.raises(UsageError, match=rf"^--trl {field}: .*{named}"):
        trl_passthrough("grpo", {field: "x"})


def test_every_field_omotool_always_sets_is_refused() -> None:
    assert {*TRL_FIXED, "output_dir", "use_cpu"} <= set(REFUSED)


def test_a_field_the_algorithm_fixes_is_refused() -> None:
    with pytest.raises(UsageError, match=r"--algo dpo sets loss_type to \['sigmoid'\]"):
        trl_passthrough("dpo", ["loss_type=[ipo]"])
    with pytest.raises(UsageError, match=r"--algo simpo sets cpo_alpha to 0\.0"):
        trl_passthrough("simpo", ["cpo_alpha=1"])


def test_a_refusal_comes_before_anything_loads(tmp_path) -> None:
    # (model "m" does not exist: check_config refuses --trl first)
    with pytest.raises(UsageError, match="--trl optim"):
        check_config(grpo(tmp_path, trl={"optim": "sgd"}))


def test_recipe_mapping_and_command_line_reach_the_trl_config(tmp_path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: m\ndataset: d\nalgo: grpo\nreward: [exact]\nbatch_size: 8\nmerge: none\n"
        f"out: {tmp_path}\ntrl:\n  epsilon_high: 0.28\n  top_k: 3\n"
        "  generation_kwargs: {min_p: 0.05}\n"
    )
    flags = {"trl": ["top_k=5", "mask_truncated_completions=true"]}  # --trl ... --trl ...
    config = build_config(TrainConfig, load_recipe(recipe), flags)
    check_config(config)
    assert config.trl == {
        "epsilon_high": 0.28, "top_k": 5, "generation_kwargs": {"min_p": 0.05},
        "mask_truncated_completions": True,
    }  # fmt: skip
    arguments = trl_arguments(config, tmp_path)
    assert arguments.epsilon_high == 0.28 and arguments.top_k == 5
    assert arguments.mask_truncated_completions is True
    assert arguments.generation_kwargs == {"min_p": 0.05}
    assert arguments.learning_rate == config.lr  # omotool's own values kept
    saved = yaml.safe_load(yaml.safe_dump(asdict(config), sort_keys=False))  # as runner saves
    assert saved["trl"] == config.trl


@pytest.mark.parametrize(
    "listed", ["[epsilon_high=0.28, top_k=5]", "[{epsilon_high: 0.28}, {top_k: 5}]"]
)
def test_a_recipe_may_list_the_fields(tmp_path, listed) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trl: {listed}\n")
    config = build_config(TrainConfig, load_recipe(recipe), {})
    assert trl_passthrough("grpo", config.trl) == {"epsilon_high": 0.28, "top_k": 5}


def test_the_command_line_flag_reaches_the_config(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from omotool.cli import app
    from omotool.train import runner

    seen = []

    def run_training(config, callbacks=()):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run_training", run_training)
    args = ["train", "--algo", "grpo", "--model", "m", "--dataset", "d", "-o", str(tmp_path),
            "--reward", "exact", "--batch-size", "8", "--merge", "none",
            "--trl", "epsilon_high=0.28", "--trl", "generation_kwargs={min_p: 0.1}"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.trl == {"epsilon_high": 0.28, "generation_kwargs": {"min_p": 0.1}}


def test_the_command_line_refuses_an_owned_field_with_exit_2(tmp_path) -> None:
    from typer.testing import CliRunner

    from omotool.cli import app

    args = ["train", "--model", "m", "--dataset", "d", "-o", str(tmp_path), "--merge", "none",
            "--trl", "learning_rate=1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "use --lr instead of --trl learning_rate" in result.output


def test_a_dpo_family_field_reaches_the_dpo_config(tmp_path) -> None:
    config = TrainConfig(
        model="m", dataset="d", out=str(tmp_path), merge="none", algo="ipo",
        trl=["ld_alpha=0.5", "use_weighting=true"],
    )  # fmt: skip
    check_config(config)
    arguments = trl_arguments(config, tmp_path)
    assert (arguments.ld_alpha, arguments.use_weighting) == (0.5, True)
    assert arguments.loss_type == ["ipo"]


def test_resume_refuses_a_changed_trl(tmp_path) -> None:
    from omotool.train.runner import CONFIG_FILE, resume_point

    saved = grpo(tmp_path, trl={"epsilon_high": 0.28})
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(asdict(saved), sort_keys=False))
    changed = grpo(tmp_path, trl={"epsilon_high": 0.3}, resume=True)
    with pytest.raises(UsageError, match=r"trl: \{'epsilon_high': 0\.28\} → \{'epsilon_high'"):
        resume_point(changed, tmp_path)
