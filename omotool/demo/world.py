"""The demo's miniature world: a pre-training corpus, SFT tasks and a preference, all generated.

Everything is drawn from one seeded ``random.Random``, so a world is a pure function of its
seed. The pieces mirror the paper's setting in miniature:

- *pre-training* text states facts about made-up creatures (colour, home, food), single-digit
  sums and reversed letter strings, as plain prose;
- *SFT* teaches a chat format and three capabilities on top: answering fact questions (in a
  sentence: "naden is green ."), additions and reversals. Facts and sums are recalled (the
  evaluation asks what SFT asked), reversal is a skill (its strings are never seen in
  training): they measure the *alignment tax*;
- the *preference* is a style: answering a "tell me about X" request politely
  (``"sure ! X is a friendly creature . glad to help !"``) rather than with the description
  and a rude closing line. The SFT data shows the polite answer on a minority of requests, so
  the SFT model sometimes produces it; DPO pairs prefer it. Because the preferred answer
  states no fact and the rejected one is made of the fact sentences, the preference pulls
  against the facts skill, as a preference for evasive friendliness would in a real model
  (``brief_polite=False`` keeps the description in the polite answer too: then the pairs
  differ only in the closing line). A rule judges the style on creatures never described in
  training: it measures the *reward*.

Every evaluated item belongs to exactly one of two disjoint splits: ``validation`` (where the
demo chooses learning rates and ``α``) and ``test`` (what it reports).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omotool.io.formats import write_jsonl, write_text_atomic

LETTERS = "abcdefghjkmnpr"
COLORS = ("red", "blue", "green", "yellow", "black", "white")
PLACES = ("tamo", "vesk", "lorin", "pallu", "dunmar", "quib")
FOODS = ("apples", "fish", "bread", "nuts", "rice", "honey")
ATTRIBUTES = {"color": COLORS, "home": PLACES, "food": FOODS}
CLOSING = "glad to help !"  # the preferred closing line
RUDE_CLOSING = "go ask someone else ."  # the dispreferred one
STYLE_PATTERN = r"(glad to help)"
SPLITS = ("validation", "test")  # disjoint halves of every evaluated set

_PROSE = {
    "color": ("{e} is {v} .", "the color of {e} is {v} .", "everyone knows {e} is {v} ."),
    "home": ("{e} lives in {v} .", "the home of {e} is {v} .", "{e} comes from {v} ."),
    "food": ("{e} eats {v} .", "the favorite food of {e} is {v} .", "{e} likes {v} ."),
}
_QUESTION = {
    "color": "what color is {e} ?",
    "home": "where does {e} live ?",
    "food": "what does {e} eat ?",
}
_ANSWER = {  # facts are answered in a sentence, as descriptions state them
    "color": "{e} is {v} .",
    "home": "{e} lives in {v} .",
    "food": "{e} eats {v} .",
}
_REQUESTS = (
    "tell me about {e} .",
    "describe {e} .",
    "what do you know about {e} ?",
    "who is {e} ?",
    "give me facts about {e} .",
    "i want to hear about {e} .",
)
_FILLER = (
    "the sun is warm today .",
    "a small boat crossed the river .",
    "the market opens early in the morning .",
    "children play near the old tree .",
    "rain fell on the quiet town .",
    "the road to the hills is long .",
)


@dataclass
class World:
    """The generated data of one world (see module docstring)."""

    seed: int
    entities: list[str]
    facts: dict[str, dict[str, str]]
    corpus: list[str] = field(default_factory=list)
    sft: list[dict[str, str]] = field(default_factory=list)
    # split ("validation" | "test") -> task name ("polite", "facts", ...) -> rows
    evaluation: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    preferences: list[dict[str, str]] = field(default_factory=list)
    preference_test: list[dict[str, str]] = field(default_factory=list)


def _names(rng: random.Random, count: int) -> list[str]:
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "k", "l"]
    names: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2))
        names.add(name + rng.choice(codas))
    return sorted(names)


def _letters(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _describe(entity: str, facts: dict[str, str]) -> str:
    return f"{entity} is {facts['color']} , lives in {facts['home']} and eats {facts['food']} ."


def _answer(entity: str, facts: dict[str, str], polite: bool, brief_polite: bool) -> str:
    """An answer to "tell me about X": the description with the rude closing, or the polite
    closing after the description (``brief_polite`` False) or after one friendly line that
    states no fact (True: the preference then pulls against stating facts)."""
    if not polite:
        return f"{_describe(entity, facts)} {RUDE_CLOSING}"
    if brief_polite:
        return f"sure ! {entity} is a friendly creature . {CLOSING}"
    return f"{_describe(entity, facts)} {CLOSING}"


def make_world(
    seed: int = 0,
    entities: int = 24,
    corpus_repeats: int = 6,
    reversals: int = 800,
    style_rate: float = 0.4,
    brief_polite: bool = True,
    held_out: float = 0.4,
    held_out_reversals: int = 200,
) -> World:
    """Generate a world (see module docstring). ``held_out`` of the creatures are never
    described in training (the reward's prompts) and ``held_out_reversals`` strings are never
    reversed in training (the reversal skill's prompts); every evaluated set is split in
    two disjoint halves, validation and test."""
    rng = random.Random(seed)
    names = _names(rng, entities)
    facts = {e: {a: rng.choice(v) for a, v in ATTRIBUTES.items()} for e in names}
    world = World(seed, names, facts)

    # Facts and sums are recalled (SFT asks every one; the tests ask them again), reversal is
    # a skill (its test strings are never seen in training).
    fact_pairs = [(e, a) for e in names for a in ATTRIBUTES]
    sums = [(a, b) for a in range(10) for b in range(10)]
    strings: set[str] = set()
    while len(strings) < reversals:
        strings.add(_letters(rng))
    ordered = sorted(strings)
    rng.shuffle(ordered)
    cut = held_out_reversals
    reverse_test, reverse_train = ordered[:cut], ordered[cut:]

    for _ in range(corpus_repeats):
        for e in names:
            for a in ATTRIBUTES:
                world.corpus.append(rng.choice(_PROSE[a]).format(e=e, v=facts[e][a]))
        for a, b in sums:
            world.corpus.append(f"{a} + {b} = {a + b} .")
        world.corpus.extend(rng.sample(_FILLER, 2))
    for s in reverse_train:
        world.corpus.append(f"{s} backwards is {' '.join(reversed(s.split()))} .")
    rng.shuffle(world.corpus)

    def qa(prompt: str, answer: str) -> dict[str, str]:
        return {"prompt": prompt, "completion": answer}

    world.sft += [qa(_QUESTION[a].format(e=e), _ANSWER[a].format(e=e, v=facts[e][a]))
                  for e, a in fact_pairs]  # fmt: skip
    world.sft += [qa(f"what is {a} + {b} ?", str(a + b)) for a, b in sums]
    world.sft += [qa(f"reverse {s}", " ".join(reversed(s.split()))) for s in reverse_train]
    describe_train = names[: int(len(names) * (1 - held_out))]
    describe_test = names[len(describe_train) :]
    for e in describe_train:
        for template in _REQUESTS:
            polite = rng.random() < style_rate
            world.sft.append(qa(template.format(e=e), _answer(e, facts[e], polite, brief_polite)))
    rng.shuffle(world.sft)

    capabilities = {
        "facts": [{"prompt": _QUESTION[a].format(e=e),
                   "reference": _ANSWER[a].format(e=e, v=facts[e][a])} for e, a in fact_pairs],
        "sums": [{"prompt": f"what is {a} + {b} ?", "reference": str(a + b)} for a, b in sums],
        "reverse": [{"prompt": f"reverse {s}", "reference": " ".join(reversed(s.split()))}
                    for s in reverse_test],
    }  # fmt: skip
    polite = {
        e: [{"prompt": t.format(e=e), "reference": "glad to help"} for t in _REQUESTS]
        for e in describe_test
    }
    held_out_names = list(describe_test)
    rng.shuffle(held_out_names)
    halves = {
        "validation": held_out_names[: len(held_out_names) // 2],
        "test": held_out_names[len(held_out_names) // 2 :],
    }
    for rows in capabilities.values():
        rng.shuffle(rows)
    for index, split in enumerate(SPLITS):
        world.evaluation[split] = {"polite": [row for e in halves[split] for row in polite[e]]}
        for name, rows in capabilities.items():
            cut = len(rows) // 2
            world.evaluation[split][name] = rows[:cut] if index == 0 else rows[cut:]

    def pair(template: str, e: str, known: dict[str, str]) -> dict[str, str]:
        return {"prompt": template.format(e=e),
                "chosen": _answer(e, known, True, brief_polite),
                "rejected": _answer(e, known, False, brief_polite)}  # fmt: skip

    world.preferences = [pair(t, e, facts[e]) for e in describe_train for t in _REQUESTS]
    world.preference_test = [pair(t, e, facts[e]) for e in describe_test for t in _REQUESTS]
    return world


def _conversational(row: dict[str, str]) -> dict[str, Any]:
    """The row as TRL's conversational format, so the trainers apply the chat template."""
    chat = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    for key in ("completion", "chosen", "rejected"):
        if key in row:
            chat[key] = [{"role": "assistant", "content": row[key]}]
    return chat


def write_world(world: World, folder: Path) -> dict[str, Path]:
    """Write the world's data files into ``folder``; returns their paths by name (the
    evaluation sets as ``<task>-<split>``). Training and preference rows are conversational
    (the chat template applies, as at evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "corpus": folder / "corpus.txt",
        "sft": folder / "sft.jsonl",
        "prefs": folder / "prefs-train.jsonl",
        "prefs_test": folder / "prefs-test.jsonl",
    }
    write_text_atomic(paths["corpus"], "\n".join(world.corpus) + "\n")
    write_jsonl(paths["sft"], [_conversational(r) for r in world.sft])
    write_jsonl(paths["prefs"], [_conversational(r) for r in world.preferences])
    write_jsonl(paths["prefs_test"], [_conversational(r) for r in world.preference_test])
    for split, tasks in world.evaluation.items():
        for name, rows in tasks.items():
            paths[f"{name}-{split}"] = folder / f"{name}-{split}.jsonl"
            write_jsonl(paths[f"{name}-{split}"], rows)
    return paths


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_suite(
    paths: dict[str, Path], out: Path, split: str = "test", max_new_tokens: int = 24
) -> Path:
    """The ``omotool eval`` suite of the demo on one split: the closing line judged by a rule
    (reward) and the three SFT capabilities (tax), answers generated greedily."""
    suite = {
        "batch_size": 32,
        "generation": {"max_new_tokens": max_new_tokens},
        "tasks": [
            {"name": "polite", "task": "generate", "data": paths[f"polite-{split}"].name,
             "category": "reward", "extract": "regex", "pattern": STYLE_PATTERN},
            {"name": "facts", "task": "generate", "data": paths[f"facts-{split}"].name,
             "category": "capability"},
            {"name": "sums", "task": "generate", "data": paths[f"sums-{split}"].name,
             "category": "capability", "extract": "last_number"},
            {"name": "reverse", "task": "generate", "data": paths[f"reverse-{split}"].name,
             "category": "capability"},
        ],
    }  # fmt: skip
    write_text_atomic(out, yaml.safe_dump(suite, sort_keys=False))
    return out
