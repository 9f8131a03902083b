"""A rich progress bar for training runs: steps with ETA, live loss, and the reward accuracy (DPO
family) or the mean reward (GRPO, RLOO); the table of an online step's completions."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

MISSING = "–"  # a metric that is missing or None (TRL logs None where no reward applied)


def is_main_process() -> bool:
    """Whether this process shows the run (progress, summary): rank 0 of a torchrun or
    accelerate launch (``RANK``), or a process started alone. The other ranks only train."""
    return int(os.environ.get("RANK", "0")) == 0


def metric_text(value: Any, spec: str = ".4g") -> str:
    """``value`` formatted with ``spec``; ``MISSING`` for None, ``nan``/``inf``/``-inf`` for
    non-finite numbers, ``str(value)`` for what is not a number."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(float(value))
    return format(value, spec)


def progress_callback(console: Console) -> Any:
    """A transformers ``TrainerCallback`` drawing a progress bar on ``console`` (main process)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.task: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if not state.is_world_process_zero:
                return
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=state.max_steps, completed=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if self.bar is None or not logs or "loss" not in logs:
                return
            shown = [f"loss {metric_text(logs['loss'], '.4f')}"]
            if "rewards/accuracies" in logs:
                shown.append(f"reward acc {metric_text(logs['rewards/accuracies'], '.2f')}")
            if "reward" in logs:  # online RL: the mean reward of the step's completions
                shown.append(f"reward {metric_text(logs['reward'], '.3f')}")
            self.bar.update(self.task, description="  ".join(shown))

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()


def completions_table(step: int, rows: Sequence[Mapping[str, Any]]) -> Table:
    """The completions of ``rows`` (``omotool.train.trainer.completion_rows``: prompt,
    completion, rewards by name, advantage) as a table titled with ``step``."""
    names = list(dict.fromkeys(name for row in rows for name in row["rewards"]))
    table = Table(title=f"completions at step {step}", show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("completion", overflow="fold")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("advantage", justify="right")
    for row in rows:
        table.add_row(
            _text(row["prompt"]),
            _text(row["completion"]),
            *(metric_text(row["rewards"].get(name), ".3g") for name in names),
            metric_text(row["advantage"], ".3g"),
        )
    return table


def _text(value: Any) -> Text:
    """A prompt or completion as plain text (no rich markup): a conversation's last message."""
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        value = value[-1].get("content", value[-1])
    return Text(str(value))
