"""Checkpoint listing and rotation (the atomic save itself runs in tests/integration)."""

from __future__ import annotations

from omotool.io.formats import write_text_atomic
from omotool.train.checkpoints import checkpoints, rotate_checkpoints


def test_only_complete_checkpoints_count_and_rotation_keeps_the_newest(tmp_path) -> None:
    for step in (3, 6, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".staging" / "checkpoint-12").mkdir(parents=True)
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]
    rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-9"]
    rotate_checkpoints(tmp_path, 0)  # 0 / None: keep all
    assert len(checkpoints(tmp_path)) == 2


def test_write_atomic_leaves_no_partial_file(tmp_path) -> None:
    target = tmp_path / "config.yaml"
    write_text_atomic(target, "a: 1")
    write_text_atomic(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
