"""Checkpoint listing and rotation (the atomic save itself runs in tests/integration), and
where Ctrl-C stops."""

from __future__ import annotations

import signal
from types import SimpleNamespace

from omotool.io.formats import write_text_atomic
from omotool.train.checkpoints import Interrupt, checkpoints, rotate_checkpoints


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


def test_ctrl_c_stops_at_a_multiple_of_the_generation_buffer() -> None:
    """With a buffer of 2 steps, Ctrl-C during step 3 ends the run after step 4, not 3: a
    checkpoint inside the buffer could not be resumed from."""
    interrupt = Interrupt(every=2)
    callback = interrupt.callback()
    interrupt.handler(signal.SIGINT, None)
    for step, stops in ((3, False), (4, True)):
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_step_end(None, SimpleNamespace(global_step=step), control)
        assert control.should_save is stops and control.should_training_stop is stops
