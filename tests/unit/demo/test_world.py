"""The demo's generated world: deterministic, held-out tests unseen, files the commands read."""

from __future__ import annotations

import re

from omotool.data import load_examples
from omotool.demo.world import (
    CLOSING,
    RUDE_CLOSING,
    SPLITS,
    STYLE_PATTERN,
    make_world,
    read_jsonl,
    write_suite,
    write_world,
)
from omotool.eval.suite import load_suite


def test_same_seed_same_world_other_seed_other_world() -> None:
    first, again, other = make_world(3), make_world(3), make_world(4)
    assert first.corpus == again.corpus and first.sft == again.sft
    assert first.preferences == again.preferences
    assert first.facts != other.facts


def test_reversal_test_strings_never_appear_in_training_text() -> None:
    world = make_world(0, entities=8, reversals=200, held_out_reversals=40)
    tested = {
        row["prompt"].removeprefix("reverse ")
        for split in SPLITS
        for row in world.evaluation[split]["reverse"]
    }
    assert len(tested) == 40
    trained = {row["prompt"].removeprefix("reverse ") for row in world.sft}
    assert not tested & trained
    assert not any(line.split(" backwards")[0] in tested for line in world.corpus)
    for row in world.evaluation["test"]["reverse"]:
        assert row["reference"].split() == row["prompt"].split()[1:][::-1]


def test_validation_and_test_are_disjoint_halves() -> None:
    world = make_world(0, entities=12)
    validation, test = (world.evaluation[split] for split in SPLITS)
    assert set(validation) == set(test) == {"polite", "facts", "sums", "reverse"}
    for task in validation:
        prompts = [{row["prompt"] for row in split[task]} for split in (validation, test)]
        assert prompts[0] and prompts[1] and not prompts[0] & prompts[1], task
    # the reward's creatures differ between the splits, not only the wording of the request
    creatures = [{row["prompt"].split()[-2] for row in s["polite"]} for s in (validation, test)]
    assert not creatures[0] & creatures[1]


def test_preferences_prefer_the_closing_that_the_rule_judges() -> None:
    world = make_world(0, entities=10)
    rule = re.compile(STYLE_PATTERN)
    for row in world.preferences + world.preference_test:
        assert row["chosen"].endswith(CLOSING) and row["rejected"].endswith(RUDE_CLOSING)
        assert rule.search(row["chosen"]) and not rule.search(row["rejected"])
    trained = {row["prompt"] for row in world.preferences}
    assert not trained & {row["prompt"] for row in world.preference_test}
    # the SFT model sees both closings, so the preferred one is already possible
    answers = [row["completion"] for row in world.sft if row["prompt"] in trained]
    assert any(a.endswith(CLOSING) for a in answers)
    assert any(a.endswith(RUDE_CLOSING) for a in answers)


def test_brief_polite_answers_state_no_facts_and_pull_against_fact_answers() -> None:
    world = make_world(0, entities=10)
    facts = {e: set(f.values()) for e, f in world.facts.items()}
    for row in world.preferences:
        entity = row["prompt"].split()[-2]
        chosen, rejected = set(row["chosen"].split()), set(row["rejected"].split())
        assert not chosen & facts[entity] and facts[entity] <= rejected
    # fact questions are answered in the sentences the rejected descriptions are made of
    answer = next(r["reference"] for r in world.evaluation["test"]["facts"])
    assert answer.split()[1] in ("is", "lives", "eats")
    described = make_world(0, entities=10, brief_polite=False)
    assert all(
        facts[row["prompt"].split()[-2]] <= set(row["chosen"].split())
        for row in described.preferences
    )


def test_files_are_read_by_train_and_eval(tmp_path) -> None:
    paths = write_world(make_world(0, entities=8, reversals=100, held_out_reversals=20), tmp_path)
    sft = read_jsonl(paths["sft"])
    assert sft[0]["prompt"][0]["role"] == "user"
    assert sft[0]["completion"][0]["role"] == "assistant"
    assert len(load_examples(paths["prefs"], "preference")) == len(read_jsonl(paths["prefs"]))
    for split in SPLITS:
        suite = load_suite(write_suite(paths, tmp_path / f"suite-{split}.yaml", split))
        categories = {t.name: t.category for t in suite.tasks}
        assert categories == {"polite": "reward", "facts": "capability", "sums": "capability",
                              "reverse": "capability"}  # fmt: skip
        assert len(suite.tasks[3].examples) == 10
        assert all(str(t.data).endswith(f"-{split}.jsonl") for t in suite.tasks)
