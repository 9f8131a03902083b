"""The ``preference`` task: held-out pairs scored with the DPO implicit reward.

For a pair ``(x, y_w, y_l)`` and ``r(x, y) = β·(log π(y|x) − log π_ref(y|x))`` (π the policy,
π_ref the reference, usually the SFT model):

- ``reward_accuracy``: the fraction of pairs with ``r(x, y_w) > r(x, y_l)`` (Wilson interval);
- ``reward_margin``: the mean of ``r(x, y_w) − r(x, y_l)``;
- ``logps_chosen`` / ``logps_rejected``: the mean ``log π(y|x)`` of each side.
A model whose log-probabilities are not finite is reported as failed, not averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omotool.eval.scoring import completion_logprobs
from omotool.eval.stats import Estimate, mean_interval, proportion_interval


@dataclass
class TaskScores:
    """Named estimates of one task on one model, or why the model failed it."""

    scores: dict[str, Estimate] = field(default_factory=dict)
    failed: str | None = None


def preference_scores(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    beta: float = 0.1,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> TaskScores:
    """Implicit-reward accuracy and margin of ``policy`` against ``reference`` (see module)."""
    chosen = [(e["prompt"], e["chosen"]) for e in examples]
    rejected = [(e["prompt"], e["rejected"]) for e in examples]
    logps = {}
    for name, model in (("policy", policy), ("reference", reference)):
        logps[name] = [
            completion_logprobs(model, tokenizer, pairs, batch_size, progress)[0]
            for pairs in (chosen, rejected)
        ]
    values = [v for side in logps.values() for pairs in side for v in pairs]
    if not all(math.isfinite(v) for v in values):
        return TaskScores(failed="non-finite log-probabilities")
    (policy_w, policy_l), (reference_w, reference_l) = logps["policy"], logps["reference"]
    margins = [
        beta * ((pw - rw) - (pl - rl))
        for pw, pl, rw, rl in zip(policy_w, policy_l, reference_w, reference_l, strict=True)
    ]
    return TaskScores(
        scores={
            "reward_accuracy": proportion_interval(sum(m > 0 for m in margins), len(margins)),
            "reward_margin": mean_interval(margins),
            "logps_chosen": mean_interval(policy_w),
            "logps_rejected": mean_interval(policy_l),
        }
    )
