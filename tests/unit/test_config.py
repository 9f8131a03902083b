"""Recipes and configs: sizes, YAML loading, key validation, type checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from omotool.config import build_config, load_recipe, parse_size
from omotool.delta import DeltaConfig
from omotool.errors import InputError, UsageError

RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5kb", 1500),
        (1024, 1024),
    ],
)
def test_parse_size(text, size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "5XB", "0", "-1GB", ""])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_recipe_keys_with_dashes_and_overrides(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: a\nsft: b\nout: c\nshard-size: 1GB\ndensity: 1\n")
    config = build_config(DeltaConfig, load_recipe(recipe), {"seed": 5})
    assert config == DeltaConfig(base="a", sft="b", out="c", shard_size="1GB", seed=5)
    assert isinstance(config.density, float)


def test_unknown_key_suggests(tmp_path) -> None:
    with pytest.raises(UsageError, match="Did you mean 'density'"):
        build_config(DeltaConfig, {"base": "a", "sft": "b", "out": "c", "densty": 0.5}, {})


def test_wrong_type_names_option() -> None:
    with pytest.raises(UsageError, match="'seed' must be int"):
        build_config(DeltaConfig, {"base": "a", "sft": "b", "out": "c", "seed": "x"}, {})


def test_bad_yaml_and_non_mapping(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(InputError, match="cannot be read"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_validates(recipe: Path) -> None:
    from omotool.merge_offline import MergeConfig
    from omotool.train.runner import TrainConfig

    if recipe.parent.name == "eval":  # an evaluation suite: its data is checked as it loads
        from omotool.eval.suite import load_suite

        assert load_suite(recipe).tasks
        return
    kinds = {"delta": DeltaConfig, "merge": MergeConfig, "train": TrainConfig}
    config_cls = kinds[recipe.parent.name]
    values = load_recipe(recipe)
    required = {
        f.name: "x"
        for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    build_config(config_cls, {**required, **values}, {}).validate()


def test_recipes_exist() -> None:
    assert RECIPES, "recipes/ ships at least one recipe"


def test_none_is_read_as_unset_only_where_the_option_is_not_text() -> None:
    import dataclasses as dc

    @dc.dataclass
    class Config:
        clip: float | None = 1.0
        rescale: str | None = None

    config = build_config(Config, {"clip": "none", "rescale": "none"}, {})
    assert config == Config(clip=None, rescale="none")
    with pytest.raises(UsageError, match="'clip' must be float or NoneType"):
        build_config(Config, {"clip": "off"}, {})


def test_declared_bounds_and_choices_are_checked() -> None:
    from omotool.config import Option, above, at_least, check_declared, declare, within

    assert (above(0).describe(False), at_least(0).describe(True)) == ("> 0", ">= 0")
    assert at_least(2, "pairs").describe(True) == "at least 2 (pairs)"
    assert within("[0, 0.5)").describe(False) == "in [0, 0.5)"

    @dataclasses.dataclass
    class Config:
        p: float = declare(0.5, Option("p", bounds=within("(0, 1]", "kept")))
        mode: str = declare("a", Option("mode", choices=("a", "b")))

    check_declared(Config())
    with pytest.raises(UsageError, match=r"^--p must be in \(0, 1\] \(kept\)\.$"):
        check_declared(Config(p=0.0))
    with pytest.raises(UsageError, match="^--mode 'c': choose one of a, b.$"):
        check_declared(Config(mode="c"))


def test_a_mapping_option_takes_a_mapping_or_key_value_texts() -> None:
    from omotool.config import parse_mapping

    assert parse_mapping("trl", None) == {}
    assert parse_mapping("trl", {"a": 1}) == {"a": 1}
    assert parse_mapping("trl", "a=1") == {"a": 1}
    assert parse_mapping("trl", ["a=0.5", "b={c: [1, 2]}", {"d": True}, "e="]) == {
        "a": 0.5, "b": {"c": [1, 2]}, "d": True, "e": None,
    }  # fmt: skip
    assert parse_mapping("trl", ["a=x=y", "b={not yaml"]) == {"a": "x=y", "b": "{not yaml"}
    with pytest.raises(UsageError, match=r"--trl 'a': write KEY=VALUE"):
        parse_mapping("trl", ["a"])
    with pytest.raises(UsageError, match=r"option 'trl' must be a mapping, got 3"):
        parse_mapping("trl", 3)


def test_a_mapping_option_in_the_recipe_and_the_overrides_is_merged() -> None:
    from omotool.config import Option, declare

    @dataclasses.dataclass
    class Config:
        extra: dict[str, Any] = declare({}, Option("Extra fields."))

    merged = build_config(Config, {"extra": {"a": 1, "b": 2}}, {"extra": ["b=3", "c=4"]})
    assert merged.extra == {"a": 1, "b": 3, "c": 4}
    assert Config().extra == {} and Config().extra is not Config().extra
