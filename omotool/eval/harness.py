"""The ``lm_eval`` task: EleutherAI's lm-evaluation-harness, for the public benchmarks.

``lm_eval_scores`` runs ``lm_eval.simple_evaluate`` with its ``hf`` model on a model folder
and turns every reported metric into an estimate with a 95% interval (``value ± 1.96·stderr``,
clipped to [0, 1] for fractions). ``tasks`` are harness task names (GSM8K, MMLU, IFEval, ...
where the machine has their data) or tasks defined in YAML files under ``include_path``
(local data works offline). The harness loads the model itself, with the evaluation's device
and dtype (``eval/device.py``). Needs the optional extra: ``pip install 'omotool[lm-eval]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omotool.errors import InputError, UsageError
from omotool.eval.device import Placement
from omotool.eval.preference import TaskScores
from omotool.eval.stats import Z95, Estimate


def lm_eval_scores(
    model_path: str,
    tasks: Sequence[str],
    include_path: str | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | None = None,
    placement: Placement | None = None,
) -> TaskScores:
    """Scores named ``<task>/<metric>`` (e.g. ``gsm8k/exact_match``) with 95% intervals.

    ``placement``: the device and dtype the harness loads the model with (``None``: float32,
    on CUDA when there is one)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(
            "the lm_eval task needs lm-evaluation-harness: pip install 'omotool[lm-eval]'"
        ) from None
    import torch

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(
            f"lm-evaluation-harness has no task {', '.join(map(repr, unknown))}"
            + (f" (also looked in {include_path})." if include_path else ".")
        )
    if placement is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "float32"
    else:
        device, dtype = str(placement.device), placement.dtype_name
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype={dtype}",
        tasks=list(tasks),
        task_manager=manager,
        device=device,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        limit=limit,
    )
    return TaskScores(scores=_estimates(results["results"], results.get("n-samples", {})))


def _estimates(results: dict[str, Any], samples: dict[str, Any]) -> dict[str, Estimate]:
    estimates = {}
    for task, metrics in results.items():
        n = int(metrics.get("sample_len") or samples.get(task, {}).get("effective", 0) or 0)
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if metric in ("sample_len",):
                continue
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            half = Z95 * stderr if isinstance(stderr, (int, float)) else 0.0
            low, high = value - half, value + half
            if 0.0 <= value <= 1.0:
                low, high = max(0.0, low), min(1.0, high)
            estimates[f"{task}/{metric}"] = Estimate(float(value), low, high, n)
    return estimates
