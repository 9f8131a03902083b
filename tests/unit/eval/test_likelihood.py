"""choice and perplexity against direct computations with transformers on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omotool.errors import InputError
from omotool.eval.likelihood import answer_index, choice_scores, perplexity_scores

QUESTIONS = [
    {"question": "what is 1 + 2 ?", "choices": ["3", "4", "5"], "answer": 0},
    {"question": "what is 3 + 3 ?", "choices": ["5", "6"], "answer": "B"},
    {"question": "what is 2 + 2 ?", "choices": ["4", "8", "2", "0"], "answer": "4"},
    {"question": "please answer : 9 + 0", "choices": ["9", "0"], "answer": 1},
]
DOCUMENTS = ["the user asks a question and the assistant answers", "1 + 2 = 3", "thank you !"]


@pytest.fixture(scope="module")
def model_and_tokenizer(llama_pair):
    _, sft = llama_pair
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(sft))


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def direct_option_logp(model, tokenizer, question: str, option: str) -> float:
    prompt = tokenizer(question)["input_ids"]
    option_ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    ids = prompt + option_ids + [tokenizer.eos_token_id]
    logits = logits_of(model, ids)
    return sum(
        float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(len(prompt), len(ids))
    )


def test_choice_accuracy_equals_the_direct_computation(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    result = choice_scores(model, tokenizer, QUESTIONS, batch_size=3, chat=False)
    correct = 0
    for q in QUESTIONS:
        scores = [direct_option_logp(model, tokenizer, q["question"], c) for c in q["choices"]]
        correct += scores.index(max(scores)) == answer_index(q)
    accuracy = result.scores["accuracy"]
    assert (accuracy.value, accuracy.n) == (correct / len(QUESTIONS), len(QUESTIONS))
    assert accuracy.low <= accuracy.value <= accuracy.high


def direct_chat_option_logp(model, tokenizer, question: str, option: str) -> float:
    user = [{"role": "user", "content": question}]
    render = tokenizer.apply_chat_template
    prompt = tokenizer(render(user, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]  # fmt: skip
    full = tokenizer(render([*user, {"role": "assistant", "content": option}], tokenize=False),
                     add_special_tokens=False)["input_ids"]  # fmt: skip
    logits = logits_of(model, full)
    return sum(
        float(torch.log_softmax(logits[t - 1], -1)[full[t]]) for t in range(len(prompt), len(full))
    )


def test_choice_uses_the_chat_template_when_the_model_has_one(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    result = choice_scores(model, tokenizer, QUESTIONS)  # chat=None: the tiny model has one
    correct = 0
    for q in QUESTIONS:
        scores = [direct_chat_option_logp(model, tokenizer, q["question"], c) for c in q["choices"]]
        correct += scores.index(max(scores)) == answer_index(q)
    assert result.scores["accuracy"].value == correct / len(QUESTIONS)


def test_answers_as_index_letter_or_text() -> None:
    question = {"choices": ["a", "b", "c"]}
    assert [answer_index({**question, "answer": a}) for a in (2, "B", "c", " a ")] == [2, 1, 2, 0]
    for bad in (3, "Z", True, "d"):
        with pytest.raises(InputError, match="not an option"):
            answer_index({**question, "answer": bad})


def test_perplexity_equals_the_direct_computation(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    result = perplexity_scores(model, tokenizer, DOCUMENTS, batch_size=2)
    total_nll, total_tokens, per_document = 0.0, 0, []
    for document in DOCUMENTS:
        ids = tokenizer(document)["input_ids"]
        logits = logits_of(model, ids)
        nll = -sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(1, len(ids)))
        total_nll, total_tokens = total_nll + nll, total_tokens + len(ids) - 1
        per_document.append(nll / (len(ids) - 1))
    estimate = result.scores["perplexity"]
    assert estimate.value == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert estimate.low <= math.exp(sum(per_document) / 3) <= estimate.high
    with pytest.raises(InputError, match="fewer than 2 tokens"):
        perplexity_scores(model, tokenizer, ["a"])
