"""What an eval task is: one ``EvalTask`` entry in ``TASKS``, everything task-specific in it.

A suite entry ``{name, task, data, category, ...}`` becomes a ``TaskSpec``; ``TASKS.get(task)``
says how to check it and how to run it:

- ``category``: the category of a command-line ``--task`` run (a suite names its own);
- ``fields`` / ``text_fields`` / ``example``: what each row of its data must hold, read by
  ``read_rows`` (or ``read``: a reader of its own; ``reads_data=False``: no data file);
- ``options``: the keys a suite entry of this task may set besides name, task, data, category
  and the generation keys; ``check(options, folder)`` checks and normalises their values
  (``folder``: the suite's folder, paths are resolved against it; ``None``: the options come
  from the command line) and raises ``UsageError`` naming the problem;
- ``generates``: it generates answers, so every generation setting applies to it; ``chat``: it
  renders prompts with the chat template, so the ``chat`` setting applies;
- ``needs_reference``: the suite's reference model is part of its scores (and is kept loaded);
- ``headline``: the score averaged into its category (higher is better); ``None``: reported,
  not averaged; ``FIRST_SCORE``: whichever score it reports first;
- ``run(TaskRun) -> (TaskScores, answers or None)``: the task on one model; ``passes``: the
  examples of one pass (for progress); ``shared``: keys of models every evaluated model needs.

Adding a task is one module in ``omotool/eval/tasks/`` that calls ``TASKS.register``; the
package imports every module in it, and suites, the runner and ``omotool eval`` read the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omotool.errors import InputError
from omotool.registry import Registry

if TYPE_CHECKING:
    from omotool.eval.generation import GenerationSettings
    from omotool.eval.preference import TaskScores

FIRST_SCORE = "*"  # a headline meaning "the first score the task reports" (lm_eval's metrics)
Answers = list[str] | None  # a generating task's answers, kept for the report


@dataclass
class TaskSpec:
    """One task of a suite: its name, kind (a ``TASKS`` name), data and checked options."""

    name: str
    task: str
    data: Path
    category: str
    options: dict[str, Any] = field(default_factory=dict)
    examples: list[Any] = field(default_factory=list)


@dataclass
class TaskRun:
    """What ``EvalTask.run`` is given: one task, one model, and the models held so far.

    ``models`` loads and holds models by path (``get(path)``, ``key(path)``,
    ``reward_model(path)``, ``reward_model_key(path)``, ``reference_logps``, ``placement``;
    ``eval/runner.py``); ``progress(done)`` follows each pass over the examples."""

    spec: TaskSpec
    model_path: str
    models: Any
    settings: GenerationSettings
    batch_size: int
    reference: str | None = None
    baseline_answers: Answers = None
    progress: Callable[[int], None] | None = None

    def model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the model under evaluation, loaded on first use."""
        return self.models.get(self.model_path)


def _no_check(options: dict[str, Any], folder: Path | None) -> None:
    return None


def _nothing_shared(spec: TaskSpec, models: Any, reference: str | None) -> set[str]:
    return set()


@dataclass(frozen=True)
class EvalTask:
    """One kind of eval task (see module docstring for each field)."""

    category: str
    headline: str | None
    run: Callable[[TaskRun], tuple[TaskScores, Answers]]
    fields: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ()
    example: Callable[[dict[str, Any], str], Any] | None = None
    read: Callable[[Path], list[Any]] | None = None
    reads_data: bool = True
    options: tuple[str, ...] = ()
    check: Callable[[dict[str, Any], Path | None], None] = _no_check
    generates: bool = False
    chat: bool = False
    needs_reference: bool = False
    passes: Callable[[Sequence[Any]], int] = len
    shared: Callable[[TaskSpec, Any, str | None], set[str]] = _nothing_shared

    def read_data(self, kind: str, data: Path) -> list[Any]:
        """The examples in ``data``, checked row by row (errors name the file and line)."""
        if self.read is not None:
            return self.read(data)
        return read_rows(data, kind, self.fields, self.text_fields, self.example)


TASKS: Registry[EvalTask] = Registry("task")


def read_rows(
    data: Path,
    kind: str,
    fields: Sequence[str],
    text_fields: Sequence[str] = (),
    example: Callable[[dict[str, Any], str], Any] | None = None,
) -> list[Any]:
    """The rows of ``data`` (JSONL, JSON, CSV), each with every one of ``fields`` set and
    ``text_fields`` text; ``example(row, where)`` checks a row further and returns what the
    task keeps of it (the row itself when not given)."""
    from omotool.data import read_rows as rows_of

    examples = []
    for row in rows_of(data):
        missing = [name for name in fields if row.fields.get(name) in (None, "")]
        if missing:
            raise InputError(
                f"{row.where}: missing field {', '.join(repr(m) for m in missing)} "
                f"(the {kind} task reads {', '.join(fields)})."
            )
        for name in text_fields:
            if not isinstance(row.fields[name], str):
                raise InputError(f"{row.where}: {name!r} must be text, not {row.fields[name]!r}.")
        examples.append(row.fields if example is None else example(row.fields, row.where))
    if not examples:
        raise InputError(f"{data}: no examples (the dataset is empty).")
    return examples


def resolve(value: str | None, folder: Path) -> str | None:
    """``value`` as a path under ``folder`` when that exists, else as given (a Hub id)."""
    if value is None:
        return None
    candidate = folder / value
    return str(candidate) if candidate.exists() else str(value)


def readers(keys: Sequence[str]) -> list[str]:
    """The tasks that read every one of the generation ``keys``: the generating ones first."""
    reading = []
    for name in TASKS:
        task = TASKS.get(name)
        if task.generates or (task.chat and set(keys) <= {"chat"}):
            reading.append((not task.generates, name))
    return [name for _, name in sorted(reading)]


def headline_name(kind: str) -> str | None:
    """The headline score of a task of ``kind`` (see ``EvalTask.headline``)."""
    return TASKS.get(kind).headline
