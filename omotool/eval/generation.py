"""The ``generate`` task: answer prompts, extract the answer, compare with the reference.

Generation is batched with left padding and greedy unless ``temperature > 0`` (then sampled
with top-p from a seeded generator). Each prompt is rendered as a user message with the
model's chat template when it has one (``chat=None``, the default; ``True``/``False`` force
it). An answer ends before the first occurrence of any stop sequence in ``until`` (as
lm-evaluation-harness's ``generate_until``): the text is cut there after decoding, and a
batch stops generating once every row has written a stop sequence (or EOS). Extraction
(``extract``) reads the cut answer:

- ``exact``: the whole answer, stripped, equals the reference, stripped;
- ``regex``: the first match of ``pattern`` (its first group if it has one) equals the
  reference (or the reference's own match);
- ``last_number``: the last number in the answer equals the last number in the reference,
  numerically (GSM8K style: a reference ``"... #### 1,234"`` gives 1234);
- ``contains``: the answer states the reference as whole words, in any case (``Paris`` in
  ``The capital of France is Paris.``, not ``Rome`` in ``Romeo``).
``accuracy`` with a Wilson interval; the answers are returned for the report.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from omotool.errors import UsageError
from omotool.eval.preference import TaskScores
from omotool.eval.stats import proportion_interval

EXTRACTORS = ("exact", "regex", "last_number", "contains")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated; every value is checked (``UsageError`` naming the key)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool | None = None  # None: the chat template when the tokenizer has one
    until: tuple[str, ...] = ()  # stop sequences (a string or a list of strings is accepted)

    def __post_init__(self) -> None:
        for key in GENERATION_KEYS:
            object.__setattr__(self, key, _checked(key, getattr(self, key), key))

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON values (``until`` a list), for the report."""
        return {**dataclasses.asdict(self), "until": list(self.until)}


GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(GenerationSettings))


def _checked(key: str, value: Any, name: str) -> Any:
    """``value`` of setting ``key``, normalised (``until`` as a tuple), or a ``UsageError``
    that calls it ``name``."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if key in ("max_new_tokens", "seed"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{name} must be a whole number, not {value!r}.")
        if key == "max_new_tokens" and value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}.")
        return value
    if key == "temperature":
        if not number(value) or value < 0:
            raise UsageError(f"{name} must be a number >= 0 (0: greedy), not {value!r}.")
        return float(value)
    if key == "top_p":
        if not number(value) or not 0 < value <= 1:
            raise UsageError(f"{name} must be a number in (0, 1], not {value!r}.")
        return float(value)
    if key == "chat":
        if value is not None and not isinstance(value, bool):
            raise UsageError(f"{name} must be true or false, not {value!r}.")
        return value
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise UsageError(f"{name} must be a stop sequence or a list of them, not {value!r}.")
    if any(s == "" for s in stops):
        raise UsageError(
            f"{name}: a stop sequence cannot be empty (it would cut every answer to nothing); "
            "give text such as '\\n' or 'Question:'."
        )
    return tuple(stops)


def settings_from(
    options: Any,
    base: GenerationSettings = GenerationSettings(),
    where: str = "",
    flags: bool = False,
) -> GenerationSettings:
    """``base`` with the keys of ``options`` (a mapping of ``GENERATION_KEYS``) over it.

    Errors start with ``where`` and call a key ``--key-name`` when ``flags`` (command-line
    options), else by its name."""
    if not isinstance(options, Mapping):
        raise UsageError(f"{where}generation must be a mapping of {', '.join(GENERATION_KEYS)}.")
    unknown = sorted(set(options) - set(GENERATION_KEYS))
    if unknown:
        raise UsageError(
            f"{where}unknown generation key(s) {', '.join(map(str, unknown))}; "
            f"valid: {', '.join(GENERATION_KEYS)}."
        )
    checked = {
        key: _checked(key, value, f"--{key.replace('_', '-')}" if flags else f"{where}{key}")
        for key, value in options.items()
    }
    return dataclasses.replace(base, **checked)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` before the first occurrence of any stop sequence (all of it when none occurs)."""
    ends = [at for at in (text.find(stop) for stop in until) if at >= 0]
    return text[: min(ends)] if ends else text


class _StopSequences(StoppingCriteria):
    """Marks a row finished once its decoded new tokens contain a stop sequence; generation
    ends when every row is finished. Decoding is the one used for the answer, so a row stops
    only when its answer will be cut; rows found finished are not decoded again."""

    def __init__(self, tokenizer: Any, until: Sequence[str], start: int) -> None:
        self.tokenizer, self.until, self.start = tokenizer, tuple(until), start
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        rows = [row for row in range(input_ids.shape[0]) if not self.done[row]]
        texts = self.tokenizer.batch_decode(
            input_ids[rows, self.start :].tolist(), skip_special_tokens=True
        )
        for row, text in zip(rows, texts, strict=True):
            self.done[row] = any(stop in text for stop in self.until)
        return self.done.to(input_ids.device)


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def is_correct(answer: str, reference: str, extract: str, pattern: str | None = None) -> bool:
    """Whether ``answer`` matches ``reference`` under ``extract`` (see module docstring)."""
    compiled = check_extract(extract, pattern)
    if extract == "exact":
        return answer.strip() == reference.strip()
    if extract == "last_number":
        got, want = last_number(answer), last_number(reference)
        return got is not None and want is not None and got == want
    if extract == "contains":
        wanted = reference.strip()
        return (
            bool(wanted)
            and re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", answer, re.IGNORECASE) is not None
        )

    def grab(text: str) -> str | None:  # regex
        match = compiled.search(text) if compiled is not None else None
        if match is None:
            return None
        return (match.group(1) if compiled.groups else match.group(0)).strip()

    got = grab(answer)
    return got is not None and got in (reference.strip(), grab(reference))


def check_extract(extract: str, pattern: str | None = None) -> re.Pattern[str] | None:
    """``UsageError`` unless ``extract`` is one of ``EXTRACTORS`` and, for ``regex``,
    ``pattern`` is a regular expression (returned compiled)."""
    if extract not in EXTRACTORS:
        raise UsageError(f"unknown extract {extract!r}; choose one of {', '.join(EXTRACTORS)}")
    if extract != "regex":
        return None
    if not pattern:
        raise UsageError("extract 'regex' needs a pattern.")
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as error:
        raise UsageError(f"pattern {pattern!r} is not a regular expression ({error}).") from None


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
    """The model's answer to each prompt: its new tokens decoded (special tokens skipped) and
    cut before the first stop sequence of ``settings.until``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad  # masked out either way
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
        stops = [_StopSequences(tokenizer, settings.until, width)] if settings.until else []
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList(stops),
        )
        for row in range(len(encoded)):
            text = tokenizer.decode(output[row, width:], skip_special_tokens=True)
            answers.append(cut_at_stops(text, settings.until))
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
    check_extract(extract, pattern)  # before the long part
    answers = generate_answers(
        model, tokenizer, [e["prompt"] for e in examples], settings, batch_size, progress
    )
    correct = sum(
        is_correct(answer, e["reference"], extract, pattern)
        for answer, e in zip(answers, examples, strict=True)
    )
    return TaskScores(scores={"accuracy": proportion_interval(correct, len(examples))}), answers
