"""``--trl KEY=VALUE``: any other field of the chosen algorithm's TRL config, set as given.

``trl_passthrough`` checks each field before anything loads and returns its value converted
to the field's declared type (read from the TRL config dataclass: bool, int, float, str,
Literal, list, dict, a union of those). Refused, by name: a field the config class lacks (with
close matches), a field an omotool option sets (``options.trl_owner``: use the option), a
field the algorithm fixes (its loss), and the fields in ``REFUSED``, which would do nothing or
undo what omotool sets up. ``arguments.trl_arguments`` applies the rest after omotool's own
values, which they therefore cannot change.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import re
import typing
import warnings
from typing import Any

from omotool.config import FLOAT_TEXT, flag, parse_mapping, union_members
from omotool.errors import UsageError
from omotool.train.algorithms import ALGORITHMS
from omotool.train.options import trl_owner

_OPTIMIZER = "the optimizer is omotool's OnlineMergingAdamW (set it with --merge, --lr, ...)"
# Fields no --trl may set: field → why (and the option to use instead, if any).
REFUSED = {
    "optim": _OPTIMIZER,
    "optim_args": _OPTIMIZER,
    "optim_target_modules": _OPTIMIZER,
    "output_dir": "the run folder is -o/--out: use -o/--out",
    "overwrite_output_dir": "use --overwrite",
    "resume_from_checkpoint": "use --resume (it checks the run's settings)",
    "save_only_model": "--resume needs the optimizer state each checkpoint holds",
    "use_cpu": "omotool runs on the accelerator when there is one, else on the CPUs",
    "disable_tqdm": "omotool shows its own progress",
    "dataloader_pin_memory": "omotool pins memory only where it helps",
    "hub_token": "it would be saved in the run's config: log in with `hf auth login` instead",
    "local_rank": "the launcher (torchrun, accelerate) sets it",
    "do_train": "the trainer does not read it",
    "do_eval": "the trainer does not read it (--eval-dataset evaluates)",
    "do_predict": "the trainer does not read it",
}


def trl_passthrough(algo: str, given: Any) -> dict[str, Any]:
    """The ``--trl`` fields ``given`` (a mapping, or ``KEY=VALUE`` texts) for ``--algo algo``,
    each checked and converted to its field's type; a refused field is a ``UsageError``."""
    algorithm = ALGORITHMS.get(algo)
    with warnings.catch_warnings():  # trl.experimental announces itself
        warnings.simplefilter("ignore")
        config_class = algorithm.config_class()
    fields = [f.name for f in dataclasses.fields(config_class) if f.init]
    values: dict[str, Any] = {}
    for key, value in parse_mapping("trl", given).items():
        name = key.replace("-", "_")
        if name in REFUSED:
            raise UsageError(f"--trl {name}: {REFUSED[name]}.")
        if name not in fields:
            import trl

            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(
                f"--trl {name}: TRL {trl.__version__}'s {config_class.__name__} (--algo {algo}) "
                f"has no field {name}.{hint}"
            )
        if name in algorithm.settings:
            raise UsageError(
                f"--trl {name}: --algo {algo} sets {name} to {algorithm.settings[name]!r} (that "
                f"is what makes it {algo}); for another {name}, choose another --algo."
            )
        owner = trl_owner(name)
        if owner is not None:
            raise UsageError(
                f"--trl {name}: omotool sets {name} from {flag(owner)}; use {flag(owner)} "
                f"instead of --trl {name}=..."
            )
        values[name] = field_value(config_class, name, value)
    return values


def field_value(config_class: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``config_class`` takes it: as is where its type holds it
    (the first of a union's types that does), else converted (an int to a float, a number to a
    text, digits to an int, one item to a list, ``none`` to None where it may be None); a
    ``UsageError`` naming the field, its type and the value otherwise."""
    hint = _field_types(config_class).get(name, Any)
    converted = _convert(value, hint)
    if converted is _MISMATCH:
        texts = str in (union_members(hint))
        quote = " (quote it to pass a text)" if texts and value is not None else ""
        raise UsageError(
            f"--trl {name}: {config_class.__name__}.{name} is {_type_name(hint)}, got "
            f"{value!r}{quote}."
        )
    return converted


_MISMATCH = object()


@functools.cache
def _field_types(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # an annotation that cannot be resolved here: its text, taken as Any
        return {f.name: f.type for f in dataclasses.fields(config_class)}


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as one of ``hint``'s types: first as is (strict), then converted."""
    if hint is Any or isinstance(hint, str):
        return value
    kinds = union_members(hint)
    if type(None) in kinds and str not in kinds and str(value).lower() in ("none", "null"):
        return None  # e.g. --trl steps_per_generation=none
    for strict in (True, False):
        for kind in kinds:
            converted = _as(value, kind, strict)
            if converted is not _MISMATCH:
                return converted
    return _MISMATCH


def _as(value: Any, kind: Any, strict: bool) -> Any:
    origin = typing.get_origin(kind)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is Any:
        return value
    if kind is None or kind is type(None):
        return None if value is None else _MISMATCH
    if origin is typing.Literal:  # (type compared too: False == 0)
        held = any(type(value) is type(c) and value == c for c in typing.get_args(kind))
        return value if held else _MISMATCH
    if kind in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list):
            if strict or value is None:
                return _MISMATCH
            value = [value]
        item = (typing.get_args(kind) or (Any,))[0]
        items = [_convert(v, item) for v in value]
        return _MISMATCH if any(v is _MISMATCH for v in items) else items
    if kind is dict or origin is dict:
        return dict(value) if isinstance(value, dict) else _MISMATCH
    if kind is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if kind is int:
        if number and isinstance(value, int):
            return value
        if not strict and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        return _MISMATCH
    if kind is float:
        if isinstance(value, float) or (number and not strict):
            return float(value)
        if not strict and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-7 (no dot) as a text
        return _MISMATCH
    if kind is str:
        if isinstance(value, str):
            return value
        return str(value) if number and not strict else _MISMATCH
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return value if value in {member.value for member in kind} else _MISMATCH
    return _MISMATCH  # another class (e.g. ParallelismConfig): not given as text


def _type_name(hint: Any) -> str:
    """``float | None``, ``bool``, ``dict | str | None`` (module paths dropped)."""
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", text).replace("NoneType", "None")
