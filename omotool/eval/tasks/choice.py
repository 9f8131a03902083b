"""The ``choice`` task: multiple choice by log-likelihood (``eval/likelihood.py``); rows hold
``question``, ``choices`` (at least 2) and ``answer`` (index, letter or the option's text)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omotool.errors import InputError
from omotool.eval.tasks.base import TASKS, Answers, EvalTask, TaskRun


def _example(row: dict[str, Any], where: str) -> dict[str, Any]:
    from omotool.eval.likelihood import answer_index

    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise InputError(f"{where}: 'choices' must be a list of at least 2 options.")
    if not all(isinstance(c, str) for c in choices):
        raise InputError(f"{where}: every option in 'choices' must be text.")
    answer_index(row, f"{where}: ")
    return row


def _run(run: TaskRun) -> tuple[Any, Answers]:
    from omotool.eval.likelihood import choice_scores

    model, tokenizer = run.model()
    examples, chat = run.spec.examples, run.settings.chat
    return choice_scores(model, tokenizer, examples, run.batch_size, run.progress, chat), None


def _passes(examples: Sequence[dict[str, Any]]) -> int:
    return sum(len(e["choices"]) for e in examples)  # every option is scored: one pass


TASKS.register("choice", help="Multiple choice by log-likelihood; accuracy.")(
    EvalTask(
        category="capability",
        headline="accuracy",
        run=_run,
        fields=("question", "choices", "answer"),
        text_fields=("question",),
        example=_example,
        chat=True,
        passes=_passes,
    )
)
