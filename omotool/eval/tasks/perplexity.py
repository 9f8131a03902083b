"""The ``perplexity`` task: perplexity of documents (``eval/likelihood.py``): a ``.txt`` file
of documents separated by blank lines, or rows with a ``text`` field. Not a fraction, so it is
reported but not averaged into its category."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omotool.errors import InputError
from omotool.eval.tasks.base import TASKS, Answers, EvalTask, TaskRun, read_rows


def _read(data: Path) -> list[Any]:
    if data.suffix != ".txt":
        return read_rows(data, "perplexity", ("text",), ("text",), lambda row, _: row["text"])
    if not data.exists():
        raise InputError(f"data file {data} does not exist.")
    documents = [d.strip() for d in data.read_text(encoding="utf-8").split("\n\n")]
    documents = [d for d in documents if d]
    if not documents:
        raise InputError(f"{data}: no documents (the file is empty).")
    return documents


def _run(run: TaskRun) -> tuple[Any, Answers]:
    from omotool.eval.likelihood import perplexity_scores

    model, tokenizer = run.model()
    return perplexity_scores(
        model, tokenizer, run.spec.examples, run.batch_size, run.progress
    ), None


TASKS.register("perplexity", help="Perplexity of documents (reported, not averaged).")(
    EvalTask(category="capability", headline=None, run=_run, read=_read)
)
