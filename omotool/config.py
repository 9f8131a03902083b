"""Recipes (YAML) ↔ command configs (dataclasses), validated before any model is loaded.

A recipe's keys are exactly the command's option names (``shard-size`` or ``shard_size``);
options given on the command line override the recipe; the resolved config is saved with
every output.

A config field may be declared with an ``Option`` (``declare``): its help, help panel,
command-line names, allowed values and range. From that one declaration come the command's
parameters (``command_options``), the recipe keys (the fields) and the checks
(``check_declared``), so adding an option is adding a field.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
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


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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
        overrides[key.strip().replace("-", "_")] = _yaml_value(value)
    return overrides


def parse_mapping(key: str, value: Any) -> dict[str, Any]:
    """The value of mapping option ``key``: a mapping, or ``KEY=VALUE`` texts (one, or a list,
    as a repeated flag gives; a list may also hold one-key mappings), values read as YAML;
    None (an empty YAML value) is the empty mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise UsageError(f"option {key.replace('_', '-')!r} must be a mapping, got {value!r}.")
    mapping: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dict):
            mapping.update(parse_mapping(key, item))
            continue
        name, sep, text = str(item).partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{flag(key)} {item!r}: write KEY=VALUE, e.g. {flag(key)} name=1.")
        mapping[name.strip()] = _yaml_value(text)
    return mapping


def _yaml_value(text: str) -> Any:
    """``text`` read as YAML (``5e-7``, ``true``, ``{a: 1}``); as itself if it is not YAML;
    None if blank."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def build_config(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any]) -> C:
    """``cls(**(recipe | overrides))`` with unknown keys and wrong types reported by name; a
    mapping option (``dict``) given in both is merged, the overrides' keys winning."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    recipe = {key.replace("-", "_"): value for key, value in recipe.items()}
    overrides = {key.replace("-", "_"): value for key, value in overrides.items()}
    values = {**recipe, **overrides}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise UsageError(f"unknown option {key.replace('_', '-')!r} in recipe.{hint}")
    coerced = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    for key in recipe.keys() & overrides.keys():
        if _is_mapping(hints[key]):
            coerced[key] = {**_coerce(key, recipe[key], hints[key]), **coerced[key]}
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
    options = union_members(hint)
    if value is None and type(None) in options:
        return None
    if type(None) in options and str not in options and str(value).lower() in ("none", "null"):
        return None  # e.g. --tau-clip none
    for option in options:
        if _is_mapping(option):
            return parse_mapping(key, value)
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
        if option is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-7 (no dot) as a string
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise UsageError(f"option {key.replace('_', '-')!r} must be {names}, got {value!r}.")


def union_members(hint: Any) -> tuple[Any, ...]:
    """The types a hint allows: a union's members (``float | None``: float, NoneType), or the
    hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_mapping(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


# -- declared options --------------------------------------------------------------------------
OPTION = "option"  # the dataclasses.field metadata key of a declared option


@dataclass(frozen=True)
class Bounds:
    """The values an option takes: ``low`` to ``high``, either end open or absent; ``note``
    says why (shown in the refusal)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self, integer: bool) -> str:
        """``> 0``, ``>= 0``, ``at least 1`` (integers), ``in (0, 1]``, and the note."""
        if self.high is None:
            if self.low_open:
                text = f"> {self.low:g}"
            else:
                text = f"at least {self.low:g}" if integer and self.low >= 1 else f">= {self.low:g}"
        else:
            text = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")  # fmt: skip
        return f"{text} ({self.note})" if self.note else text


def above(low: float, note: str = "") -> Bounds:
    return Bounds(low, low_open=True, note=note)


def at_least(low: float, note: str = "") -> Bounds:
    return Bounds(low, note=note)


def within(interval: str, note: str = "") -> Bounds:
    """``within("(0, 1]")``: the interval as written in a message."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    return Bounds(low, high, interval[0] == "(", interval[-1] == ")", note)


@dataclass(frozen=True)
class Option:
    """How one config field is an option: its help text and panel in ``--help``, its names on
    the command line (``--field-name`` unless ``flags``), the values it takes (``choices``: a
    tuple, or ``"module:NAME"`` of a tuple or ``Registry``, imported when checked) and its
    range (``bounds``). ``none`` (for a field that may be None but defaults to a value) says
    what ``none`` on the command line means."""

    help: str
    panel: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] | str = ()
    bounds: Bounds | None = None
    none: str = ""

    def allowed(self) -> Any:
        """The choices (a tuple, or a ``Registry`` whose ``get`` explains an unknown name)."""
        if not isinstance(self.choices, str):
            return self.choices
        module, name = self.choices.split(":")
        return getattr(importlib.import_module(module), name)

    def help_default(self, name: str, default: Any) -> str | None:
        """A default only known when ``--help`` is shown (``[default: ...]``), or None."""
        return None


def declare(default: Any, option: Option) -> Any:
    """A dataclass field declared as ``option`` (a list or dict default becomes a factory)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default.copy(), metadata={OPTION: option})
    return dataclasses.field(default=default, metadata={OPTION: option})


