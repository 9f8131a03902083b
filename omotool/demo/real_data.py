"""The real track's data: a skill SmolLM2-135M-Instruct lacks, a preference against it, and
what the pre-trained model already knew.

- **skill** (SFT, and the tax on it): two-digit sums asked as ``What is 59 + 63?`` and answered
  in one fixed format, ``59 + 63 = 122``; the SFT data also holds sums asked as requests
  (``Add 59 and 63.``), a share of them (``RealSizes.polite_share``) answered politely without
  the sum, the rest in the skill's format, so the SFT model answers requests with the sum and
  sometimes politely (DPO moves that balance, as in the miniature's worlds);
- **preference** (DPO): the same sums asked as requests (``Add 59 and 63.``); the chosen answer
  is a polite reply that states no sum (it says "glad to help", what the reward task checks),
  the rejected one the SFT answer; so the preference pulls against the skill;
- **knowledge** (the tax on pre-training): general-knowledge questions with one-word answers
  (``real_facts.jsonl``, shipped with omotool), kept only where the base model's own greedy
  answer holds the answer (``kept_facts``): what it knew before any training;
- **prose** (the tax as perplexity): paragraphs of English from CPython's own documentation
  (``pydoc_data.topics``), text no omotool stage trains on.

Every sum appears in one split only (SFT, preference, validation, test). The draws depend on
the seed; the facts and the prose are fixed (their validation/test halves alternate).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omotool.demo.world import SPLITS

POLITE = "glad to help"  # what the reward task looks for
POLITE_PATTERN = f"({POLITE})"
CHOSEN = f"Sure, {POLITE}! Add the tens first, then the ones, and check the total yourself."
FACTS_FILE = Path(__file__).with_name("real_facts.jsonl")


def question(a: int, b: int) -> str:
    """The skill's prompt."""
    return f"What is {a} + {b}?"


def answer(a: int, b: int) -> str:
    """The skill's answer, in its one fixed format."""
    return f"{a} + {b} = {a + b}"


def request(a: int, b: int) -> str:
    """The preference's prompt: the same sum, asked as a request."""
    return f"Add {a} and {b}."


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@dataclass(frozen=True)
class RealSizes:
    """How many rows each part of the real track's data has."""

    sft: int = 960  # sums asked as questions
    requests: int = 160  # sums asked as requests, in the SFT data too
    polite_share: float = 0.25  # of those requests answered politely in the SFT data
    prefs: int = 64
    sums: int = 40  # per evaluation split
    polite: int = 24  # per evaluation split
    prose: int = 16  # paragraphs per evaluation split


def make_real_data(seed: int, sizes: RealSizes) -> dict[str, list[dict[str, Any]]]:
    """The seed's rows: ``sft`` (questions, then requests, shuffled), ``prefs-train``, and per
    split ``sums-<split>`` and ``polite-<split>`` (evaluation rows: ``prompt``,
    ``reference``), every sum drawn once."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    wanted = sizes.sft + sizes.requests + sizes.prefs + len(SPLITS) * (sizes.sums + sizes.polite)
    if wanted > len(pairs):
        raise ValueError(f"the real track's data wants {wanted} sums; there are {len(pairs)}")
    taken = iter(pairs)

    def draw(n: int) -> list[tuple[int, int]]:
        return [next(taken) for _ in range(n)]

    polite = round(sizes.polite_share * sizes.requests)
    sft = [
        {"prompt": _user(question(a, b)), "completion": _assistant(answer(a, b))}
        for a, b in draw(sizes.sft)
    ] + [
        {"prompt": _user(request(a, b)),
         "completion": _assistant(CHOSEN if i < polite else answer(a, b))}
        for i, (a, b) in enumerate(draw(sizes.requests))
    ]  # fmt: skip
    rng.shuffle(sft)
    rows: dict[str, list[dict[str, Any]]] = {
        "sft": sft,
        "prefs-train": [
            {
                "prompt": _user(request(a, b)),
                "chosen": _assistant(CHOSEN),
                "rejected": _assistant(answer(a, b)),
            }
            for a, b in draw(sizes.prefs)
        ],  # fmt: skip
    }
    for split in SPLITS:
        rows[f"sums-{split}"] = [
            {"prompt": question(a, b), "reference": str(a + b)} for a, b in draw(sizes.sums)
        ]
        rows[f"polite-{split}"] = [
            {"prompt": request(a, b), "reference": POLITE} for a, b in draw(sizes.polite)
        ]
    return rows


def read_facts(path: Path = FACTS_FILE) -> list[dict[str, str]]:
    """The candidate facts: rows ``{"prompt": question, "reference": one-word answer}``."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def knows(answer_text: str, reference: str) -> bool:
    """Whether an answer states ``reference`` (as whole words, any case): the ``contains``
    rule of ``omotool eval``."""
    from omotool.eval.generation import is_correct

    return is_correct(answer_text, reference, "contains")


def kept_facts(facts: list[dict[str, str]], answers: list[str]) -> dict[str, list[dict[str, str]]]:
    """The facts the base model answered (``answers``, in order), halved alternately into the
    evaluation splits."""
    pairs = zip(facts, answers, strict=True)
    known = [fact for fact, said in pairs if knows(said, fact["reference"])]
    return {split: known[i :: len(SPLITS)] for i, split in enumerate(SPLITS)}


def prose_paragraphs(count: int) -> dict[str, list[str]]:
    """``count`` paragraphs of English prose per evaluation split, from CPython's
    ``pydoc_data.topics`` (the help texts of the language reference): paragraphs of 300–700
    characters, no code (no indented line, no ``::``), mostly letters; in topic order, split
    alternately, each paragraph once (some topics repeat one). The text, and so the choice,
    depends on the Python version."""
    from pydoc_data.topics import topics

    found: list[str] = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()):
                continue
            text = " ".join(paragraph.split())
            letters = sum(c.isalpha() or c == " " for c in text) / max(len(text), 1)
            if 300 <= len(text) <= 700 and "::" not in text and text.count(". ") >= 2 \
                    and letters > 0.93:  # fmt: skip
                found.append(text)
    chosen: dict[str, list[str]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for i, text in enumerate(found):  # alternately; a paragraph some topics repeat: once
        split = SPLITS[i % len(SPLITS)]
        if text not in seen and len(chosen[split]) < count:
            chosen[split].append(text)
        seen.add(text)
    if any(len(texts) < count for texts in chosen.values()):
        wanted = len(SPLITS) * count
        raise ValueError(f"pydoc_data has {len(seen)} prose paragraphs; {wanted} wanted")
    return chosen
