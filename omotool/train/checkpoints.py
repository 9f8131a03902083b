"""Checkpoints that appear only when complete, their rotation, and Ctrl-C at a step boundary.

transformers writes ``checkpoint-N`` in place and resumes from the highest number, so a run
killed while saving would resume from a half-written folder. Here a checkpoint is written under
``.staging/`` and renamed into place once complete (``trainer.online_merging_trainer``), only
complete checkpoints are listed, and rotation never deletes the newest one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"  # checkpoints are written here, then renamed into place when complete


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints in ``output``, oldest first (staging folders are never listed)."""
    found = [
        (int(match.group(1)), path)
        for path in output.iterdir()
        if path.is_dir() and (match := CHECKPOINT.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def rotate_checkpoints(output: Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (the newest always stays)."""
    if not limit:
        return
    for old in checkpoints(output)[: -max(1, limit)]:
        shutil.rmtree(old, ignore_errors=True)


class Interrupt:
    """Ctrl-C ends the run at the next step boundary with a checkpoint; twice, at once.

    ``every``: the run stops only at a step that is a multiple of it (GRPO/RLOO's generation
    buffer, ``runner.generation_buffer_steps``), so that its checkpoint can be resumed from."""

    def __init__(self, every: int = 1) -> None:
        self.requested = False
        self.every = every

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def callback(self) -> Any:
        from transformers import TrainerCallback

        interrupt = self

        class StopAndSave(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                if interrupt.requested and state.global_step % interrupt.every == 0:
                    control.should_save = True
                    control.should_training_stop = True

        return StopAndSave()
