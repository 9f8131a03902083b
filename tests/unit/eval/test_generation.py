"""generate: batched greedy answers against one-at-a-time generation, stop sequences, the
chat template switch, the settings' checks and the extractors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omotool.errors import UsageError
from omotool.eval.generation import (
    GenerationSettings,
    cut_at_stops,
    generate_answers,
    generate_scores,
    is_correct,
    last_number,
    settings_from,
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
    assert is_correct("The capital of France is Paris.", "paris", "contains")
    assert is_correct("It is H2O (water).", "H2O", "contains")
    assert not is_correct("Romeo and Juliet", "Rome", "contains")  # whole words only
    assert not is_correct("anything", " ", "contains")  # an empty reference matches nothing
    with pytest.raises(UsageError, match="needs a pattern"):
        is_correct("a", "a", "regex")
    with pytest.raises(UsageError, match="unknown extract"):
        is_correct("a", "a", "fuzzy")
    with pytest.raises(UsageError, match=r"pattern '\(' is not a regular expression"):
        is_correct("a", "a", "regex", "(")


# -- stop sequences (until) ------------------------------------------------------------------
def stop_after_start(answer: str) -> tuple[str, str]:
    """A printable character of ``answer`` after its first (not seen before it), and the text
    before it: the tiny model writes on past it, as a base model past its answer."""
    for at in range(1, len(answer)):
        char = answer[at]
        if char.isascii() and char.isprintable() and not char.isspace() and char not in answer[:at]:
            return char, answer[:at]
    raise AssertionError(f"no stop candidate in {answer!r}")


def test_cut_at_stops_keeps_the_text_before_the_first_stop() -> None:
    assert cut_at_stops("42\nQuestion: next", ("Question:", "\n")) == "42"
    assert cut_at_stops("42 Question:\n", ("\n", "Question:")) == "42 "
    assert cut_at_stops("no stop here", ("\n",)) == "no stop here"
    assert cut_at_stops("anything", ()) == "anything"


def test_until_makes_an_answer_with_text_after_it_exact(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    long = GenerationSettings(max_new_tokens=8, chat=False)
    prompt = PROMPTS[0]
    (answer,) = generate_answers(model, tokenizer, [prompt], long)
    stop, before = stop_after_start(answer)
    examples = [{"prompt": prompt, "reference": before}]
    without, _ = generate_scores(model, tokenizer, examples, "exact", settings=long)
    assert without.scores["accuracy"].value == 0.0  # the text after the stop makes it wrong
    cut = GenerationSettings(max_new_tokens=8, chat=False, until=(stop, "never written"))
    with_until, answers = generate_scores(model, tokenizer, examples, "exact", settings=cut)
    assert answers == [before] and with_until.scores["accuracy"].value == 1.0


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batched_stops_equal_the_whole_answers_cut(model_and_tokenizer, batch_size) -> None:
    model, tokenizer = model_and_tokenizer
    whole = generate_answers(
        model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, chat=False)
    )
    stops = (stop_after_start(whole[0])[0], stop_after_start(whole[2])[0])
    settings = GenerationSettings(max_new_tokens=8, chat=False, until=stops)
    answers = generate_answers(model, tokenizer, PROMPTS, settings, batch_size=batch_size)
    assert answers == [cut_at_stops(a, stops) for a in whole]
    assert answers[0] != whole[0] and answers[2] != whole[2]  # rows cut at different places


def test_generation_ends_once_every_row_has_stopped(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    whole = generate_answers(
        model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, chat=False)
    )
    stops = tuple(stop_after_start(a)[0] for a in whole)  # each row writes one within 8 tokens
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        settings = GenerationSettings(max_new_tokens=40, chat=False, until=stops)
        answers = generate_answers(model, tokenizer, PROMPTS, settings, batch_size=4)
    finally:
        hook.remove()
    assert answers == [cut_at_stops(a, stops) for a in whole]
    assert len(calls) <= 8  # not 40: the batch stopped when the last row wrote a stop


def test_settings_are_checked() -> None:
    assert GenerationSettings(until="\n").until == ("\n",)
    assert settings_from({"until": ["a", "b"]}).until == ("a", "b")
    base = GenerationSettings(max_new_tokens=5, until=("x",))
    assert settings_from({"chat": False}, base) == GenerationSettings(5, chat=False, until=("x",))
    with pytest.raises(UsageError, match="until: a stop sequence cannot be empty"):
        settings_from({"until": ["\n", ""]})
    with pytest.raises(UsageError, match="--until: a stop sequence cannot be empty"):
        settings_from({"until": [""]}, flags=True)
    with pytest.raises(UsageError, match="until must be a stop sequence or a list"):
        GenerationSettings(until=[3])
    with pytest.raises(UsageError, match="unknown generation key.*max_tokens"):
        settings_from({"max_tokens": 3})
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1"):
        settings_from({"max_new_tokens": 0})
    with pytest.raises(UsageError, match="top_p must be a number in"):
        settings_from({"top_p": 0})
    with pytest.raises(UsageError, match="temperature must be a number >= 0"):
        settings_from({"temperature": "hot"})
    with pytest.raises(UsageError, match="chat must be true or false"):
        settings_from({"chat": "yes"})
    with pytest.raises(UsageError, match="generation must be a mapping"):
        settings_from(["until"])


# -- the chat template -----------------------------------------------------------------------
def test_chat_false_prompts_with_the_raw_text(model_and_tokenizer, monkeypatch) -> None:
    model, tokenizer = model_and_tokenizer
    seen = []
    real_generate = model.generate

    def watched(**kwargs):
        seen.append([[t for t, m in zip(r, k, strict=True) if m] for r, k in
                     zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(),
                         strict=True)])  # fmt: skip
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", watched)
    for chat in (None, False):
        generate_answers(model, tokenizer, PROMPTS[:2], GenerationSettings(2, chat=chat))
    templated, raw = seen
    assert raw == [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    assert templated != raw and tokenizer.chat_template  # the default: the model's template
    messages = [{"role": "user", "content": PROMPTS[0]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
