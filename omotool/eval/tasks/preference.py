"""The ``preference`` task: held-out pairs scored with the DPO implicit reward against the
suite's reference (``eval/preference.py``); option ``beta`` (0.1)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from omotool.errors import UsageError
from omotool.eval.tasks.base import TASKS, Answers, EvalTask, TaskRun, TaskSpec


def _read(data: Path) -> list[Any]:
    from omotool.data import load_examples

    return load_examples(data, "preference")


def _check(options: dict[str, Any], folder: Path | None) -> None:
    if "beta" not in options:
        return
    beta = options["beta"]
    try:
        options["beta"] = float(beta)  # YAML reads 1e-1 as text
    except (TypeError, ValueError):
        options["beta"] = math.nan
    if isinstance(beta, bool) or not options["beta"] > 0 or math.isinf(options["beta"]):
        raise UsageError(f"beta must be a number > 0, not {beta!r}.")


def _run(run: TaskRun) -> tuple[Any, Answers]:
    from omotool.eval import preference

    model, tokenizer = run.model()
    reference, _ = run.models.get(run.reference)
    beta = run.spec.options.get("beta", 0.1)  # checked when the suite is loaded
    # The reference scores the same token ids the same way for every model: once per task.
    encoded = preference.encode_pairs(tokenizer, run.spec.examples)
    ids = hashlib.sha256(repr((encoded, tokenizer.pad_token_id)).encode()).hexdigest()
    key = (run.models.key(run.reference), run.spec.name, ids)
    cache = run.models.reference_logps
    if key not in cache:
        cache[key] = preference.side_logprobs(
            reference, tokenizer, encoded, run.batch_size, run.progress
        )
    policy = preference.side_logprobs(model, tokenizer, encoded, run.batch_size, run.progress)
    return preference.margin_scores(policy, cache[key], beta), None


def _shared(spec: TaskSpec, models: Any, reference: str | None) -> set[str]:
    return {models.key(reference)} if reference else set()


TASKS.register("preference", help="DPO implicit-reward accuracy on held-out pairs.")(
    EvalTask(
        category="reward",
        headline="reward_accuracy",
        run=_run,
        read=_read,
        options=("beta",),
        check=_check,
        needs_reference=True,
        shared=_shared,
    )
)
