"""The ``lm_eval`` task: lm-evaluation-harness tasks by name (``eval/harness.py``); no data
file. Options ``tasks`` (names, a list or comma-separated), ``include_path`` (a folder of
task YAMLs), ``num_fewshot``, ``limit``. Its headline is its first metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omotool.errors import UsageError
from omotool.eval.tasks.base import FIRST_SCORE, TASKS, Answers, EvalTask, TaskRun


def _check(options: dict[str, Any], folder: Path | None) -> None:
    if folder is None:  # the command line: --lm-tasks NAME[,NAME...], --include-path
        if not options.get("tasks"):
            raise UsageError("--task lm_eval needs --lm-tasks NAME[,NAME...].")
        options["tasks"] = [t.strip() for t in options["tasks"].split(",") if t.strip()]
        if not options["tasks"]:
            raise UsageError("--lm-tasks names no task; give NAME[,NAME...].")
        return
    for key in ("num_fewshot", "limit"):
        value = options.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UsageError(f"{key} must be a whole number >= 0, not {value!r}.")
    if not options.get("tasks"):
        raise UsageError("the lm_eval task needs 'tasks' (harness task names).")
    if isinstance(options["tasks"], str):
        options["tasks"] = [t.strip() for t in options["tasks"].split(",") if t.strip()]
    if not isinstance(options["tasks"], list) or not all(
        isinstance(t, str) for t in options["tasks"]
    ):
        raise UsageError("'tasks' must be harness task names (list or commas).")
    if options.get("include_path"):
        if not isinstance(options["include_path"], str):
            raise UsageError("'include_path' must be a folder.")
        options["include_path"] = str(folder / options["include_path"])


def _run(run: TaskRun) -> tuple[Any, Answers]:
    from omotool.eval.harness import lm_eval_scores

    options = run.spec.options  # the harness loads the model itself
    return lm_eval_scores(
        run.model_path, options["tasks"], options.get("include_path"), run.batch_size,
        options.get("num_fewshot"), options.get("limit"), run.models.placement,
    ), None  # fmt: skip


def _passes(examples: Sequence[Any]) -> int:
    return 1  # the harness shows its own progress


TASKS.register("lm_eval", help="lm-evaluation-harness tasks (GSM8K, MMLU, ...).")(
    EvalTask(
        category="capability",
        headline=FIRST_SCORE,
        run=_run,
        reads_data=False,
        options=("tasks", "include_path", "num_fewshot", "limit"),
        check=_check,
        passes=_passes,
    )
)
