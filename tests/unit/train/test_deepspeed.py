"""``omotool train --deepspeed``: the configs it names, the refusals before anything loads,
and the record a resumption is checked against."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from omotool.errors import InputError, UsageError
from omotool.train.arguments import TrainConfig
from omotool.train.deepspeed import (
    DEEPSPEED_FILE,
    check_deepspeed_resume,
    deepspeed_config,
    deepspeed_record,
    deepspeed_stage,
)


def train_config(tmp_path: Path, **options) -> TrainConfig:
    return TrainConfig(**({"model": "m", "dataset": "d", "out": str(tmp_path), "merge": "none"}
                          | options))  # fmt: skip


@pytest.fixture
def launched(monkeypatch) -> None:
    """As under torchrun with 2 processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_configs_leave_the_optimizer_to_omotool(
    launched, tmp_path, stage
) -> None:
    from omotool.train.arguments import TRL_VALUES

    config = train_config(tmp_path, deepspeed=f"zero{stage}")
    config.validate()
    settings = deepspeed_config(config)
    assert deepspeed_stage(settings) == stage
    assert "optimizer" not in settings and "scheduler" not in settings
    assert settings["zero_allow_untested_optimizer"] is True
    assert settings["train_micro_batch_size_per_gpu"] == "auto"  # filled in from the options
    zero = settings["zero_optimization"]
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    assert TRL_VALUES["deepspeed"](config) == {"deepspeed": settings}
    assert TRL_VALUES["deepspeed"](train_config(tmp_path)) == {}


def test_a_deepspeed_config_file_in_json_or_yaml(launched, tmp_path) -> None:
    written = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    (tmp_path / "ds.yaml").write_text(
        "zero_optimization:\n  stage: 2\ntrain_micro_batch_size_per_gpu: auto\n"
    )
    (tmp_path / "ds.json").write_text(json.dumps(written))
    for name in ("ds.yaml", "ds.json"):
        config = train_config(tmp_path, deepspeed=str(tmp_path / name))
        config.validate()
        assert deepspeed_config(config) == written


@pytest.mark.parametrize(
    ("settings", "options", "message"),
    [
        (
            {"optimizer": {"type": "AdamW"}},
            {},
            "omotool provides the optimizer: remove the optimizer block",
        ),
        ({"scheduler": {"type": "WarmupLR"}}, {}, "remove the scheduler block"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            {},
            "zero_optimization.offload_optimizer",
        ),
        (
            {"zero_optimization": {"stage": 3}},
            {},
            "set it to true",
        ),  # stage3_gather_16bit_weights_on_model_save
        ({}, {"fsdp": True}, "--fsdp both shard the model"),
        (
            {},
            {"merge": "dare", "base": "b", "rescale": "l1"},
            "the l1 rescale is not supported on DeepSpeed's partitions",
        ),
        (
            {},
            {"merge": "ties", "task_vector": "t", "optimizer_backend": "triton"},
            "--optimizer-backend triton with --deepspeed",
        ),
    ],
    ids=["optimizer", "scheduler", "offload", "zero3-unsaved", "fsdp", "l1", "triton"],
)
def test_deepspeed_refusals_name_what_to_do(launched, tmp_path, settings, options, message) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(UsageError, match=re.escape(message)) as refused:
        train_config(tmp_path, deepspeed=str(path), **options).validate()
    assert refused.value.exit_code == 2


@pytest.mark.parametrize(
    "options", [{"merge": "dare", "base": "b"}, {"merge": "ties", "task_vector": "t"}]
)
def test_online_merging_runs_under_deepspeed(launched, tmp_path, options) -> None:
    train_config(tmp_path, deepspeed="zero2", **options).validate()


def test_offload_to_none_is_no_offload(launched, tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "none"}}}))
    train_config(tmp_path, deepspeed=str(path)).validate()


def test_an_unreadable_deepspeed_config_is_named(launched, tmp_path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(InputError, match=re.escape(f"cannot read {missing}")):
        train_config(tmp_path, deepspeed=str(missing)).validate()
    with pytest.raises(InputError, match="cannot read zero4 .* or one of zero1, zero2, zero3"):
        train_config(tmp_path, deepspeed="zero4").validate()
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2}')
    with pytest.raises(InputError, match=re.escape(f"{broken} is not valid JSON or YAML")):
        train_config(tmp_path, deepspeed=str(broken)).validate()
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a mapping"):
        train_config(tmp_path, deepspeed=str(listed)).validate()


