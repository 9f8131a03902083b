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

``generation`` holds the defaults of ``GenerationSettings`` (``max_new_tokens``,
``temperature``, ``top_p``, ``seed``, ``chat``, ``until``: stop sequences); a task that
generates (``generate``, ``reward_model``) may set any of them for itself, and a ``choice``
task its own ``chat`` (``task_generation``). Giving one to a task it cannot affect is an error.

``device`` and ``dtype`` say where the models are loaded and in which dtype (``eval/device.py``;
``auto`` when not given); the command line's ``--device``/``--dtype`` override them. Their
spelling is checked when the suite is loaded, whether the machine has the device when it runs.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omotool.errors import InputError, UsageError
from omotool.eval.device import check_device, check_dtype
from omotool.eval.generation import (
    GENERATION_KEYS,
    GenerationSettings,
    check_extract,
    settings_from,
)

TASKS = ("preference", "reward_model", "perplexity", "generate", "choice", "lm_eval")
CATEGORIES = ("reward", "capability")
HEADLINE = {  # the score a task contributes to its category's average (higher is better)
    "preference": "reward_accuracy",
    "reward_model": "win_rate",
    "generate": "accuracy",
    "choice": "accuracy",
    "perplexity": None,  # not a fraction: reported, not averaged
    "lm_eval": "",  # the first metric of its first task
}
GENERATING = ("generate", "reward_model")  # tasks whose answers are generated
CHAT = ("generate", "reward_model", "choice")  # tasks that may render with the chat template


