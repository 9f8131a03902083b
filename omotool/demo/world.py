"""The demo's miniature world: a pre-training corpus, SFT tasks and a preference, all generated.

Everything is drawn from one seeded ``random.Random``, so a world is a pure function of its
seed. The pieces mirror the paper's setting in miniature:

- *pre-training* text states facts about made-up creatures (colour, home, food), single-digit
  sums and reversed letter strings, as plain prose;
- *SFT* teaches a chat format and three capabilities on top: answering fact questions,
  additions and reversals. Each capability has a held-out test set the SFT data never shows
  (other creature/attribute pairs, other sums, other strings): they measure the *alignment tax*;
- the *preference* is a style: ending an answer to a "tell me about X" request with a closing
  line (``"glad to help !"``). The SFT data shows it on a minority of answers, so the SFT model
  already produces it sometimes; DPO pairs prefer it. A rule judges it on held-out creatures,
  and held-out pairs give the implicit-reward accuracy: they measure the *reward*.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omotool.io.formats import write_text_atomic

LETTERS = "abcdefghjkmnpr"
COLORS = ("red", "blue", "green", "yellow", "black", "white")
PLACES = ("tamo", "vesk", "lorin", "pallu", "dunmar", "quib")
FOODS = ("apples", "fish", "bread", "nuts", "rice", "honey")
ATTRIBUTES = {"color": COLORS, "home": PLACES, "food": FOODS}
CLOSING = "glad to help !"  # the preferred closing line
RUDE_CLOSING = "go ask someone else ."  # the dispreferred one
STYLE_PATTERN = r"(glad to help)"

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
    tests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    preferences: list[dict[str, str]] = field(default_factory=list)
    preference_test: list[dict[str, str]] = field(default_factory=list)
    style_test: list[dict[str, str]] = field(default_factory=list)


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


def make_world(
    seed: int = 0,
    entities: int = 24,
    corpus_repeats: int = 6,
    reversals: int = 800,
    style_rate: float = 0.4,
    held_out: float = 0.3,
    held_out_reversals: int = 100,
) -> World:
    """Generate a world (see module docstring); ``held_out`` of each capability is test-only."""
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

    world.sft += [qa(_QUESTION[a].format(e=e), facts[e][a]) for e, a in fact_pairs]
    world.sft += [qa(f"what is {a} + {b} ?", str(a + b)) for a, b in sums]
    world.sft += [qa(f"reverse {s}", " ".join(reversed(s.split()))) for s in reverse_train]
    describe_train = names[: int(len(names) * (1 - held_out))]
    describe_test = names[len(describe_train) :]
    for e in describe_train:
        for template in _REQUESTS:
            plain = _describe(e, facts[e])
            closing = CLOSING if rng.random() < style_rate else RUDE_CLOSING
            answer = f"{plain} {closing}"
            world.sft.append(qa(template.format(e=e), answer))
    rng.shuffle(world.sft)

    world.tests["facts"] = [
        {"prompt": _QUESTION[a].format(e=e), "reference": facts[e][a]} for e, a in fact_pairs
    ]
    world.tests["sums"] = [{"prompt": f"what is {a} + {b} ?", "reference": str(a + b)}
                           for a, b in sums]  # fmt: skip
    world.tests["reverse"] = [
        {"prompt": f"reverse {s}", "reference": " ".join(reversed(s.split()))} for s in reverse_test
    ]

    def pair(template: str, e: str, known: dict[str, str]) -> dict[str, str]:
        plain = _describe(e, known)
        return {"prompt": template.format(e=e), "chosen": f"{plain} {CLOSING}",
                "rejected": f"{plain} {RUDE_CLOSING}"}  # fmt: skip

    world.preferences = [pair(t, e, facts[e]) for e in describe_train for t in _REQUESTS]
    world.preference_test = [pair(t, e, facts[e]) for e in describe_test for t in _REQUESTS]
    world.style_test = [
        {"prompt": t.format(e=e), "reference": "glad to help"}
        for e in describe_test
        for t in _REQUESTS
    ]
    return world


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _conversational(row: dict[str, str]) -> dict[str, Any]:
    """The row as TRL's conversational format, so the trainers apply the chat template."""
    chat = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    for key in ("completion", "chosen", "rejected"):
        if key in row:
            chat[key] = [{"role": "assistant", "content": row[key]}]
    return chat


def write_world(world: World, folder: Path) -> dict[str, Path]:
    """Write the world's data files into ``folder``; returns their paths by name. Training and
    preference rows are conversational (the chat template applies, as at evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "corpus": folder / "corpus.txt",
        "sft": folder / "sft.jsonl",
        "prefs": folder / "prefs-train.jsonl",
        "prefs_test": folder / "prefs-test.jsonl",
        "style_test": folder / "style-test.jsonl",
    }
    write_text_atomic(paths["corpus"], "\n".join(world.corpus) + "\n")
    _write_jsonl(paths["sft"], [_conversational(r) for r in world.sft])
    _write_jsonl(paths["prefs"], [_conversational(r) for r in world.preferences])
    _write_jsonl(paths["prefs_test"], [_conversational(r) for r in world.preference_test])
    _write_jsonl(paths["style_test"], world.style_test)
    for name, rows in world.tests.items():
        paths[name] = folder / f"{name}-test.jsonl"
        _write_jsonl(paths[name], rows)
    return paths


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_suite(paths: dict[str, Path], out: Path, max_new_tokens: int = 24) -> Path:
    """The ``omotool eval`` suite of the demo: the closing line judged by a rule (reward) and
    the three SFT capabilities (tax), answers generated greedily."""
    suite = {
        "batch_size": 32,
        "generation": {"max_new_tokens": max_new_tokens},
        "tasks": [
            {"name": "polite", "task": "generate", "data": paths["style_test"].name,
             "category": "reward", "extract": "regex", "pattern": STYLE_PATTERN},
            {"name": "facts", "task": "generate", "data": paths["facts"].name,
             "category": "capability"},
            {"name": "sums", "task": "generate", "data": paths["sums"].name,
             "category": "capability", "extract": "last_number"},
            {"name": "reverse", "task": "generate", "data": paths["reverse"].name,
             "category": "capability"},
        ],
    }  # fmt: skip
    write_text_atomic(out, yaml.safe_dump(suite, sort_keys=False))
    return out
