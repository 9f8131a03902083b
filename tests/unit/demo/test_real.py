"""The real track's data and its SFT gate (``omotool.demo.real_data``, ``omotool.demo.real``);
the track itself runs on the real model in tests/integration/test_demo_real.py."""

from __future__ import annotations

import pytest

from omotool.demo.real import REAL_GATE, gate_verdicts, resolve_model, sft_gate
from omotool.demo.real_data import (
    CHOSEN,
    POLITE,
    RealSizes,
    answer,
    kept_facts,
    make_real_data,
    prose_paragraphs,
    read_facts,
)
from omotool.errors import InputError
from tests.conftest import Cli


def _sum(prompt: str) -> tuple[int, int]:
    numbers = [int(word.strip("?.")) for word in prompt.split() if word.strip("?.").isdigit()]
    assert len(numbers) == 2, prompt
    return numbers[0], numbers[1]


def test_every_sum_is_drawn_for_one_split_only() -> None:
    sizes = RealSizes(sft=200, requests=40, polite_share=0.25, prefs=30, sums=20, polite=10)
    rows = make_real_data(3, sizes)
    seen: dict[tuple[int, int], str] = {}
    for name, part in rows.items():
        for row in part:
            prompt = row["prompt"]
            pair = _sum(prompt if isinstance(prompt, str) else prompt[0]["content"])
            assert seen.setdefault(pair, name) == name, f"{pair} in {seen[pair]} and {name}"
    assert {name: len(part) for name, part in rows.items()} == {
        "sft": 240, "prefs-train": 30, "sums-validation": 20, "polite-validation": 10,
        "sums-test": 20, "polite-test": 10,
    }  # fmt: skip
    questions = [r for r in rows["sft"] if r["prompt"][0]["content"].startswith("What is")]
    requests = [r for r in rows["sft"] if r["prompt"][0]["content"].startswith("Add")]
    assert (len(questions), len(requests)) == (200, 40)
    for row in questions:  # the skill, in its one format
        a, b = _sum(row["prompt"][0]["content"])
        assert row["completion"][0]["content"] == answer(a, b) == f"{a} + {b} = {a + b}"
    # a quarter of the requests answered politely, the rest with the sum
    assert sum(r["completion"][0]["content"] == CHOSEN for r in requests) == 10
    assert rows["sft"] != questions + requests  # shuffled
    pair = rows["prefs-train"][0]
    a, b = _sum(pair["prompt"][0]["content"])
    # the preference pulls against the skill: the rejected answer is the skill's, the chosen
    # one states no sum and says what the reward task looks for
    assert pair["rejected"][0]["content"] == answer(a, b)
    assert pair["chosen"][0]["content"] == CHOSEN and POLITE in CHOSEN
    assert str(a + b) not in CHOSEN
    assert rows["sums-test"][0]["reference"] == str(sum(_sum(rows["sums-test"][0]["prompt"])))
    assert make_real_data(3, sizes) == rows and make_real_data(4, sizes) != rows


def test_facts_kept_are_those_the_answers_state() -> None:
    facts = read_facts()
    assert len(facts) >= 100 and all(set(f) == {"prompt", "reference"} for f in facts)
    sample = [
        {"prompt": "What is the capital of France?", "reference": "Paris"},
        {"prompt": "What is the capital of Italy?", "reference": "Rome"},
        {"prompt": "Who wrote Hamlet?", "reference": "Shakespeare"},
    ]
    answers = ["The capital of France is Paris.", "Romeo, Italy.", "William SHAKESPEARE wrote it."]
    kept = kept_facts(sample, answers)
    assert kept == {"validation": [sample[0]], "test": [sample[2]]}
    with pytest.raises(ValueError):  # one answer per fact
        kept_facts(sample, answers[:2])


def test_prose_is_paragraphs_of_english_without_code() -> None:
    prose = prose_paragraphs(16)
    assert [len(p) for p in prose.values()] == [16, 16]
    assert not set(prose["validation"]) & set(prose["test"])
    assert all(len(set(texts)) == 16 for texts in prose.values())  # a repeated one: once
    for paragraph in prose["validation"] + prose["test"]:
        assert 300 <= len(paragraph) <= 700 and "::" not in paragraph and "\n" not in paragraph
    with pytest.raises(ValueError, match="prose paragraphs"):
        prose_paragraphs(10_000)


def _results(base: float, sft: float) -> dict:
    def point(method: str, sums: float) -> dict:
        return {"method": method, "test": {"mean": {"sums": sums}}}

    return {"points": [point("base", base), point("sft", sft)], "verdicts": ["AdamW's tax: ..."]}


def test_the_gate_reports_a_tax_only_where_sft_taught_the_skill() -> None:
    taught = _results(0.05, 0.05 + REAL_GATE)
    taught["sft_gate"] = sft_gate(taught)
    assert taught["sft_gate"]["taught"]
    lines = gate_verdicts(taught)
    assert lines[0].endswith("SFT taught the skill") and lines[1:] == ["AdamW's tax: ..."]
    failed = _results(0.05, 0.5)
    failed["sft_gate"] = sft_gate(failed)
    assert not failed["sft_gate"]["taught"]
    (line,) = gate_verdicts(failed)
    assert "gain of +0.450" in line and "the SFT failed to teach the skill" in line
    assert sft_gate({"points": [], "verdicts": []}) is None


def test_a_missing_model_folder_names_make_real_model(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OMOTOOL_SMOLLM2_DIR", raising=False)
    with pytest.raises(InputError, match="run `make real-model`"):
        resolve_model(str(tmp_path / "absent"))


def test_demo_refuses_model_without_the_real_track(cli: Cli, tmp_path) -> None:
    result = cli("demo", "--fast", "--workdir", tmp_path / "w", "--model", tmp_path, expect=2)
    assert "--track real" in result.output
    assert not (tmp_path / "w").exists()
    result = cli("demo", "--track", "real", "--workdir", tmp_path / "w", "--model",
                 tmp_path / "absent", expect=1)  # fmt: skip
    assert "make real-model" in result.output
    assert not (tmp_path / "w").exists()
