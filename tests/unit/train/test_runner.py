"""run_training's checks that read no model: resuming a DeepSpeed checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from omotool.errors import InputError, UsageError
from omotool.train.arguments import TrainConfig
from omotool.train.runner import check_deepspeed_resume


def deepspeed_checkpoint(folder: Path, ranks: int, zero3: bool) -> Path:
    """The file names DeepSpeed writes into ``checkpoint-2/global_step2`` (empty files)."""
    saved = folder / "checkpoint-2" / "global_step2"
    saved.mkdir(parents=True)
    for rank in range(ranks):
        (saved / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
        if zero3:
            (saved / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
    if not zero3:
        (saved / "mp_rank_00_model_states.pt").touch()
    return saved.parent


def config(stage: int) -> TrainConfig:
    return TrainConfig(model="m", dataset="d", out="o", merge="none", deepspeed=f"zero{stage}")


@pytest.mark.parametrize(("stage", "zero3"), [(2, False), (1, False), (3, True)])
def test_a_deepspeed_checkpoint_resumes_on_its_world_size_and_stage(
    tmp_path, monkeypatch, stage, zero3
) -> None:
    checkpoint = deepspeed_checkpoint(tmp_path, ranks=2, zero3=zero3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_deepspeed_resume(config(stage), checkpoint)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="saved by 2 DeepSpeed processes, this run has 4"):
        check_deepspeed_resume(config(stage), checkpoint)


def test_a_resume_under_another_zero_stage_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    zero3 = deepspeed_checkpoint(tmp_path / "a", ranks=2, zero3=True)
    with pytest.raises(UsageError, match="saved under ZeRO-3, --deepspeed zero2 is ZeRO-2"):
        check_deepspeed_resume(config(2), zero3)
    zero2 = deepspeed_checkpoint(tmp_path / "b", ranks=2, zero3=False)
    with pytest.raises(UsageError, match="saved under ZeRO-1/2, --deepspeed zero3 is ZeRO-3"):
        check_deepspeed_resume(config(3), zero2)


def test_a_checkpoint_without_deepspeed_state_is_named(tmp_path) -> None:
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(InputError, match="holds no DeepSpeed checkpoint"):
        check_deepspeed_resume(config(2), tmp_path / "checkpoint-2")
    check_deepspeed_resume(TrainConfig(model="m", dataset="d", out="o"), tmp_path)  # no DS
