"""The preference task against a direct, one-example-at-a-time computation with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omotool.errors import InputError
from omotool.eval.preference import encode_pairs, preference_scores, side_logprobs
from omotool.eval.scoring import completion_logprobs, encode_pair

PAIRS = [
    {"prompt": "what is 1 + 2 ?", "chosen": "1 + 2 = 3", "rejected": "1 + 2 = 4 ! ! !"},
    {"prompt": "what is 3 + 3 ?", "chosen": "6", "rejected": "3 + 3 = 7"},
    {"prompt": "please answer : 2 + 2", "chosen": "4", "rejected": "5 5"},
    {"prompt": "what is 9 + 0 ?", "chosen": "9", "rejected": "0"},
    {"prompt": "thank you", "chosen": "you are welcome", "rejected": "no"},
]


@pytest.fixture(scope="module")
def models(llama_pair):
    base, sft = llama_pair

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    return load(sft), load(base), AutoTokenizer.from_pretrained(str(sft))


def direct_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log π(completion | prompt), written out for one example."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    total = 0.0
    for position in range(len(prompt_ids), ids.shape[1]):
        total += float(torch.log_softmax(logits[position - 1], dim=-1)[ids[0, position]])
    return total


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_log_probs_equal_the_direct_computation(models, batch_size) -> None:
    policy, _, tokenizer = models
    pairs = [(p["prompt"], p["chosen"]) for p in PAIRS] + [
        (p["prompt"], p["rejected"]) for p in PAIRS
    ]
    scores, counts = completion_logprobs(policy, tokenizer, pairs, batch_size=batch_size)
    expected = [direct_logp(policy, tokenizer, prompt, completion) for prompt, completion in pairs]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert counts == [len(encode_pair(tokenizer, p, c)[1]) for p, c in pairs]


def test_preference_scores_equal_the_direct_computation(models) -> None:
    policy, reference, tokenizer = models
    beta = 0.1
    result = preference_scores(policy, reference, tokenizer, PAIRS, beta=beta, batch_size=2)
    assert result.failed is None

    def reward(pair, side):
        policy_logp = direct_logp(policy, tokenizer, pair["prompt"], pair[side])
        return beta * (policy_logp - direct_logp(reference, tokenizer, pair["prompt"], pair[side]))

    margins = [reward(p, "chosen") - reward(p, "rejected") for p in PAIRS]
    accuracy = result.scores["reward_accuracy"]
    assert accuracy.value == sum(m > 0 for m in margins) / len(margins) and accuracy.n == 5
    assert result.scores["reward_margin"].value == pytest.approx(sum(margins) / 5, abs=1e-5)
    chosen = [direct_logp(policy, tokenizer, p["prompt"], p["chosen"]) for p in PAIRS]
    assert result.scores["logps_chosen"].value == pytest.approx(sum(chosen) / 5, abs=1e-4)


def test_precomputed_reference_log_probs_give_the_same_scores(models) -> None:
    policy, reference, tokenizer = models
    direct = preference_scores(policy, reference, tokenizer, PAIRS, batch_size=2)
    logps = side_logprobs(reference, tokenizer, encode_pairs(tokenizer, PAIRS), batch_size=2)
    reused = preference_scores(policy, None, tokenizer, PAIRS, batch_size=2, reference_logps=logps)
    assert reused == direct and reused.failed is None
    nan = ([float("nan")] * len(PAIRS), logps[1])
    assert preference_scores(policy, None, tokenizer, PAIRS, reference_logps=nan).failed


def test_a_model_against_itself_has_zero_margin(models) -> None:
    policy, _, tokenizer = models
    result = preference_scores(policy, policy, tokenizer, PAIRS)
    assert result.scores["reward_margin"].value == 0.0
    assert result.scores["reward_accuracy"].value == 0.0  # ties are not wins


def test_non_finite_log_probs_fail_the_model(models) -> None:
    policy, reference, tokenizer = models
    broken = AutoModelForCausalLM.from_config(policy.config)
    broken.load_state_dict(policy.state_dict())
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    result = preference_scores(broken, reference, tokenizer, PAIRS)
    assert result.failed == "non-finite log-probabilities" and not result.scores


def test_conversational_pairs_use_the_chat_template(models) -> None:
    policy, _, tokenizer = models
    prompt = [{"role": "user", "content": "what is 1 + 2 ?"}]
    answer = [{"role": "assistant", "content": "3"}]
    prompt_ids, completion_ids = encode_pair(tokenizer, prompt, answer)
    rendered = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    assert prompt_ids + completion_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    (score,), _ = completion_logprobs(policy, tokenizer, [(prompt, answer)])
    assert score < 0
    with pytest.raises(InputError, match="both be strings or both be message lists"):
        encode_pair(tokenizer, "text", answer)
    with pytest.raises(InputError, match="empty prompt"):
        encode_pair(tokenizer, "", "x")