@dataclass
class TaskSpec:
    name: str
    task: str
    data: Path
    category: str
    options: dict[str, Any] = field(default_factory=dict)
    examples: list[Any] = field(default_factory=list)


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
    if any(t.task == "preference" for t in tasks) and not raw.get("reference"):
        raise InputError(f"suite {path}: the preference task needs 'reference' (the SFT model).")
    suite = Suite(
        tasks=tasks,
        baseline=_resolve(raw.get("baseline"), folder),
        reference=_resolve(raw.get("reference"), folder),
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
    unused = [key for key in own if key not in _generation_keys(spec.task)]
    if unused:
        raise UsageError(
            f"{where}{', '.join(unused)} has no effect on a {spec.task} task (generation keys "
            f"apply to {', '.join(GENERATING)}; chat also to choice)."
        )
    return settings_from(own, suite.generation, where=where)


def _resolve(value: str | None, folder: Path) -> str | None:
    if value is None:
        return None
    candidate = folder / value
    return str(candidate) if candidate.exists() else str(value)  # else: a Hub id


def _generation_keys(kind: str) -> tuple[str, ...]:
    """The generation keys that change what a task of ``kind`` does."""
    return GENERATION_KEYS if kind in GENERATING else ("chat",) if kind in CHAT else ()


def _unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` read as in Python (a shell passes them literally)."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda match: escapes[match.group(1)], text)


def _task(entry: Any, number: int, folder: Path, path: Path) -> TaskSpec:
    where = f"suite {path}, task {number}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping with name, task, data, category.")
    kind = entry.get("task")
    if kind not in TASKS:
        close = difflib.get_close_matches(str(kind), TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"{where}: unknown task {kind!r}; valid tasks: {', '.join(TASKS)}.{hint}")
    category = entry.get("category")
    if category not in CATEGORIES:
        raise InputError(f"{where}: category must be one of {', '.join(CATEGORIES)}.")
    if "data" not in entry and kind != "lm_eval":
        raise InputError(f"{where}: missing 'data'.")
    if "data" in entry and not isinstance(entry["data"], str):
        raise InputError(f"{where}: 'data' must be a file path.")
    options = {k: v for k, v in entry.items() if k not in ("name", "task", "data", "category")}
    _check_options(kind, options, where)
    if kind == "reward_model":
        if not isinstance(options.get("reward_model"), str):
            raise InputError(f"{where}: the reward_model task needs 'reward_model' (a folder).")
        options["reward_model"] = _resolve(options["reward_model"], folder)
    if kind == "lm_eval":
        if not options.get("tasks"):
            raise InputError(f"{where}: the lm_eval task needs 'tasks' (harness task names).")
        if isinstance(options["tasks"], str):
            options["tasks"] = [t.strip() for t in options["tasks"].split(",") if t.strip()]
        if not isinstance(options["tasks"], list) or not all(
            isinstance(t, str) for t in options["tasks"]
        ):
            raise InputError(f"{where}: 'tasks' must be harness task names (list or commas).")
        if options.get("include_path"):
            if not isinstance(options["include_path"], str):
                raise InputError(f"{where}: 'include_path' must be a folder.")
            options["include_path"] = str(folder / options["include_path"])
        return TaskSpec(str(entry.get("name", kind)), kind, folder, category, options)
    data = folder / entry["data"]
    spec = TaskSpec(str(entry.get("name", kind)), kind, data, category, options)
    spec.examples = read_task_data(kind, data)
    return spec


def _check_options(kind: str, options: dict[str, Any], where: str) -> None:
    """The task-specific values a model run would otherwise trip over, checked up front."""
    if kind == "generate":
        try:
            check_extract(options.get("extract", "exact"), options.get("pattern"))
        except UsageError as error:
            raise InputError(f"{where}: {error}") from None
    if kind == "preference" and "beta" in options:
        beta = options["beta"]
        try:
            options["beta"] = float(beta)  # YAML reads 1e-1 as text
        except (TypeError, ValueError):
            options["beta"] = math.nan
        if isinstance(beta, bool) or not options["beta"] > 0 or math.isinf(options["beta"]):
            raise InputError(f"{where}: beta must be a number > 0, not {beta!r}.")
    for key in ("num_fewshot", "limit") if kind == "lm_eval" else ():
        value = options.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{where}: {key} must be a whole number >= 0, not {value!r}.")


_TEXT_FIELDS = {
    "generate": ("prompt",),
    "choice": ("question",),
    "reward_model": ("prompt",),
    "perplexity": ("text",),
}


def read_task_data(kind: str, data: Path) -> list[Any]:
    """The examples of one task, checked row by row (errors name the file and line)."""
    from omotool.data import load_examples, read_rows

    if kind == "preference":
        return load_examples(data, "preference")
    if kind == "perplexity" and data.suffix == ".txt":
        if not data.exists():
            raise InputError(f"data file {data} does not exist.")
        documents = [d.strip() for d in data.read_text(encoding="utf-8").split("\n\n")]
        documents = [d for d in documents if d]
        if not documents:
            raise InputError(f"{data}: no documents (the file is empty).")
        return documents
    required = {
        "perplexity": ("text",),
        "generate": ("prompt", "reference"),
        "choice": ("question", "choices", "answer"),
        "reward_model": ("prompt",),
    }[kind]
    rows = []
    for row in read_rows(data):
        missing = [name for name in required if row.fields.get(name) in (None, "")]
        if missing:
            raise InputError(
                f"{row.where}: missing field {', '.join(repr(m) for m in missing)} "
                f"(the {kind} task reads {', '.join(required)})."
            )
        for name in _TEXT_FIELDS[kind]:
            if not isinstance(row.fields[name], str):
                raise InputError(f"{row.where}: {name!r} must be text, not {row.fields[name]!r}.")
        if kind == "generate":
            reference = row.fields["reference"]
            if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
                raise InputError(f"{row.where}: 'reference' must be text or a number.")
            row.fields["reference"] = str(reference)
        if kind == "choice":
            choices = row.fields["choices"]
            if not isinstance(choices, list) or len(choices) < 2:
                raise InputError(f"{row.where}: 'choices' must be a list of at least 2 options.")
            if not all(isinstance(c, str) for c in choices):
                raise InputError(f"{row.where}: every option in 'choices' must be text.")
            from omotool.eval.likelihood import answer_index

            answer_index(row.fields, f"{row.where}: ")
        rows.append(row.fields["text"] if kind == "perplexity" else row.fields)
    if not rows:
        raise InputError(f"{data}: no examples (the dataset is empty).")
    return rows


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
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}.{hint}")
    if task == "preference" and not reference:
        raise UsageError("--task preference needs --ref-model (the SFT model).")
    if task == "reward_model" and not options.get("reward_model"):
        raise UsageError("--task reward_model needs --reward-model (a classifier folder).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}.")
    given = {key: value for key, value in (generation or {}).items() if value not in (None, [])}
    if isinstance(given.get("until"), list):
        given["until"] = [_unescape(s) if isinstance(s, str) else s for s in given["until"]]
    unused = [key for key in given if key not in _generation_keys(task)]
    if unused:
        flags = ", ".join("--chat/--no-chat" if key == "chat" else f"--{key}" for key in unused)
        raise UsageError(
            f"{flags} has no effect on --task {task} (it applies to --task "
            f"{', '.join(GENERATING) if unused != ['chat'] else ', '.join(CHAT)})."
        )
    settings = settings_from(given, flags=True)
    if task == "generate":
        check_extract(options.get("extract") or "exact", options.get("pattern"))
    category = "reward" if task in ("preference", "reward_model") else "capability"
    spec = TaskSpec(
        task, task, Path(data or "."), category, {k: v for k, v in options.items() if v}
    )
    if task == "lm_eval":
        if not spec.options.get("tasks"):
            raise UsageError("--task lm_eval needs --lm-tasks NAME[,NAME...].")
        spec.options["tasks"] = [t.strip() for t in spec.options["tasks"].split(",") if t.strip()]
        if not spec.options["tasks"]:
            raise UsageError("--lm-tasks names no task; give NAME[,NAME...].")
    else:
        if data is None:
            raise UsageError(f"--task {task} needs --data FILE.")
        spec.examples = read_task_data(task, Path(data))
    return Suite(
        [spec], baseline=baseline, reference=reference, batch_size=batch_size, generation=settings
    )
