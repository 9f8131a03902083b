"""Every online-RL command line of the docs runs as written, on tiny models.

The commands are read from README.md and docs/*.md, so a line added to the docs is tested
without touching this file: each line of a fenced code block (continuation lines joined,
comments dropped) and each inline code span that starts with ``omotool train`` (or a path to
it, ``.venv/bin/omotool train``), names ``--model`` or ``--config`` (a whole command, not a
phrase such as "`omotool train --algo grpo`") and is online RL: ``--algo grpo`` or ``rloo``,
or a ``--config`` recipe whose ``algo`` is one of them.

Each runs in a scratch folder laid out as a checkout after ``make quickstart``: a copy of
``recipes/``, the quickstart's tiny models and task vector under ``runs/quickstart/``
(``scripts/make_tiny_models.py``'s models, ``omotool delta``), so every relative path of a
command means there what it means in a checkout. The docs' placeholders are replaced by
``PLACEHOLDERS`` (whole arguments only; a placeholder no command uses, or an all-capitals
argument left unreplaced, fails ``test_the_docs_online_commands_are_found``), the stand-in
files the docs assume the reader has are ``STAND_INS``, and ``FAST`` is appended (2 steps of
completions of up to 16 tokens: flags override earlier ones and recipe keys; TRL's default of
256 tokens takes minutes a command here): nothing else is changed.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification

from omotool.config import load_recipe
from omotool.tiny_models import build_pair, build_tokenizer, model_config
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ONLINE = ("grpo", "rloo")
QUICK = "runs/quickstart"
# The docs' placeholders → what stands for them in the scratch folder.
PLACEHOLDERS = {
    "SFT": f"{QUICK}/sft",
    "BASE": f"{QUICK}/base",
    "prompts.jsonl": "recipes/data/tiny-prompts.jsonl",
}
# Files the docs' commands assume the reader has (made by ``scratch``): path → what it is.
STAND_INS = {
    "runs/tau": "the task vector of the quickstart's models (omotool delta)",
    "rewards.py": "a reward module defining format_ok (TRL's reward signature)",
    "runs/rm": "a 1-output sequence classifier (an untrained reward model)",
}
FAST = ("--max-steps", "2", "--max-completion-length", "16")
_START = re.compile(r"^(?:\S*/)?omotool train\b")


def doc_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every whole ``omotool train`` command of a Markdown ``text``:
    fenced-block lines (continuations joined, ``#`` comments dropped) and inline code spans."""
    found: list[tuple[int, list[str]]] = []
    for block in re.finditer(r"^[ \t]*```[\w-]*\n(.*?)^[ \t]*```", text, re.DOTALL | re.MULTILINE):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = [line.strip() for line in block.group(1).split("\n")]
        index = 0
        while index < len(lines):
            start, line = index, lines[index]
            while line.endswith("\\") and index + 1 < len(lines):
                index += 1
                line = line[:-1] + " " + lines[index].strip()
            index += 1
            command = line.split(" #", 1)[0].strip()
            if _START.match(command):
                found.append((first + start, shlex.split(command)))
    prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", lambda m: "\n" * m.group(0).count("\n"), text,
                   flags=re.DOTALL | re.MULTILINE)  # fmt: skip
    for span in re.finditer(r"`([^`\n]+)`", prose):
        if _START.match(span.group(1)):
            found.append((prose.count("\n", 0, span.start()) + 1, shlex.split(span.group(1))))
    return [(line, argv) for line, argv in found if {"--model", "--config"} & set(argv)]


def is_online(argv: list[str]) -> bool:
    """``--algo grpo|rloo``, or a ``--config`` recipe (of this checkout) whose algo is one."""
    if "--algo" in argv:
        return argv[argv.index("--algo") + 1] in ONLINE
    if "--config" in argv:
        recipe = ROOT / argv[argv.index("--config") + 1]
        return recipe.exists() and load_recipe(recipe).get("algo") in ONLINE
    return False


def online_commands() -> list[tuple[str, list[str]]]:
    """(``doc:line``, argv with the placeholders replaced) of each online-RL command."""
    commands = []
    for doc in DOCS:
        for line, argv in doc_commands(doc.read_text(encoding="utf-8")):
            if is_online(argv):
                where = f"{doc.relative_to(ROOT)}:{line}"
                commands.append((where, [PLACEHOLDERS.get(arg, arg) for arg in argv]))
    return commands


COMMANDS = online_commands()


def test_the_docs_online_commands_are_found() -> None:
    """The extraction finds the docs' online-RL lines, every placeholder is used, and none is
    left: an all-capitals argument would be one this test does not know."""
    assert len(COMMANDS) >= 5, COMMANDS
    assert {algo for _, argv in COMMANDS if "--algo" in argv
            for algo in [argv[argv.index("--algo") + 1]]} == set(ONLINE)  # fmt: skip
    assert any("--config" in argv for _, argv in COMMANDS)  # the tiny recipe of the README
    raw = [arg for doc in DOCS for _, argv in doc_commands(doc.read_text()) for arg in argv]
    assert set(PLACEHOLDERS) <= set(raw), set(PLACEHOLDERS) - set(raw)
    used = " ".join(arg for _, argv in COMMANDS for arg in argv)
    assert all(path in used for path in STAND_INS), [p for p in STAND_INS if p not in used]
    for where, argv in COMMANDS:
        left = [arg for arg in argv if re.fullmatch(r"[A-Z][A-Z_0-9]+", arg)]
        assert not left, f"{where}: placeholder(s) {left}: add them to PLACEHOLDERS"


def test_doc_commands_reads_blocks_and_spans() -> None:
    text = (
        "Run `omotool train --config r.yaml` or `omotool train --algo grpo` (a phrase).\n"
        "```bash\nomotool train --algo rloo --model SFT \\\n    --reward exact -o o  # note\n"
        "omotool delta a b -o c\n```\n"
    )
    assert doc_commands(text) == [
        (3, ["omotool", "train", "--algo", "rloo", "--model", "SFT", "--reward", "exact",
             "-o", "o"]),
        (1, ["omotool", "train", "--config", "r.yaml"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A checkout's layout after ``make quickstart``, with the ``STAND_INS``."""
    folder = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    base, sft = build_pair(folder / QUICK, arch="llama", hidden_size=64, layers=2)
    cli = Cli()
    cli("delta", base, sft, "-o", folder / QUICK / "tau")
    cli("delta", base, sft, "-o", folder / "runs" / "tau")
    (folder / "rewards.py").write_text(
        "def format_ok(completions, **kwargs):\n"
        "    return [float(c.strip() != '') for c in completions]\n"
    )
    config = model_config("llama")
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder / "runs" / "rm"))
    build_tokenizer(folder / "runs" / "rm")
    return folder


@pytest.mark.slow  # each: 2 steps on the tiny models, seconds
@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_a_documented_online_command_runs(scratch, monkeypatch, argv) -> None:
    monkeypatch.chdir(scratch)
    monkeypatch.syspath_prepend(str(scratch))  # (as a reader's working directory is)
    result = Cli()(*argv[1:], *FAST, expect=None)  # (argv[0]: omotool, however reached)
    assert result.exit_code == 0, (argv, result.output, result.exception)
    flags = [flag for flag in ("-o", "--out") if flag in argv]
    if flags:
        out = scratch / argv[argv.index(flags[-1]) + 1]
    else:  # the recipe's
        out = scratch / load_recipe(ROOT / argv[argv.index("--config") + 1])["out"]
    assert (out / "omotool.json").exists() and (out / "metrics.jsonl").exists()
