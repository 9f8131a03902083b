"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, as
``omotool train --lora-r`` writes): recognised, their base model found, loaded merged.

An adapter folder stands for the model ``W₀ + s·B·A``: its base (``base_model_name_or_path``
in ``adapter_config.json``) with the adapter folded in (``merge_and_unload``). Its fingerprint
covers both: the base's ``fingerprint`` and the adapter file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omotool.errors import InputError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local PEFT adapter folder."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike[str]) -> str:
    """The base model of the adapter in ``path`` (``base_model_name_or_path``); a relative
    path that does not exist from here is looked up next to the adapter folder."""
    config_path = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{config_path}: not a readable adapter config ({exc}).") from None
    if not base:
        raise InputError(f"{config_path} names no base model (base_model_name_or_path).")
    for candidate in (Path(base), Path(path) / base):
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise InputError(
        f"adapter {path}: its base model {base!r} (base_model_name_or_path in {ADAPTER_CONFIG}) "
        "cannot be found; put the base model there or edit that field to its folder."
    )


def load_adapter_model(path: str | os.PathLike[str], **options: Any) -> Any:
    """The base of the adapter in ``path`` loaded with ``options`` (``from_pretrained``'s),
    with the adapter merged in: a plain transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(adapter_base(path), **options)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def tokenizer_folder(path: str | os.PathLike[str]) -> str:
    """Where the tokenizer of a model or adapter folder is: the folder itself when it holds
    one (``omotool train`` saves it with the adapter), else the adapter's base."""
    folder = Path(path)
    if not is_adapter(folder) or (folder / "tokenizer_config.json").is_file():
        return str(path)
    return adapter_base(folder)


def adapter_fingerprint(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` over the base model's ``fingerprint`` and the adapter's weights file."""
    from omotool.io.reader import ModelReader, fingerprint

    with ModelReader(adapter_base(path)) as reader:
        digest = hashlib.sha256(fingerprint(reader).encode())
    weights = Path(path) / ADAPTER_WEIGHTS
    try:
        with weights.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"adapter {path}: {ADAPTER_WEIGHTS} cannot be read ({exc}).") from None
    return "sha256:" + digest.hexdigest()