def declared(cls: Any) -> dict[str, Option]:
    """The declared options of a config class (or instance), by field name, in order."""
    return {f.name: f.metadata[OPTION] for f in dataclasses.fields(cls) if OPTION in f.metadata}


def flag(name: str) -> str:
    """The command-line name of option ``name``: ``reserve_p`` → ``--reserve-p``."""
    return "--" + name.replace("_", "-")


def default_of(cls: Any, name: str) -> Any:
    """The default value of field ``name`` of a config class."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def check_declared(config: Any, keywords: bool = False) -> None:
    """Refuse a value outside its option's ``choices`` or ``bounds`` (None is always unset),
    naming the option by its flag (``--reserve-p must be in (0, 1] ...``) or, for the keyword
    arguments of a library call (``keywords``), as given (``reserve_p=0.0 must be ...``)."""
    for name, option in declared(config).items():
        value = getattr(config, name)
        if value is None:
            continue
        allowed = option.allowed() if option.choices else None
        given = f"{name}={value!r}" if keywords else f"{flag(name)} {value!r}"
        if hasattr(allowed, "get"):  # a Registry: its own message names close matches
            allowed.get(value)
        elif allowed and value not in allowed:
            raise UsageError(f"{given}: choose one of {', '.join(allowed)}.")
        if option.bounds is not None and not option.bounds.holds(value):
            integer = isinstance(value, int)
            named = f"{name}={value!r}" if keywords else flag(name)
            raise UsageError(f"{named} must be {option.bounds.describe(integer)}.")


def check_types(config: Any) -> None:
    """Refuse a field whose value is not of its declared type (``int``, ``float``, ``str``,
    ``bool``, or one of those or None): for configs built from keyword arguments, which
    ``build_config`` does not convert. A float field takes an int; bool is no number."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if name not in declared(config):
            continue
        kinds = union_members(hint)
        value = getattr(config, name)
        if not all(kind in (int, float, str, bool, type(None)) for kind in kinds):
            continue  # lists and others: not checked here
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (
            (value is None and type(None) in kinds)
            or (isinstance(value, bool) and bool in kinds)
            or (number and isinstance(value, int) and int in kinds)
            or (number and float in kinds)
            or (isinstance(value, str) and str in kinds)
        ):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise UsageError(f"{name} must be {names}, got {value!r}.")


def command_options(cls: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a Typer command taking ``**options`` with one parameter per declared option
    of ``cls`` (its signature is rewritten; Typer reads the signature). The values reach the
    command through ``ctx.params``."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*fixed, *command_parameters(cls)]
        )
        return command

    return add


def command_parameters(cls: Any) -> list[inspect.Parameter]:
    """``typer.Option`` parameters for the declared options of ``cls``: name, type, default,
    help and panel from the declaration."""
    import typer
    from rich.markup import escape

    hints = typing.get_type_hints(cls)
    parameters = []
    for name, option in declared(cls).items():
        default = default_of(cls, name)
        kind, metavar = _command_line_type(hints[name], option)
        # (escaped: "[default: ...]" in a help text is text, not rich markup)
        info = typer.Option(
            default,
            *option.flags,
            metavar=metavar,
            help=escape(option.help + (f" none: {option.none}." if option.none else "")),
            rich_help_panel=option.panel,
            show_default=not (default is None or default is False or default in ("", [], {})),
        )
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind
            )
        )  # fmt: skip
    return parameters


def _command_line_type(hint: Any, option: Option) -> tuple[Any, str | None]:
    """The type Typer parses and the metavar shown: lists of numbers and options that take
    ``none`` are read as text (``build_config`` converts them), everything else as declared."""
    options = [o for o in union_members(hint) if o is not type(None)]
    if option.none:
        return str, f"<{options[0].__name__}|none>"
    if any(_is_mapping(item) for item in options):  # a repeated KEY=VALUE (parse_mapping)
        return list[str], "KEY=VALUE"
    for item in options:
        if typing.get_origin(item) is list and typing.get_args(item) != (str,):
            return str | None, f"<{typing.get_args(item)[0].__name__},...>"  # "0.5,1"
    return hint, None


def declared_help(command_class: type, cls: Any) -> type:
    """``command_class`` (a Typer command class) whose ``--help`` fits 80 columns and shows
    what is known only then: a boolean's ``--no-...`` form is named in its help text, not in
    a column of its own (two long names side by side leave the help no room), and the defaults
    of ``cls``'s options known only then are added (``Option.help_default``: e.g. TRL's, which
    would otherwise be imported on every run)."""
    from rich.markup import escape

    class DeclaredHelp(command_class):  # type: ignore[misc, valid-type]
        def format_help(self, ctx: Any, formatter: Any) -> None:
            options = {} if getattr(self, "_shown", False) else declared(cls)
            self._shown = True  # (the params are changed in place: once)
            for param in self.params:
                option = options.get(param.name or "")
                late = option.help_default(param.name, param.default) if option else None
                if late is not None:
                    param.help = f"{param.help} {escape(f'[default: {late}]')}"
                if option is not None and param.secondary_opts:
                    param.help = f"{param.help} {escape(f'[off: {param.secondary_opts[0]}]')}"
                    param.secondary_opts = []
            super().format_help(ctx, formatter)

    return DeclaredHelp
