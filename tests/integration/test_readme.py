"""The README's "your own model in three commands" runs as written, on the quickstart's models.

The commands are read from the README's fenced block, so the README and this test cannot drift:
nothing is substituted. They run in a scratch folder that holds a copy of ``recipes/`` and the
tiny models ``make quickstart`` writes (``scripts/make_tiny_models.py``), so every relative path
of the block means there what it means in a checkout.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Your own model in three commands"


def walkthrough_commands(readme: str) -> list[list[str]]:
    """The commands of the first ```bash block under ``SECTION``, continuation lines joined."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, f"README has no ```bash block under {SECTION!r}"
    text = block.group(1).replace("\\\n", " ")
    lines = [line.split(" #", 1)[0].strip() for line in text.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_the_block_is_delta_train_eval() -> None:
    commands = walkthrough_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [c[:2] for c in commands] == [
        ["omotool", "delta"],
        ["omotool", "train"],
        ["omotool", "eval"],
    ]


@pytest.mark.slow  # three commands on real (tiny) models: about a minute
def test_readme_walkthrough_runs(tmp_path, monkeypatch, cli) -> None:
    commands = walkthrough_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "runs/quickstart"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert made.returncode == 0, made.stderr
    monkeypatch.chdir(tmp_path)
    for command in commands:
        cli(*command[1:])
    delta, train, evaluate = commands
    tau = tmp_path / _option(delta, "-o")
    assert json.loads((tau / "omotool.json").read_text())["sft"]
    trained = tmp_path / _option(train, "-o")
    assert (trained / "config.json").exists() and (trained / "metrics.jsonl").exists()
    report_dir = tmp_path / _option(evaluate, "-o")
    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "report.md").exists()
    evaluated = list(itertools.takewhile(lambda a: not a.startswith("-"), evaluate[2:]))
    assert [m["path"] for m in report["models"]] == evaluated
    for model in report["models"]:
        for name, task in model["tasks"].items():
            assert not task["failed"], (model["path"], name)
            headline = {"preference": "reward_accuracy", "generate": "accuracy"}[task["task"]]
            assert 0.0 <= task["scores"][headline]["value"] <= 1.0, (model["path"], name)
        assert {"reward", "capability", "overall"} <= set(model["averages"])


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]
