"""Likelihood tasks: ``choice`` (multiple choice, MMLU style) and ``perplexity``.

- ``choice``: each option ``c`` of a question ``q`` is scored by ``log π(c | q)`` (summed over
  its tokens, as lm-evaluation-harness's ``acc``); the model answers the best-scored option.
  With the model's chat template (when it has one, or ``chat=True``) ``q`` is a user message
  and ``c`` the assistant's reply; otherwise ``c`` follows ``q`` after a space. ``accuracy``
  with a Wilson interval.
- ``perplexity``: ``exp(Σ NLL / Σ tokens)`` over all documents, every token after a
  document's first scored given the ones before. Its interval is ``exp`` of the 95% interval of
  the per-document mean NLL per token (documents, not tokens, are the independent units).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from omotool.errors import InputError
from omotool.eval.preference import TaskScores
from omotool.eval.scoring import completion_logprobs, token_logprobs
from omotool.eval.stats import Estimate, mean_interval, proportion_interval


def answer_index(example: dict[str, Any], where: str = "") -> int:
    """The correct option's index: an int, a letter (``"B"``), or the option's text."""
    choices, answer = example["choices"], example["answer"]
    if isinstance(answer, bool):
        raise InputError(f"{where}answer {answer!r} is not an option index, letter or text.")
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        letter = answer.strip().upper()
        if len(letter) == 1 and 0 <= ord(letter) - ord("A") < len(choices):
            return ord(letter) - ord("A")
        if answer in choices:
            return choices.index(answer)
    raise InputError(f"{where}answer {answer!r} is not an option index, letter or text.")


def choice_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    chat: bool | None = None,
) -> TaskScores:
    """Multiple-choice accuracy by log-likelihood (see module docstring)."""
    from omotool.eval.generation import uses_chat

    if uses_chat(tokenizer, chat):
        pairs = [
            ([{"role": "user", "content": e["question"]}], [{"role": "assistant", "content": c}])
            for e in examples
            for c in e["choices"]
        ]
    else:
        pairs = [(e["question"], " " + c) for e in examples for c in e["choices"]]
    scores, _ = completion_logprobs(model, tokenizer, pairs, batch_size, progress)
    if not all(math.isfinite(s) for s in scores):
        return TaskScores(failed="non-finite log-probabilities")
    correct, at = 0, 0
    for example in examples:
        options = scores[at : at + len(example["choices"])]
        at += len(example["choices"])
        best = max(range(len(options)), key=options.__getitem__)  # ties: the first option
        correct += best == answer_index(example)
    return TaskScores(scores={"accuracy": proportion_interval(correct, len(examples))})


def perplexity_scores(
    model: Any,
    tokenizer: Any,
    documents: Sequence[str],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> TaskScores:
    """Perplexity over ``documents`` (see module docstring)."""
    encoded = []
    for number, document in enumerate(documents):
        ids = list(tokenizer(document)["input_ids"])
        if len(ids) < 2:
            raise InputError(f"document {number} has fewer than 2 tokens: nothing to predict.")
        encoded.append((ids[:1], ids[1:]))
    scores, counts = token_logprobs(model, tokenizer, encoded, batch_size, progress)
    if not all(math.isfinite(s) for s in scores):
        return TaskScores(failed="non-finite log-probabilities")
    per_document = [-s / n for s, n in zip(scores, counts, strict=True)]
    nll = mean_interval(per_document)
    total = -math.fsum(scores) / sum(counts)
    return TaskScores(
        scores={
            "perplexity": Estimate(math.exp(total), math.exp(nll.low), math.exp(nll.high), nll.n)
        }
    )
