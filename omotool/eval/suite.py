"""Evaluation suites: which tasks, on which data, counting toward reward or capability (tax).

A suite is a YAML file::

    baseline: runs/adamw            # differences are reported against this model (optional)
    reference: runs/sft             # the reference of the preference task
    batch_size: 8
    device: auto                    # auto, cpu, cuda or cuda:N (optional; --device overrides)
    dtype: auto                     # auto, float32, bfloat16, float16 (optional; --dtype overrides)
    generation: {max_new_tokens: 64, temperature: 0.0, top_p: 1.0}  # chat: true/false forces it
    tasks:
      - {name: prefs, task: preference, data: prefs-test.jsonl, category: reward, beta: 0.1}
      - {name: sums, task: generate, data: sums.jsonl, category: capability,
         extract: last_number, until: ["\n", "Question:"]}
      - {name: facts, task: choice, data: facts.jsonl, category: capability}
      - {name: prose, task: perplexity, data: prose.txt, category: capability}
      - {name: helpful, task: reward_model, data: prompts.jsonl, category: reward,
         reward_model: runs/rm}

Relative paths are taken from the suite file's folder. Every task's data is read and checked
when the suite is loaded, before any model is.

What each task reads, which keys it may set and how it runs is its entry in
``eval/tasks`` (``TASKS``); nothing here names a task. A key a task does not take is an error.

``generation`` holds the defaults of ``GenerationSettings`` (``max_new_tokens``,
``temperature``, ``top_p``, ``seed``, ``chat``, ``until``: stop sequences); a task that
generates (``generate``, ``reward_model``) may set any of them for itself, and a task that
renders prompts with the chat template (``choice``) its own ``chat`` (``task_generation``).
Giving one to a task it cannot affect is an error.

``device`` and ``dtype`` say where the models are loaded and in which dtype (``eval/device.py``;
``auto`` when not given); the command line's ``--device``/``--dtype`` override them. Their
spelling is checked when the suite is loaded, whether the machine has the device when it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omotool.errors import InputError, UsageError
from omotool.eval.device import check_device, check_dtype
from omotool.eval.generation import GENERATION_KEYS, GenerationSettings, settings_from
from omotool.eval.tasks import TASKS, EvalTask, TaskSpec, readers, resolve

CATEGORIES = ("reward", "capability")
SPEC_KEYS = ("name", "task", "data", "category")  # a suite entry's keys that every task has

__all__ = ["CATEGORIES", "Suite", "TaskSpec", "load_suite", "single_task_suite", "task_generation"]


@dataclass
class Suite:
    tasks: list[TaskSpec]
    baseline: str | None = None
    reference: str | None = None
    batch_size: int = 8
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    path: Path | None = None
    device: str | None = None  # None: auto (see eval/device.py)
    dtype: str | None = None


def load_suite(path: str | Path) -> Suite:
    """The suite in ``path`` with every task's data read and checked (see module)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise InputError(f"suite {path} cannot be read ({error.strerror or error}).") from None
    except yaml.YAMLError as error:
        raise InputError(f"suite {path}: not valid YAML ({error}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise InputError(f"suite {path}: needs a non-empty 'tasks' list.")
    known = {"baseline", "reference", "batch_size", "generation", "tasks", "device", "dtype"}
    unknown = set(raw) - known
    if unknown:
        raise InputError(f"suite {path}: unknown key(s) {', '.join(sorted(unknown))}.")
    folder = path.parent
    try:
        generation = settings_from(raw.get("generation") or {}, where=f"suite {path}: generation: ")
    except UsageError as error:
        raise InputError(str(error)) from None
    batch_size = raw.get("batch_size", 8)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"suite {path}: batch_size must be a whole number >= 1.")
    for key in ("baseline", "reference"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise InputError(f"suite {path}: {key} must be a model folder or Hub id.")
    placement = {}
    for key, check in (("device", check_device), ("dtype", check_dtype)):
        if raw.get(key) is not None:
            try:
                placement[key] = check(raw[key], f"suite {path}: {key}")
            except UsageError as error:
                raise InputError(str(error)) from None
    tasks = [_task(entry, number, folder, path) for number, entry in enumerate(raw["tasks"])]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"suite {path}: task names repeat ({', '.join(names)}).")
    needing = [t.task for t in tasks if TASKS.get(t.task).needs_reference]
    if needing and not raw.get("reference"):
        raise InputError(f"suite {path}: the {needing[0]} task needs 'reference' (the SFT model).")
    suite = Suite(
        tasks=tasks,
        baseline=resolve(raw.get("baseline"), folder),
        reference=resolve(raw.get("reference"), folder),
        batch_size=batch_size,
        generation=generation,
        path=path,
        **placement,
    )
    for number, spec in enumerate(tasks):
        try:
            task_generation(spec, suite, where=f"suite {path}, task {number}: ")  # checked now
        except UsageError as error:
            raise InputError(str(error)) from None
    return suite


