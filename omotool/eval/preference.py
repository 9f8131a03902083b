"""The ``preference`` task: held-out pairs scored with the DPO implicit reward.

For a pair ``(x, y_w, y_l)`` and ``r(x, y) = β·(log π(y|x) − log π_ref(y|x))`` (π the policy,
π_ref the reference, usually the SFT model):

- ``reward_accuracy``: the fraction of pairs with ``r(x, y_w) > r(x, y_l)`` (Wilson interval);
- ``reward_margin``: the mean of ``r(x, y_w) − r(x, y_l)``;
- ``logps_chosen`` / ``logps_rejected``: the mean ``log π(y|x)`` of each side.
A model whose log-probabilities are not finite is reported as failed, not averaged.

The reference's log-probabilities do not depend on the policy: ``side_logprobs`` computes
them once and ``preference_scores(..., reference_logps=...)`` reuses them for many policies
(``run_suite`` does, per task), with the same result as scoring the reference each time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omotool.eval.scoring import encode_pair, token_logprobs
from omotool.eval.stats import Estimate, mean_interval, proportion_interval


@dataclass
class TaskScores:
    """Named estimates of one task on one model, or why the model failed it."""

    scores: dict[str, Estimate] = field(default_factory=dict)
    failed: str | None = None


Encoded = list[tuple[list[int], list[int]]]  # (prompt ids, completion ids) per example


def encode_pairs(tokenizer: Any, examples: Sequence[dict[str, Any]]) -> tuple[Encoded, Encoded]:
    """The chosen and the rejected ``(prompt ids, completion ids)`` of each example."""
    return (
        [encode_pair(tokenizer, e["prompt"], e["chosen"]) for e in examples],
        [encode_pair(tokenizer, e["prompt"], e["rejected"]) for e in examples],
    )


def side_logprobs(
    model: Any,
    tokenizer: Any,
    encoded: tuple[Encoded, Encoded],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[float]]:
    """``log π(y_w|x)`` and ``log π(y_l|x)`` of each example, from ``encode_pairs``."""
    chosen, rejected = (
        token_logprobs(model, tokenizer, side, batch_size, progress)[0] for side in encoded
    )
    return chosen, rejected


def preference_scores(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    beta: float = 0.1,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    reference_logps: tuple[Sequence[float], Sequence[float]] | None = None,
) -> TaskScores:
    """Implicit-reward accuracy and margin of ``policy`` against ``reference`` (see module).

    ``reference_logps``: the reference's ``side_logprobs`` of these examples, encoded with
    this ``tokenizer``, computed earlier; then ``reference`` is not run (it may be ``None``)."""
    encoded = encode_pairs(tokenizer, examples)
    policy_logps = side_logprobs(policy, tokenizer, encoded, batch_size, progress)
    if reference_logps is None:
        reference_logps = side_logprobs(reference, tokenizer, encoded, batch_size, progress)
    return margin_scores(policy_logps, reference_logps, beta)


def margin_scores(
    policy_logps: tuple[Sequence[float], Sequence[float]],
    reference_logps: tuple[Sequence[float], Sequence[float]],
    beta: float = 0.1,
) -> TaskScores:
    """The scores of the module docstring from both models' ``side_logprobs``."""
    (policy_w, policy_l), (reference_w, reference_l) = policy_logps, reference_logps
    values = [*policy_w, *policy_l, *reference_w, *reference_l]
    if not all(math.isfinite(v) for v in values):
        return TaskScores(failed="non-finite log-probabilities")
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
