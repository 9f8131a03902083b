"""Log-probabilities of completions given prompts, batched, with the model's chat template.

``log π(y | x) = Σ_t log softmax(f(x, y_<t))[y_t]`` over the completion's tokens only. A
standard (string) example is tokenized as ``tokenizer(x)`` followed by
``tokenizer(y, add_special_tokens=False)`` and the EOS token; a conversational one as the chat
template of the prompt messages (with the generation prompt) followed by the rest of the chat
template of prompt + completion messages. Batches are right-padded, so a sequence's positions
see exactly what they would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from omotool.errors import InputError

Text = str | list[dict[str, str]]


def encode_pair(tokenizer: Any, prompt: Text, completion: Text) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` as the module docstring describes."""
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        if not prompt_ids:
            raise InputError("an empty prompt cannot condition a completion; give a prompt.")
        return prompt_ids, completion_ids
    if isinstance(prompt, str) or isinstance(completion, str):
        raise InputError("prompt and completion must both be strings or both be message lists.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("conversational data needs a tokenizer with a chat template.")
    prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _template_ids(tokenizer, [*prompt, *completion], add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise InputError(
            "the chat template renders the prompt differently inside the whole conversation; "
            "its completion cannot be scored separately."
        )
    return prompt_ids, full_ids[len(prompt_ids) :]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def completion_logprobs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[Text, Text]],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[int]]:
    """Summed log-probabilities of each completion given its prompt, and its token count.

    ``progress(n)`` is called after each batch with the number of pairs done.
    """
    encoded = [encode_pair(tokenizer, prompt, completion) for prompt, completion in pairs]
    return token_logprobs(model, tokenizer, encoded, batch_size, progress)


@torch.no_grad()
def token_logprobs(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[int]]:
    """``Σ log π(c_t | p, c_<t)`` for token-id pairs ``(p, c)`` (``p`` not empty), batched
    with right padding on the model's device; and ``len(c)``. An empty ``c`` scores 0. The
    log-probabilities come from the logits upcast to float32 (whatever the weights' dtype)
    and are summed in float32."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt_ids, completion_ids) in enumerate(batch):
            sequence = list(prompt_ids) + list(completion_ids)
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        targets = targets.cpu()  # one copy per batch from an accelerator; sums in float32
        for row, (prompt_ids, completion_ids) in enumerate(batch):
            first = len(prompt_ids) - 1  # the position that predicts the first completion token
            scores.append(float(targets[row, first : first + len(completion_ids)].sum()))
        if progress is not None:
            progress(min(start + batch_size, len(encoded)))
    return scores, [len(c) for _, c in encoded]
