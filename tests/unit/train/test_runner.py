"""run_training's checks that read no model: resuming a DeepSpeed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omotool.errors import InputError, UsageError
from omotool.train.arguments import TrainConfig
from omotool.train.runner import DEEPSPEED_FILE, check_deepspeed_resume, deepspeed_record


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
