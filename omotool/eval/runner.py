"""``run_suite``: every task of a suite on every model, averages and differences, a report.

For each model: each task's scores with 95% intervals (or why it failed); per category
(``reward``, ``capability``) the mean of the tasks' headline scores (each task's
``EvalTask.headline``; failed tasks are left out and named); and, when the suite names a
baseline, each headline score and average minus the baseline's. ``write_report`` saves it
as ``report.json``.

Models are evaluated one after another (every task of one, then the next). Held in memory at
once: the model under evaluation and the models shared by all of them (the suite's
``reference`` and the tasks' reward models); each evaluated model is released before the next
is loaded, and a model that is also the reference is loaded once. The reference's
log-probabilities of a preference task's pairs are computed once and reused for every model
whose tokenizer encodes the pairs the same way.

Every model (evaluated, reference, reward models) is loaded with one ``Placement``
(``eval/device.py``): ``run_suite``'s ``device``/``dtype`` over the suite's, ``auto`` when
neither gives one (the CPU in float32 on a machine without CUDA). The report records it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omotool.eval.device import Placement, load_options, placed, resolve_placement
from omotool.eval.preference import TaskScores
from omotool.eval.suite import CATEGORIES, Suite, generation_keys, task_generation
from omotool.eval.tasks import FIRST_SCORE, TASKS, TaskRun, TaskSpec, headline_name

Progress = Callable[[str, int, int], None]  # (what, done, total)


def load_causal_lm(path: str, placement: Placement) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the causal LM in ``path`` (a model folder, a hub name, or a
    PEFT adapter folder, loaded as its base with the adapter merged in), in evaluation mode
    on ``placement``; ``InputError`` when it does not load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omotool.errors import InputError
    from omotool.io.adapters import is_adapter, load_adapter_model, tokenizer_folder

    load = load_adapter_model if is_adapter(path) else AutoModelForCausalLM.from_pretrained
    try:
        model = placed(load(path, **load_options(placement)), placement)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path))
    except (OSError, ValueError) as error:
        raise InputError(f"model {path} does not load: {error}") from None
    return model, tokenizer


class _Models:
    """Models and tokenizers by path, loaded on first use and held until ``release``: causal
    LMs (``get``) and reward models (``reward_model``); and the reference log-probabilities of
    the preference tasks (``reference_logps``); every model is loaded with ``placement`` (the
    CPU in float32 unless given)."""

    def __init__(self, placement: Placement | None = None) -> None:
        self.placement = placement or resolve_placement("cpu", "float32")
        self.loaded: dict[str, tuple[Any, Any]] = {}
        # (reference key, task name, digest of the pairs' token ids and pad id) -> log-probs
        self.reference_logps: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}

    @staticmethod
    def key(path: str) -> str:
        """One key per model folder however its path is spelt (a hub name stays as given)."""
        local = Path(path)
        return str(local.resolve()) if local.exists() else path

    def get(self, path: str) -> tuple[Any, Any]:
        key = self.key(path)
        if key not in self.loaded:
            self.loaded[key] = load_causal_lm(path, self.placement)
        return self.loaded[key]

    def reward_model(self, path: str) -> tuple[Any, Any]:
        """``(classifier, tokenizer)`` of the reward model in ``path``, loaded on first use."""
        from omotool.eval.reward_model import load_reward_model

        key = self.reward_model_key(path)
        if key not in self.loaded:
            self.loaded[key] = load_reward_model(path, self.placement)
        return self.loaded[key]

    def reward_model_key(self, path: str) -> str:
        return f"reward-model:{self.key(path)}"

    def release(self, keep: set[str]) -> None:
        """Drop every model whose key is not in ``keep`` and give its memory back."""
        dropped = [key for key in self.loaded if key not in keep]
        for key in dropped:
            del self.loaded[key]
        if dropped:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _fingerprint(path: str) -> str:
    """The fingerprint of a model folder, or of an adapter folder (its base and weights)."""
    from omotool.io.adapters import adapter_fingerprint, is_adapter
    from omotool.io.reader import ModelReader, fingerprint

    if is_adapter(path):
        return adapter_fingerprint(path)
    with ModelReader(path) as reader:
        return fingerprint(reader)


def run_task(
    spec: TaskSpec,
    model_path: str,
    suite: Suite,
    models: _Models,
    baseline_answers: Any = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[TaskScores, list[str] | None]:
    """One task on one model: its scores and, for generating tasks, the answers.

    ``progress(done)`` follows each pass over the examples (scoring, generation)."""
    settings = task_generation(spec, suite)
    run = TaskRun(
        spec, model_path, models, settings, suite.batch_size, suite.reference,
        baseline_answers, progress,
    )  # fmt: skip
    return TASKS.get(spec.task).run(run)


def _shared(models: _Models, suite: Suite) -> set[str]:
    """Keys of the models every evaluated model needs (the reference, the reward models)."""
    keep: set[str] = set()
    for spec in suite.tasks:
        keep |= TASKS.get(spec.task).shared(spec, models, suite.reference)
    return keep


def suite_placement(suite: Suite, device: Any = None, dtype: Any = None) -> Placement:
    """Where ``suite`` runs: ``device``/``dtype`` (the command line's) over the suite's own,
    ``auto`` for what neither gives; a ``UsageError`` names where a bad value came from."""
    where = f"suite {suite.path}: " if suite.path else ""
    return resolve_placement(
        device if device is not None else suite.device,
        dtype if dtype is not None else suite.dtype,
        "--device" if device is not None or suite.device is None else f"{where}device",
        "--dtype" if dtype is not None or suite.dtype is None else f"{where}dtype",
    )


def run_suite(
    model_paths: list[str],
    suite: Suite,
    progress: Progress | None = None,
    device: Any = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """The report of every model on every task (see module docstring); ``progress(what,
    done, total)`` follows the long parts (scoring, generation). ``device`` and ``dtype``
    (names, ``torch.device``/``torch.dtype``, or ``None``) override the suite's."""
    placement = suite_placement(suite, device, dtype)
    models = _Models(placement)
    shared = _shared(models, suite)
    order = list(model_paths)
    if suite.baseline and suite.baseline not in order:
        order.insert(0, suite.baseline)  # its answers are needed for win rates
    elif suite.baseline:
        order.remove(suite.baseline)
        order.insert(0, suite.baseline)
    results: dict[str, dict[str, Any]] = {}
    baseline_answers: dict[str, list[str]] = {}
    for path in order:
        tasks = {}
        for spec in suite.tasks:
            given = baseline_answers.get(spec.name) if path != suite.baseline else None
            tick = None
            if progress is not None:
                what, total = f"{Path(path).name}: {spec.name}", _passes(spec)

                def tick(done: int, what: str = what, total: int = total) -> None:
                    progress(what, done, total)

            scores, answers = run_task(spec, path, suite, models, given, tick)
            if path == suite.baseline and answers is not None:
                baseline_answers[spec.name] = answers
            tasks[spec.name] = {
                "task": spec.task,
                "category": spec.category,
                "failed": scores.failed,
                "scores": {k: v.as_dict() for k, v in scores.scores.items()},
                "answers": answers,
            }
        models.release(keep=shared)  # this model is done: free it before loading the next
        results[path] = {"path": path, "fingerprint": _fingerprint(path), "tasks": tasks}
        results[path]["averages"] = _averages(tasks)
    if suite.baseline:
        base = results[suite.baseline]
        for result in results.values():
            result["differences"] = _differences(result, base)
    import torch
    import transformers

    from omotool import __version__

    return {
        "kind": "evaluation",
        "omotool_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **placement.as_dict(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "suite": str(suite.path) if suite.path else None,
        "tasks": [
            {
                "name": t.name,
                "task": t.task,
                "data": str(t.data),
                "category": t.category,
                "options": t.options,
                "examples": len(t.examples),
                **_generation_report(t, suite),
            }
            for t in suite.tasks
        ],  # fmt: skip
        "generation": suite.generation.as_dict(),
        "baseline": suite.baseline,
        "models": [results[p] for p in order if p in model_paths or p == suite.baseline],
    }


def _generation_report(spec: TaskSpec, suite: Suite) -> dict[str, Any]:
    """The generation settings a task ran with (those it reads; none if none)."""
    keys = generation_keys(TASKS.get(spec.task))
    if not keys:
        return {}
    settings = task_generation(spec, suite).as_dict()
    return {"generation": {key: value for key, value in settings.items() if key in keys}}


def _passes(spec: TaskSpec) -> int:
    """Examples per pass of a task (for progress)."""
    return TASKS.get(spec.task).passes(spec.examples)


def headline(task: dict[str, Any]) -> float | None:
    key = headline_name(task["task"])
    if task["failed"] or key is None:
        return None
    if key == FIRST_SCORE and task["scores"]:  # e.g. lm_eval: its first metric
        key = next(iter(task["scores"]))
    if key not in task["scores"]:  # a reward_model task without a baseline: no win rate
        return None
    return task["scores"][key]["value"]


def _averages(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per category and overall: the mean headline score of the tasks that have one."""
    averages: dict[str, Any] = {}
    for category in (*CATEGORIES, "overall"):
        values = [headline(t) for t in tasks.values() if category in ("overall", t["category"])]
        counted = [v for v in values if v is not None]
        averages[category] = sum(counted) / len(counted) if counted else None
    averages["failed"] = sorted(name for name, t in tasks.items() if t["failed"])
    return averages


def _differences(result: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    differences: dict[str, float | None] = {}
    for name, task in result["tasks"].items():
        mine, theirs = headline(task), headline(base["tasks"][name])
        differences[name] = None if mine is None or theirs is None else mine - theirs
    for category in (*CATEGORIES, "overall"):
        mine, theirs = result["averages"][category], base["averages"][category]
        differences[category] = None if mine is None or theirs is None else mine - theirs
    return differences


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``out/report.json`` and ``out/report.md`` (each written whole, then renamed)."""
    from omotool.io.formats import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    target = out / "report.json"
    write_text_atomic(target, json.dumps(report, indent=2, allow_nan=False))
    write_text_atomic(out / "report.md", report_markdown(report))
    return target


def headline_key(task: dict[str, Any]) -> str | None:
    """The name of the score shown for a task (its headline, else its first score)."""
    key = headline_name(task["task"])
    if key in task["scores"]:
        return key
    return next(iter(task["scores"]), None)


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: per model, each task's score with its interval and the baseline delta."""
    lines = ["# Evaluation report", ""]
    if report.get("suite"):
        lines += [f"Suite: `{report['suite']}`", ""]
    if report.get("device"):
        lines += [f"Device: `{report['device']}`, weights in `{report['dtype']}`.", ""]
    if report.get("baseline"):
        lines += [f"Differences (Δ) are against `{report['baseline']}`.", ""]
    for model in report["models"]:
        lines += [f"## `{model['path']}`", "", "| task | category | score | 95% interval | Δ |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, task in model["tasks"].items():
            key = headline_key(task)
            if task["failed"] or key is None:
                lines.append(f"| {name} | {task['category']} | failed: {task['failed']} | | |")
                continue
            score = task["scores"][key]
            delta = (model.get("differences") or {}).get(name)
            shown = "" if delta is None else f"{delta:+.4f}"
            lines.append(
                f"| {name} | {task['category']} | {key} {score['value']:.4f} | "
                f"[{score['low']:.4f}, {score['high']:.4f}] | {shown} |"
            )
        for category in (*CATEGORIES, "overall"):
            value = model["averages"][category]
            delta = (model.get("differences") or {}).get(category)
            if value is not None:
                shown = "" if delta is None else f"{delta:+.4f}"
                lines.append(f"| **{category} average** | | {value:.4f} | | {shown} |")
        lines.append("")
    return "\n".join(lines)
