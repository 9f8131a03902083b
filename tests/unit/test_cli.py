"""The CLI shell: subcommands, version, usage errors, help kept in step with the configs."""

from __future__ import annotations

import dataclasses
import re

import pytest

from omotool import __version__
from omotool.delta import DeltaConfig
from omotool.errors import UsageError
from omotool.merging import SPARSIFIERS


def test_help_lists_every_subcommand(cli) -> None:
    out = cli("--help").output
    for name in ("delta", "train", "merge-offline", "eval", "demo"):
        assert name in out
    assert "--install-completion" in out


def test_version(cli) -> None:
    assert cli("--version").output.strip() == f"omotool {__version__}"


def test_demo_refuses_a_folder_it_did_not_make(cli, tmp_path) -> None:
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "mine.txt").write_text("keep")
    result = cli("demo", "--fast", "--workdir", str(tmp_path), expect=1)
    assert "holds files the demo did not make" in result.output
    assert (tmp_path / "sft" / "mine.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli("demo", "--workdir", str(tmp_path / "file"), expect=1).output


def test_demo_rejects_zero_seeds(cli, tmp_path) -> None:
    result = cli("demo", "--seeds", "0", "--workdir", str(tmp_path / "d"), expect=2)
    assert "--seeds" in result.output
    assert not (tmp_path / "d").exists()


def test_delta_help_defaults_match_config_and_registry(cli) -> None:
    text = " ".join(cli("delta", "--help").output.split())
    for name in SPARSIFIERS.names():
        assert name in text
    for field in dataclasses.fields(DeltaConfig):
        if field.default in (dataclasses.MISSING, None, False):
            continue
        option = "--" + field.name.replace("_", "-")
        pattern = re.escape(option) + r".*?\[default: ([^\]]+)\]"
        shown = re.search(pattern, text)
        assert shown and shown.group(1).strip() == str(field.default), option


def test_merge_offline_help_defaults_match_config_and_registry(cli) -> None:
    from omotool.merge_offline import MergeConfig
    from omotool.merging.methods import MERGE_METHODS

    text = " ".join(cli("merge-offline", "--help").output.split())
    for name in MERGE_METHODS.names():
        assert name in text
    for field in dataclasses.fields(MergeConfig):
        if field.default in (dataclasses.MISSING, None, False):
            continue
        option = "--" + field.name.replace("_", "-")
        shown = re.search(re.escape(option) + r".*?\[default: ([^\]]+)\]", text)
        assert shown and shown.group(1).strip() == str(field.default), option


def test_train_help_defaults_match_config_and_registry(cli) -> None:
    from omotool.cli import app
    from omotool.train.algorithms import ALGORITHMS
    from omotool.train.runner import MERGES, TrainConfig

    wide = cli.runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})  # no "…" names
    text = " ".join(wide.output.replace("│", " ").split())
    for name in [*ALGORITHMS.names(), *MERGES]:
        assert name in text
    for field in dataclasses.fields(TrainConfig):
        if field.default in (dataclasses.MISSING, None, False, ""):
            continue
        option = "--" + field.name.replace("_", "-")
        shown = re.search(re.escape(option) + r"\s.*?\[default: ([^\]]+)\]", text)
        assert shown and shown.group(1).strip() == str(field.default), option


def test_set_overrides_are_read_as_yaml() -> None:
    from omotool.config import parse_overrides

    assert parse_overrides(["lr=5e-7", "merge=ties", "max-steps=10", "bf16=true"]) == {
        "lr": "5e-7", "merge": "ties", "max_steps": 10, "bf16": True,
    }  # fmt: skip
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_overrides(["lr"])


def test_unknown_option_is_usage_error(cli) -> None:
    assert cli("delta", "a", "b", "--bogus", expect=2).exit_code == 2


def test_public_api_is_reexported_lazily() -> None:
    import subprocess
    import sys

    import omotool

    assert omotool.compute_delta.__module__ == "omotool.delta"
    assert omotool.ModelReader.__module__ == "omotool.io.reader"
    assert omotool.OnlineMergingAdamW.__module__ == "omotool.optim.online_merging"
    assert omotool.run_merge.__module__ == "omotool.merge_offline"
    code = "import sys, omotool.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # --help does not pay for importing torch
