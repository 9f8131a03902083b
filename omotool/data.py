"""Example data for training and evaluation: read local files (or a Hub dataset), check every
row, name bad ones by file and line.

Three shapes of example, as TRL's trainers take them:

- ``preference`` (DPO, IPO, hinge, robust, SimPO, ORPO): ``prompt``/``chosen``/``rejected``, or
  ``chosen``/``rejected`` alone (conversations that carry their prompt);
- ``unpaired`` (KTO): ``prompt``/``completion``/``label`` (``label`` a boolean: desirable or
  not); a preference dataset given here is unpaired, one desirable and one undesirable example
  per pair;
- ``language_modeling`` (SFT): ``text``, ``messages``, or ``prompt``/``completion``; a preference
  dataset given here trains on ``prompt`` + ``chosen``;
- ``prompt`` (GRPO, RLOO: the trainer samples the completions): ``prompt``, plus every other
  column of the row, which the rewards read (``reference``, ``answer``, ...); the columns the
  run's rewards need must be present and not null in every row.

Each text field is either a string (standard) or a list of ``{"role", "content"}`` messages
(conversational: the tokenizer's chat template is applied by the trainer). Files are read here,
not by ``datasets``' loaders, so that a row can be named by file and line and a missing key is
an error instead of a silent ``None``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omotool.errors import InputError, UsageError

KINDS = ("preference", "unpaired", "language_modeling", "prompt")
FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "unpaired": (("prompt", "completion", "label"),),
    "language_modeling": (("messages",), ("prompt", "completion"), ("text",)),
    "prompt": (("prompt",),),
}
ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Row:
    """One example and where it came from (``file.jsonl:12``, ``file.parquet row 3``)."""

    where: str
    fields: dict[str, Any]


def describe_formats(kind: str) -> str:
    return " or ".join("/".join(fields) for fields in FIELDS[kind])


# -- reading ---------------------------------------------------------------------------------
def read_rows(source: str | Path, split: str = "train") -> Iterator[Row]:
    """The rows of a local JSONL/JSON/Parquet/CSV file, or of a hub dataset's ``split``."""
    path = Path(source)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a .jsonl, .json, .parquet or .csv file.")
    if not path.exists():
        if path.suffix.lower() in SUFFIXES or str(source).startswith((".", "/", "~")):
            raise InputError(f"data file {path} does not exist.")
        yield from _hub_rows(str(source), split)
        return
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet or .csv."
        )
    read = {"jsonl": _jsonl, "json": _json, "parquet": _parquet, "csv": _csv}[kind]
    try:
        yield from read(path)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})."
        ) from None
    except csv.Error as error:
        raise InputError(f"{path}: not a readable CSV file ({error}).") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error}).") from None


def _jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{where}: not valid JSON ({error.msg}, column {error.colno})."
                ) from None
            yield Row(where, _object(value, where))


def _json(path: Path) -> Iterator[Row]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON list of objects (or JSONL, one per line).")
    for number, item in enumerate(value):
        where = f"{path} item {number}"
        yield Row(where, _object(item, where))


def _csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if None in fields:
                raise InputError(f"{where}: more values than the header has columns.")
            yield Row(where, {key: value for key, value in fields.items() if value is not None})


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({error}).") from None
    for number, fields in enumerate(table.to_pylist()):
        yield Row(f"{path} row {number}", fields)


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, no such split: all the same to a user
        raise InputError(
            f"cannot load dataset {name!r} (split {split!r}) from the hub: {error}. "
            "Give a local .jsonl/.json/.parquet/.csv file instead."
        ) from None
    for number, fields in enumerate(dataset):
        yield Row(f"{name}[{split}] row {number}", dict(fields))


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(value).__name__}.")
    return value


