"""The ``generate`` task: answer prompts, extract the answer, compare with the reference.

Generation is batched with left padding and greedy unless ``temperature > 0`` (then sampled
with top-p from a seeded generator). Each prompt is rendered as a user message with the
model's chat template when it has one (``chat=None``, the default; ``True``/``False`` force
it). Extraction (``extract``):

- ``exact``: the whole answer, stripped, equals the reference, stripped;
- ``regex``: the first match of ``pattern`` (its first group if it has one) equals the
  reference (or the reference's own match);
- ``last_number``: the last number in the answer equals the last number in the reference,
  numerically (GSM8K style: a reference ``"... #### 1,234"`` gives 1234).
``accuracy`` with a Wilson interval; the answers are returned for the report.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omotool.errors import UsageError
from omotool.eval.preference import TaskScores
from omotool.eval.stats import proportion_interval

EXTRACTORS = ("exact", "regex", "last_number")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool | None = None  # None: the chat template when the tokenizer has one


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def is_correct(answer: str, reference: str, extract: str, pattern: str | None = None) -> bool:
    """Whether ``answer`` matches ``reference`` under ``extract`` (see module docstring)."""
    if extract == "exact":
        return answer.strip() == reference.strip()
    if extract == "last_number":
        got, want = last_number(answer), last_number(reference)
        return got is not None and want is not None and got == want
    if extract == "regex":
        if not pattern:
            raise UsageError("extract 'regex' needs a pattern.")
        compiled = re.compile(pattern)

        def grab(text: str) -> str | None:
            match = compiled.search(text)
            if match is None:
                return None
            return (match.group(1) if compiled.groups else match.group(0)).strip()

        got = grab(answer)
        return got is not None and got in (reference.strip(), grab(reference))
    raise UsageError(f"unknown extract {extract!r}; choose one of {', '.join(EXTRACTORS)}")


def uses_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Whether prompts are rendered with the chat template (``None``: when there is one)."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool | None) -> list[int]:
    if uses_chat(tokenizer, chat):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The model's answer to each prompt (decoded new tokens, special tokens skipped)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = settings.temperature > 0
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            _prompt_ids(tokenizer, p, settings.chat) for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, prompt_ids in enumerate(encoded):  # left padding: all prompts end together
            ids[row, width - len(prompt_ids) :] = torch.tensor(prompt_ids)
            mask[row, width - len(prompt_ids) :] = 1
        if sampling:
            torch.manual_seed(settings.seed + start)
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in range(len(encoded)):
            answers.append(tokenizer.decode(output[row, width:], skip_special_tokens=True))
        if progress is not None:
            progress(min(start + batch_size, len(prompts)))
    return answers


def generate_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    extract: str = "exact",
    pattern: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[TaskScores, list[str]]:
    """Accuracy of generated answers to ``examples`` (``prompt``, ``reference``)."""
    if extract not in EXTRACTORS:
        raise UsageError(f"unknown extract {extract!r}; choose one of {', '.join(EXTRACTORS)}")
    answers = generate_answers(
        model, tokenizer, [e["prompt"] for e in examples], settings, batch_size, progress
    )
    correct = sum(
        is_correct(answer, e["reference"], extract, pattern)
        for answer, e in zip(answers, examples, strict=True)
    )
    return TaskScores(scores={"accuracy": proportion_interval(correct, len(examples))}), answers
