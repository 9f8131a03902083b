"""Rewards of online RL: verifiers share eval's extractors, Python functions load from files and
modules, and every reward is checked on every call."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from omotool.errors import InputError, UsageError
from omotool.eval.generation import is_correct
from omotool.train.rewards import (
    AsyncCheckedReward,
    CheckedReward,
    RewardError,
    RewardSpec,
    function_columns,
    load_function,
    load_reward,
    parse_rewards,
    required_columns,
    unique_names,
    verifier,
)


def test_parse_rewards_keeps_order_models_last() -> None:
    specs = parse_rewards(["exact", "lib/r.py:format_ok", "pkg.mod:score"], ["runs/rm"])
    assert [(s.kind, s.source) for s in specs] == [
        ("verifier", "exact"), ("function", "lib/r.py:format_ok"), ("function", "pkg.mod:score"),
        ("model", "runs/rm"),
    ]  # fmt: skip
    assert specs[-1].option == "--reward-model runs/rm" and specs[0].option == "--reward exact"


@pytest.mark.parametrize("bad", ["exactly", "file.py", "file.py:", ":name", "mod:1x"])
def test_parse_rewards_refuses_what_it_cannot_read(bad) -> None:
    with pytest.raises(UsageError, match="give a verifier"):
        parse_rewards([bad])


CASES = [
    ("exact", None, " 42 ", "42"), ("exact", None, "41", "42"),
    ("last_number", None, "so it is 1,234.", "1234"), ("last_number", None, "no number", "3"),
    ("regex", r"answer: (\w+)", "answer: yes", "yes"), ("regex", r"answer: (\w+)", "yes", "yes"),
]  # fmt: skip


@pytest.mark.parametrize(("extract", "pattern", "answer", "reference"), CASES)
def test_verifiers_score_as_eval_does(extract, pattern, answer, reference) -> None:
    score = verifier(extract, "reference", pattern)
    expected = float(is_correct(answer, reference, extract, pattern))
    assert score(completions=[answer], reference=[reference]) == [expected]
    conversational = [[{"role": "assistant", "content": answer}]]
    assert score(completions=conversational, reference=[reference]) == [expected]


def test_verifier_reads_numbers_and_its_column() -> None:
    score = verifier("last_number", "answer")
    assert score(completions=["it is 7", "8"], answer=[7, 7.0]) == [1.0, 0.0]
    with pytest.raises(TypeError, match="'answer' column holds list"):
        score(completions=["7"], answer=[[7]])


def test_load_function_from_a_file_and_a_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "rewards_here.py").write_text(
        "def length(completions, **kwargs):\n    return [len(c) for c in completions]\n"
        "def needs(completions, answer, topic, scale=1.0, **kwargs):\n    return [0.0]\n"
    )
    from_file = load_function(f"{tmp_path}/rewards_here.py:length")
    assert from_file(completions=["ab", "c"]) == [2, 1]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_function("rewards_here:length")(completions=["abc"]) == [3]
    assert function_columns(load_function("rewards_here:needs")) == ["answer", "topic"]
    assert function_columns(from_file) == []


def test_load_function_errors_name_the_problem(tmp_path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "fine.py").write_text("value = 3\ndef other(completions, **k):\n    return []\n")
    cases = {
        f"{tmp_path}/missing.py:f": "no file",
        f"{tmp_path}/broken.py:f": "RuntimeError: boom at import",
        f"{tmp_path}/fine.py:f": "has no 'f' .*defines: other",
        f"{tmp_path}/fine.py:value": "value is a int, not callable",
        "no_such_module_here:f": "importing no_such_module_here failed",
    }
    for source, message in cases.items():
        with pytest.raises(InputError, match=message):
            load_function(source)


def checked(function) -> CheckedReward:
    return CheckedReward("mine", "--reward r.py:mine", function)


def test_checked_reward_passes_numbers_and_none() -> None:
    reward = checked(lambda prompts, completions, **kwargs: [1, 0.5, None, np.float32(2), True])
    assert reward(prompts=["p"] * 5, completions=["c"] * 5) == [1.0, 0.5, None, 2.0, 1.0]
    tensor = checked(lambda prompts, completions, **kwargs: torch.tensor([0.25, 1.0]))
    assert tensor(prompts=["p", "q"], completions=["c", "d"]) == [0.25, 1.0]


def test_checked_reward_names_the_prompt_that_raises() -> None:
    def fails_on_q(prompts, completions, reference, **kwargs):
        return [1.0 / (p != "q") for p in prompts]

    with pytest.raises(RewardError) as error:
        checked(fails_on_q)(prompts=["p", "q", "r"], completions=["a"] * 3, reference=["x"] * 3)
    message = str(error.value)
    assert "--reward r.py:mine raised ZeroDivisionError" in message and "'q'" in message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, math.nan], "returned nan for the prompt 'q'"),
        ([-math.inf, 1.0], "returned -inf for the prompt 'p'"),
        (["1", 1.0], "returned '1' for the prompt 'p'"),
        (3.0, "returned float; it must return a list"),
    ],
)
def test_checked_reward_refuses_what_is_not_a_reward(values, message) -> None:
    with pytest.raises(RewardError, match=message):
        checked(lambda prompts, completions, **kwargs: values)(
            prompts=["p", "q"], completions=["a", "b"]
        )


def test_load_reward_names_and_columns(tmp_path) -> None:
    (tmp_path / "r.py").write_text("def fmt(completions, topic, **kwargs):\n    return [1.0]\n")
    rewards = [
        load_reward(RewardSpec("verifier", "exact"), reference="answer"),
        load_reward(RewardSpec("function", f"{tmp_path}/r.py:fmt")),
        load_reward(RewardSpec("verifier", "regex"), pattern=r"(\d)"),
    ]
    assert [r.__name__ for r in rewards] == ["exact", "fmt", "regex"]
    assert required_columns(rewards) == {
        "answer": "--reward exact", "topic": f"--reward {tmp_path}/r.py:fmt",
        "reference": "--reward regex",
    }  # fmt: skip
    assert unique_names(["exact", "exact", "fmt", "exact"]) == [
        "exact",
        "exact_2",
        "fmt",
        "exact_3",
    ]


def test_a_causal_lm_is_not_a_reward_model(llama_pair) -> None:
    with pytest.raises(InputError, match="not a sequence classifier"):
        load_reward(RewardSpec("model", str(llama_pair[1])))


ASYNC_REWARDS = '''
import asyncio

async def judged(completions, reference, **kwargs):
    """An async judge: 1 for the reference answer."""
    await asyncio.sleep(0)
    return [float(c == r) for c, r in zip(completions, reference)]

async def fails_on_q(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 / (p != "q") for p in prompts]

async def nan(completions, **kwargs):
    return [float("nan")] * len(completions)

class Judge:
    async def __call__(self, completions, **kwargs):
        return [0.5] * len(completions)

judge = Judge()

def hidden(completions, **kwargs):  # a plain function handing back a coroutine
    return judged(completions=completions, **kwargs)
'''


def test_async_rewards_are_awaited_by_trl_and_checked(tmp_path) -> None:
    from trl.trainer.utils import is_async_callable

    (tmp_path / "judges.py").write_text(ASYNC_REWARDS)
    loaded = {
        name: load_reward(RewardSpec("function", f"{tmp_path}/judges.py:{name}"))
        for name in ("judged", "fails_on_q", "nan", "judge", "hidden")
    }
    assert loaded["judged"].columns == ("reference",)
    for name in ("judged", "fails_on_q", "nan", "judge"):
        assert isinstance(loaded[name], AsyncCheckedReward) and is_async_callable(loaded[name])
    assert not is_async_callable(loaded["hidden"])
    rows = dict(prompts=["p", "q"], completions=["1", "2"], reference=["1", "1"])
    assert asyncio.run(loaded["judged"](**rows)) == [1.0, 0.0]
    assert asyncio.run(loaded["judge"](**rows)) == [0.5, 0.5]
    assert loaded["hidden"](**rows) == [1.0, 0.0]  # run to its end, not "returned coroutine"
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError.*prompt: 'q'"):
        asyncio.run(loaded["fails_on_q"](**rows))
    with pytest.raises(RewardError, match="returned nan for the prompt 'p'"):
        asyncio.run(loaded["nan"](**rows))
