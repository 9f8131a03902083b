"""Recipes (YAML) ↔ command configs (dataclasses), validated before any model is loaded.

A recipe's keys are exactly the command's option names (``shard-size`` or ``shard_size``);
options given on the command line override the recipe; the resolved config is saved with
every output.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from omotool.errors import InputError, UsageError

C = TypeVar("C")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"`` (10⁹, as transformers), ``"512MiB"`` (2²⁰) or a plain integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise UsageError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or 2GiB.")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive.")
    return size


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML recipe, keys normalised to ``snake_case``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: recipe cannot be read ({exc.strerror or exc}).") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc}).") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe must be a mapping of option names to values.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=5e-7", "merge=ties"]`` → ``{"lr": 5e-7, "merge": "ties"}`` (values read as YAML)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: write KEY=VALUE, e.g. --set lr=5e-7.")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        overrides[key.strip().replace("-", "_")] = parsed
    return overrides


def build_config(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any]) -> C:
    """``cls(**(recipe | overrides))`` with unknown keys and wrong types reported by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values = {**recipe, **overrides}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise UsageError(f"unknown option {key.replace('_', '-')!r} in recipe.{hint}")
    coerced = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in coerced
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UsageError(
            f"missing required option(s): {', '.join(m.replace('_', '-') for m in missing)}."
        )
    return cls(**coerced)


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass (paths as strings)."""
    return {
        key: (str(v) if isinstance(v, Path) else v) for key, v in dataclasses.asdict(config).items()
    }


def _coerce(key: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is list:  # a YAML list, or "a,b" / one value as text
            (item,) = typing.get_args(option)
            if isinstance(value, str) and item is not str:
                value = [part for part in value.split(",") if part.strip()]
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_coerce(key, v, item) for v in items]
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-7 (no dot) as a string
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise UsageError(f"option {key.replace('_', '-')!r} must be {names}, got {value!r}.")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
