"""generate: batched greedy answers against one-at-a-time generation, and the extractors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omotool.errors import UsageError
from omotool.eval.generation import (
    GenerationSettings,
    generate_answers,
    generate_scores,
    is_correct,
    last_number,
)

PROMPTS = ["what is 1 + 2 ?", "thank you", "please answer : 9 + 0 = ?", "2 + 2"]


@pytest.fixture(scope="module")
def model_and_tokenizer(llama_pair):
    _, sft = llama_pair
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(sft))


def direct_greedy(model, tokenizer, prompt: str, steps: int, chat: bool = False) -> str:
    """Greedy decoding written out: argmax of the next-token logits, one token at a time."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        token = int(torch.argmax(logits))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batched_greedy_equals_one_token_at_a_time(model_and_tokenizer, batch_size) -> None:
    model, tokenizer = model_and_tokenizer
    settings = GenerationSettings(max_new_tokens=6, chat=False)
    answers = generate_answers(model, tokenizer, PROMPTS, settings, batch_size=batch_size)
    assert answers == [direct_greedy(model, tokenizer, p, 6) for p in PROMPTS]


def test_the_chat_template_is_used_when_the_model_has_one(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    answers = generate_answers(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6))
    assert answers == [direct_greedy(model, tokenizer, p, 6, chat=True) for p in PROMPTS]
    assert answers != generate_answers(
        model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6, chat=False)
    )


def test_sampling_is_seeded(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    first = generate_answers(model, tokenizer, PROMPTS, settings)
    assert generate_answers(model, tokenizer, PROMPTS, settings) == first


def test_accuracy_counts_what_the_extractor_accepts(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    settings = GenerationSettings(max_new_tokens=6, chat=False)
    answers = generate_answers(model, tokenizer, PROMPTS, settings)
    examples = [
        {"prompt": p, "reference": a if i % 2 else a + "x"}
        for i, (p, a) in enumerate(zip(PROMPTS, answers, strict=True))
    ]
    scores, returned = generate_scores(model, tokenizer, examples, "exact", settings=settings)
    assert returned == answers
    accuracy = scores.scores["accuracy"]
    assert accuracy.value == 0.5 and accuracy.n == 4  # the odd ones quote the answer itself


def test_extractors() -> None:
    assert last_number("so 3 + 4 = 7, and then 1,234.5 apples") == 1234.5
    assert last_number("no digits") is None
    assert is_correct("the answer is 42.", "#### 42", "last_number")
    assert not is_correct("41", "#### 42", "last_number")
    assert is_correct(" yes ", "yes", "exact") and not is_correct("yes!", "yes", "exact")
    assert is_correct("Answer: (B) because", "B", "regex", r"\(([A-D])\)")
    assert is_correct("Answer: (B)", "Answer: (B)", "regex", r"\(([A-D])\)")
    assert not is_correct("no choice", "B", "regex", r"\(([A-D])\)")
    with pytest.raises(UsageError, match="needs a pattern"):
        is_correct("a", "a", "regex")
    with pytest.raises(UsageError, match="unknown extract"):
        is_correct("a", "a", "fuzzy")