def test_deepspeed_not_installed_says_how_to_install(launched, tmp_path, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else
        find_spec(name, *a),
    )  # fmt: skip
    with pytest.raises(UsageError, match=re.escape("pip install 'omotool[deepspeed]'")):
        train_config(tmp_path, deepspeed="zero2").validate()


def test_deepspeed_needs_a_launcher(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match=re.escape("torchrun --nproc_per_node N -m omotool")):
        train_config(tmp_path, deepspeed="zero2").validate()


# -- resuming --------------------------------------------------------------------------------
def config(stage: int) -> TrainConfig:
    return TrainConfig(model="m", dataset="d", out="o", merge="none", deepspeed=f"zero{stage}")


def deepspeed_run(folder: Path, stage: int, processes: int, monkeypatch) -> Path:
    """A run folder as a DeepSpeed run leaves it: its record, and a checkpoint whose
    ``global_step2`` holds DeepSpeed's files (empty here)."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    folder.mkdir()
    (folder / DEEPSPEED_FILE).write_text(json.dumps(deepspeed_record(config(stage))))
    saved = folder / "checkpoint-2" / "global_step2"
    saved.mkdir(parents=True)
    for rank in range(processes):
        (saved / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    return saved.parent


def test_the_record_names_the_stage_and_the_processes(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    record = deepspeed_record(config(3))
    assert (record["config"], record["zero_stage"], record["world_size"]) == ("zero3", 3, 4)
    assert record["settings"]["zero_optimization"]["stage"] == 3
    assert deepspeed_record(TrainConfig()) is None


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_deepspeed_run_resumes_on_its_processes_only(tmp_path, monkeypatch, stage) -> None:
    checkpoint = deepspeed_run(tmp_path / "run", stage, processes=2, monkeypatch=monkeypatch)
    check_deepspeed_resume(config(stage), checkpoint)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="made by 2 DeepSpeed processes, this one has 4"):
        check_deepspeed_resume(config(stage), checkpoint)


def test_a_resume_under_another_zero_stage_is_refused(tmp_path, monkeypatch) -> None:
    checkpoint = deepspeed_run(tmp_path / "run", 3, processes=2, monkeypatch=monkeypatch)
    with pytest.raises(UsageError, match="made under ZeRO-3, --deepspeed zero2 is ZeRO-2"):
        check_deepspeed_resume(config(2), checkpoint)
    ds = tmp_path / "ds.json"  # the same file, edited since: still refused
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    edited = TrainConfig(model="m", dataset="d", out="o", merge="none", deepspeed=str(ds))
    with pytest.raises(UsageError, match="ZeRO-3, --deepspeed .* is ZeRO-1"):
        check_deepspeed_resume(edited, checkpoint)


def test_a_checkpoint_without_deepspeed_state_is_named(tmp_path, monkeypatch) -> None:
    checkpoint = deepspeed_run(tmp_path / "run", 2, processes=2, monkeypatch=monkeypatch)
    (checkpoint.parent / DEEPSPEED_FILE).unlink()
    with pytest.raises(InputError, match="cannot read .*deepspeed.json"):
        check_deepspeed_resume(config(2), checkpoint)
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(InputError, match="holds no DeepSpeed checkpoint"):
        check_deepspeed_resume(config(2), tmp_path / "checkpoint-2")
    check_deepspeed_resume(TrainConfig(model="m", dataset="d", out="o"), tmp_path)  # no DS


def test_the_shipped_configs_are_package_data() -> None:
    """``--deepspeed zero2`` works from an installed wheel: the configs live inside the package
    and pyproject.toml declares them as its data (a wheel built from it holds them)."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.resources import files

    from omotool.train.deepspeed import DEEPSPEED_CONFIGS, DEEPSPEED_STAGES

    shipped = files("omotool.train") / "deepspeed_configs"
    assert Path(str(shipped)) == DEEPSPEED_CONFIGS
    assert sorted(p.name for p in DEEPSPEED_CONFIGS.iterdir()) == [
        f"{stage}.json" for stage in DEEPSPEED_STAGES
    ]
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["setuptools"]["package-data"]["omotool.train"]
    for stage in DEEPSPEED_STAGES:
        relative = f"deepspeed_configs/{stage}.json"
        assert any(Path(relative).match(pattern) for pattern in declared), relative
        assert json.loads((shipped / f"{stage}.json").read_text())["zero_optimization"]
