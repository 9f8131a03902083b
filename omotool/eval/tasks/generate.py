"""The ``generate`` task: answers generated for ``prompt`` rows, compared with ``reference``
(``eval/generation.py``); options ``extract`` (exact, regex, last_number,
contains) and ``pattern``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omotool.errors import InputError
from omotool.eval.tasks.base import TASKS, Answers, EvalTask, TaskRun


def _example(row: dict[str, Any], where: str) -> dict[str, Any]:
    reference = row["reference"]
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
        raise InputError(f"{where}: 'reference' must be text or a number.")
    row["reference"] = str(reference)
    return row


def _check(options: dict[str, Any], folder: Path | None) -> None:
    from omotool.eval.generation import check_extract

    check_extract(options.get("extract", "exact"), options.get("pattern"))


def _run(run: TaskRun) -> tuple[Any, Answers]:
    from omotool.eval.generation import generate_scores

    model, tokenizer = run.model()
    options = run.spec.options
    return generate_scores(
        model, tokenizer, run.spec.examples, options.get("extract", "exact"),
        options.get("pattern"), run.settings, run.batch_size, run.progress,
    )  # fmt: skip


TASKS.register("generate", help="Generated answers compared with references; accuracy.")(
    EvalTask(
        category="capability",
        headline="accuracy",
        run=_run,
        fields=("prompt", "reference"),
        text_fields=("prompt",),
        example=_example,
        options=("extract", "pattern"),
        check=_check,
        generates=True,
    )
)
