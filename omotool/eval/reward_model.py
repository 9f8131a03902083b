"""The ``reward_model`` task: a model's answers scored by a local reward model.

The reward model is a sequence-classification model folder with one output (as TRL's
``RewardTrainer`` writes); ``r(x, y)`` is that output for the conversation "user: x,
assistant: y" rendered with the reward model's chat template (or ``x``, a newline and ``y``
when it has none). Reported: ``mean_reward`` (normal interval) and, given a baseline's answers
to the same prompts, ``win_rate``: the fraction of prompts where the model's answer scores
higher, ties counting one half (Wilson interval on the wins plus half the ties).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from omotool.errors import InputError
from omotool.eval.device import Placement, load_options, placed
from omotool.eval.preference import TaskScores
from omotool.eval.stats import mean_interval, proportion_interval


def load_reward_model(path: str, placement: Placement | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a reward-model folder, loaded with ``placement`` (the CPU in
    float32 when not given); anything but a 1-output classifier is an error (loading a causal
    LM as a classifier would silently add a random head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise InputError(f"reward model {path}: not a model folder ({error}).") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise InputError(
            f"reward model {path} is a {', '.join(architectures) or 'model'} checkpoint, not a "
            "sequence classifier; give a reward model (e.g. one trained with TRL's RewardTrainer)."
        )
    if getattr(config, "num_labels", 1) != 1:
        raise InputError(f"reward model {path} has {config.num_labels} outputs; expected 1.")
    if placement is None:
        placement = Placement(torch.device("cpu"), torch.float32)
    model = AutoModelForSequenceClassification.from_pretrained(path, **load_options(placement))
    return placed(model, placement), AutoTokenizer.from_pretrained(path)


def _render(tokenizer: Any, prompt: str | list[dict[str, str]], answer: str) -> str:
    """The text the reward model reads: the conversation (a string prompt is one user message;
    a list of messages is the conversation so far) with the answer as the assistant's turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages.append({"role": "assistant", "content": answer})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(message["content"] for message in messages)


@torch.no_grad()
def rewards(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, str]]],
    answers: Sequence[str],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """``r(x, y)`` for each prompt and answer (batched, right-padded, on the model's device;
    the rewards read from the logits upcast to float32)."""
    texts = [_render(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    # The classifier reads the last token that is not its config's pad token: pad with that.
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t)["input_ids"] for t in texts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores.extend(float(x) for x in logits[:, 0].float().cpu())  # one copy per batch
        if progress is not None:
            progress(min(start + batch_size, len(texts)))
    return scores


def reward_model_scores(
    model_rewards: Sequence[float], baseline_rewards: Sequence[float] | None = None
) -> TaskScores:
    """``mean_reward`` and, with a baseline's rewards for the same prompts, ``win_rate``."""
    if not all(math.isfinite(r) for r in model_rewards):
        return TaskScores(failed="non-finite rewards")
    scores = {"mean_reward": mean_interval(list(model_rewards))}
    if baseline_rewards is not None:
        pairs = list(zip(model_rewards, baseline_rewards, strict=True))
        wins = sum(m > b for m, b in pairs) + 0.5 * sum(m == b for m, b in pairs)
        scores["win_rate"] = proportion_interval(wins, len(pairs))
    return TaskScores(scores=scores)