# -- checking --------------------------------------------------------------------------------
def check_row(row: Row, kind: str, columns: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The row's fields for ``kind`` (see module docstring), or an InputError naming it.

    ``columns`` (``prompt`` rows): column → who reads it; each must be present and not null.
    """
    fields = row.fields
    for column, reader in (columns or {}).items():
        if fields.get(column) is None:
            state = "null" if column in fields else "missing"
            raise InputError(
                f"{row.where}: field {column!r} is {state}, but {reader} reads it (found: "
                f"{', '.join(sorted(k for k, v in fields.items() if v is not None)) or 'none'})."
            )
    for names in FIELDS[kind]:
        if all(name in fields for name in names):
            break
    else:
        if kind == "unpaired" and _has(fields, FIELDS["preference"][0]):
            names = FIELDS["preference"][0]
        elif kind == "language_modeling" and _has(fields, ("chosen",)):
            names = ("prompt", "chosen") if "prompt" in fields else ("chosen",)
        else:
            missing = [n for n in FIELDS[kind][0] if n not in fields]
            raise InputError(
                f"{row.where}: missing field {', '.join(repr(n) for n in missing)} "
                f"(found: {', '.join(sorted(fields)) or 'none'}). Accepted formats for this "
                f"algorithm: {describe_formats(kind)}."
            )
    example = {name: fields[name] for name in names}
    checked = dict(example)
    if kind == "prompt":  # the other columns go to the rewards as they are
        example = {**fields, **example}
    for name, value in checked.items():
        if name == "label":
            example[name] = _label(value, row.where)
        elif name == "messages":
            _messages(value, f"{row.where}: field 'messages'")
        else:
            _text(value, f"{row.where}: field {name!r}")
    if "chosen" in example and "rejected" in example and example["chosen"] == example["rejected"]:
        raise InputError(
            f"{row.where}: 'chosen' and 'rejected' are identical (a pair that teaches nothing: "
            "its gradient is zero). Remove or fix the row."
        )
    return example


def _has(fields: dict[str, Any], names: tuple[str, ...]) -> bool:
    return all(name in fields for name in names)


def _text(value: Any, what: str) -> None:
    if isinstance(value, list):
        _messages(value, what)
    elif not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise InputError(f"{what} is {shown}; expected a string or a list of messages.")
    elif not value.strip():
        raise InputError(f"{what} is empty.")


def _messages(value: Any, what: str) -> None:
    if not isinstance(value, list) or not value:
        raise InputError(f"{what}: expected a non-empty list of {{'role', 'content'}} messages.")
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise InputError(f"{what}, message {number}: needs 'role' and 'content'.")
        if message["role"] not in ROLES:
            raise InputError(
                f"{what}, message {number}: role {message['role']!r} is not one of "
                f"{', '.join(ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise InputError(f"{what}, message {number}: 'content' must be a string.")


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InputError(f"{where}: field 'label' is {value!r}; expected true or false.")


# -- building --------------------------------------------------------------------------------
def unpair(example: dict[str, Any]) -> list[dict[str, Any]]:
    """A preference pair as two KTO examples: chosen desirable, rejected undesirable."""
    prompt = example.get("prompt", "")
    return [
        {"prompt": prompt, "completion": example["chosen"], "label": True},
        {"prompt": prompt, "completion": example["rejected"], "label": False},
    ]


def as_language_modeling(example: dict[str, Any]) -> dict[str, Any]:
    """A preference example as an SFT example on its chosen answer."""
    if "prompt" in example:
        return {"prompt": example["prompt"], "completion": example["chosen"]}
    if isinstance(example["chosen"], list):
        return {"messages": example["chosen"]}
    return {"text": example["chosen"]}


def load_examples(
    source: str | Path,
    kind: str,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every row of ``source`` checked and shaped for ``kind``; an empty dataset is an error.

    All rows must share one format (TRL batches them together): the first row decides it.
    ``columns``: see ``check_row``.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    examples: list[dict[str, Any]] = []
    first: tuple[str, ...] | None = None
    for row in read_rows(source, split):
        example = check_row(row, kind, columns)
        shaped = _shape(example, kind)
        keys = tuple(sorted(shaped[0]))
        if first is None:
            first = keys
        elif keys != first:
            raise InputError(
                f"{row.where}: fields {', '.join(keys)} differ from the first row's "
                f"({', '.join(first)}); use one format per file."
            )
        examples.extend(shaped)
    if not examples:
        raise InputError(f"{source}: no examples (the dataset is empty).")
    return examples


def _shape(example: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    if kind == "unpaired" and "chosen" in example:
        return unpair(example)
    if kind == "language_modeling" and "chosen" in example:
        return [as_language_modeling(example)]
    return [example]
