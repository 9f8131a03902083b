"""``omotool train``'s merge options are the optimizer's (``omotool.optim.options``): every
declared merge option is a train option (flag, recipe key) with the same default, type,
values and readers, range-checked, and handed to ``OnlineMergingAdamW`` under its name."""

from __future__ import annotations

import inspect
import typing

import pytest
import typer.main

from omotool.config import build_config, declared, default_of, flag
from omotool.errors import UsageError
from omotool.optim.options import MergeFields
from omotool.train.arguments import TrainConfig, optimizer_options
from omotool.train.options import MERGE, TrainOptions, train_options

DECLARED = declared(MergeFields)
REQUIRED = {"model": "m", "dataset": "d", "out": "o", "base": "b"}


def train_name(name: str) -> str:
    """The train option that sets merge option ``name`` (``--merge`` sets ``method``)."""
    found = [o for o, d in train_options().items() if d.optim == name]
    assert len(found) == 1, f"TrainOptions lacks `{name}: ... = _merge_option({name!r})`"
    return found[0]


@pytest.mark.parametrize("name", list(DECLARED))
def test_every_merge_option_is_a_train_option_as_declared(name) -> None:
    option, train = DECLARED[name], train_options()[train_name(name)]
    for detail in ("choices", "bounds", "merges", "does", "none"):
        assert getattr(train, detail) == getattr(option, detail), detail
    if train.panel == MERGE:  # (--seed, in the Run panel, also seeds training: its own help)
        assert train.help == option.help
    assert default_of(TrainOptions, train_name(name)) == default_of(MergeFields, name)
    hints = typing.get_type_hints(TrainOptions), typing.get_type_hints(MergeFields)
    assert hints[0][train_name(name)] == hints[1][name]


def test_every_merge_option_is_a_flag_and_a_recipe_key() -> None:
    from omotool.cli import app

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    flags = {f for p in command.params for f in p.opts}
    for name in DECLARED:
        assert flag(train_name(name)) in flags
        value = default_of(MergeFields, name)
        config = build_config(TrainConfig, {**REQUIRED, train_name(name): value}, {})
        assert getattr(config, train_name(name)) == value


@pytest.mark.parametrize("name", [n for n, o in DECLARED.items() if o.bounds or o.choices])
def test_every_merge_option_is_range_checked(name) -> None:
    option = DECLARED[name]
    bad: object = "no-such-choice"
    if option.bounds is not None:  # below the low end (each declared bound has one)
        low = type(default_of(MergeFields, name))(option.bounds.low)
        bad = low if option.bounds.low_open else low - 1
    config = TrainConfig(**{**REQUIRED, train_name(name): bad})
    refusal = f"^{flag(train_name(name))}( 'no-such-choice':)? (must be|choose one of) "
    with pytest.raises(UsageError, match=refusal):
        config.validate()


def test_every_merge_option_reaches_the_optimizer_under_its_name() -> None:
    from omotool.optim import OnlineMergingAdamW

    given = optimizer_options(TrainConfig(**REQUIRED))
    keywords = inspect.signature(OnlineMergingAdamW).parameters
    for name in DECLARED:
        assert name in keywords and given[name] == default_of(MergeFields, name)


def test_batch_size_help_says_online_algorithms_count_completions() -> None:
    """TRL's ``per_device_train_batch_size`` counts completions for GRPO and RLOO, not prompts."""
    help = train_options()["batch_size"].help
    assert "completions" in help and "--num-generations" in help
    assert "--resume" in train_options()["save_steps"].help
