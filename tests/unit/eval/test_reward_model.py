"""reward_model: rewards against a direct computation, win rates, and bad reward models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForSequenceClassification

from omotool.errors import InputError
from omotool.eval.reward_model import load_reward_model, reward_model_scores, rewards
from omotool.tiny_models import build_tokenizer, model_config

PROMPTS = ["what is 1 + 2 ?", "thank you", "2 + 2"]
ANSWERS = ["3", "you are welcome", "4 4 4 4"]


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm") / "rm"
    config = model_config("llama")
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    build_tokenizer(folder)
    return folder


def test_rewards_equal_the_direct_computation(reward_model_folder) -> None:
    model, tokenizer = load_reward_model(str(reward_model_folder))
    got = rewards(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    expected = []
    for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
        with torch.no_grad():
            expected.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert got == pytest.approx(expected, abs=1e-5)


def test_mean_reward_and_win_rate_with_ties() -> None:
    result = reward_model_scores([1.0, 2.0, 3.0, 0.0], baseline_rewards=[0.0, 2.0, 4.0, -1.0])
    assert result.scores["mean_reward"].value == 1.5
    win = result.scores["win_rate"]
    assert win.value == (2 + 0.5) / 4 and win.n == 4 and win.low < win.value < win.high
    assert reward_model_scores([float("nan")]).failed == "non-finite rewards"


def test_a_causal_lm_is_not_a_reward_model(llama_pair, tmp_path) -> None:
    _, sft = llama_pair
    with pytest.raises(InputError, match="not a sequence classifier"):
        load_reward_model(str(sft))
    with pytest.raises(InputError, match="not a model folder"):
        load_reward_model(str(tmp_path))


def test_reward_model_with_several_outputs_is_refused(tmp_path) -> None:
    config = model_config("llama")
    config.num_labels = 3
    LlamaForSequenceClassification(config).save_pretrained(str(tmp_path / "rm3"))
    build_tokenizer(tmp_path / "rm3")
    with pytest.raises(InputError, match="3 outputs"):
        load_reward_model(str(tmp_path / "rm3"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "rm3")) is not None