def task_generation(spec: TaskSpec, suite: Suite, where: str = "") -> GenerationSettings:
    """The generation settings of ``spec``: the suite's, with the task's own keys over them
    (a ``UsageError`` for a key the task cannot use: see module docstring)."""
    own = {key: value for key, value in spec.options.items() if key in GENERATION_KEYS}
    unused = [key for key in own if key not in generation_keys(TASKS.get(spec.task))]
    if unused:
        generating = readers(GENERATION_KEYS)
        chat = [name for name in readers(["chat"]) if name not in generating]
        raise UsageError(
            f"{where}{', '.join(unused)} has no effect on a {spec.task} task (generation keys "
            f"apply to {', '.join(generating)}"
            + (f"; chat also to {', '.join(chat)})." if chat else ").")
        )
    return settings_from(own, suite.generation, where=where)


def generation_keys(task: EvalTask) -> tuple[str, ...]:
    """The generation keys that change what ``task`` does."""
    return GENERATION_KEYS if task.generates else ("chat",) if task.chat else ()


def task_entry(kind: Any, where: str = "") -> EvalTask:
    """The ``TASKS`` entry called ``kind``; a ``UsageError`` listing the tasks otherwise."""
    if not isinstance(kind, str) or kind not in TASKS:
        raise UsageError(
            f"{where}unknown task {kind!r}; valid tasks: {', '.join(TASKS)}."
            + TASKS.suggestion(kind)
        )
    return TASKS.get(kind)


def _unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` read as in Python (a shell passes them literally)."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda match: escapes[match.group(1)], text)


def _task(entry: Any, number: int, folder: Path, path: Path) -> TaskSpec:
    where = f"suite {path}, task {number}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping with name, task, data, category.")
    kind = entry.get("task")
    task = task_entry(kind, f"{where}: ")
    category = entry.get("category")
    if category not in CATEGORIES:
        raise InputError(f"{where}: category must be one of {', '.join(CATEGORIES)}.")
    if "data" not in entry and task.reads_data:
        raise InputError(f"{where}: missing 'data'.")
    if "data" in entry and not isinstance(entry["data"], str):
        raise InputError(f"{where}: 'data' must be a file path.")
    options = {k: v for k, v in entry.items() if k not in SPEC_KEYS}
    unknown = [k for k in options if k not in task.options and k not in GENERATION_KEYS]
    if unknown:
        valid = (*SPEC_KEYS, *task.options, *generation_keys(task))
        raise InputError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))} for a {kind} task "
            f"(valid: {', '.join(valid)})."
        )
    try:
        task.check(options, folder)  # the values a model run would otherwise trip over
    except UsageError as error:
        raise InputError(f"{where}: {error}") from None
    name = str(entry.get("name", kind))
    if not task.reads_data:
        return TaskSpec(name, kind, folder, category, options)
    data = folder / entry["data"]
    spec = TaskSpec(name, kind, data, category, options)
    spec.examples = task.read_data(kind, data)
    return spec


def single_task_suite(
    task: str,
    data: str | Path | None,
    reference: str | None = None,
    baseline: str | None = None,
    batch_size: int = 8,
    generation: dict[str, Any] | None = None,
    **options: Any,
) -> Suite:
    """A suite of one task (``omotool eval MODEL --task T --data D``).

    ``generation`` holds the command line's generation settings (``until``: a list of stop
    sequences, backslash escapes read as in Python; ``chat``); ``None`` values are not given."""
    entry = task_entry(task)
    if entry.needs_reference and not reference:
        raise UsageError(f"--task {task} needs --ref-model (the SFT model).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}.")
    given = {key: value for key, value in (generation or {}).items() if value not in (None, [])}
    if isinstance(given.get("until"), list):
        given["until"] = [_unescape(s) if isinstance(s, str) else s for s in given["until"]]
    unused = [key for key in given if key not in generation_keys(entry)]
    if unused:
        flags = ", ".join("--chat/--no-chat" if key == "chat" else f"--{key}" for key in unused)
        raise UsageError(
            f"{flags} has no effect on --task {task} (it applies to --task "
            f"{', '.join(readers(unused))})."
        )
    settings = settings_from(given, flags=True)
    spec = TaskSpec(
        task, task, Path(data or "."), entry.category, {k: v for k, v in options.items() if v}
    )
    entry.check(spec.options, None)
    if entry.reads_data:
        if data is None:
            raise UsageError(f"--task {task} needs --data FILE.")
        spec.examples = entry.read_data(task, Path(data))
    return Suite(
        [spec], baseline=baseline, reference=reference, batch_size=batch_size, generation=settings
    )
