"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, as
``omotool train --lora-r`` writes): recognised, their base model found, loaded merged.

An adapter folder stands for the model ``W₀ + s·B·A``: its base (``base_model_name_or_path``
in ``adapter_config.json``) with the adapter folded in (``merge_and_unload``). Its fingerprint
covers both: the base's ``fingerprint`` and the adapter file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from omotool.errors import InputError
from omotool.io.reader import ModelReader, SafetensorsFile

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
    from omotool.io.reader import fingerprint

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


class AdapterReader(ModelReader):
    """The model a LoRA adapter folder stands for, read lazily as ``ModelReader`` reads a
    model folder: its base's tensors, each adapted weight as ``W₀ + s·B·A`` (computed in
    float32, returned in the weight's dtype, as ``merge_and_unload`` merges), so ``delta``
    and ``merge-offline`` take adapters as models. ``path`` is the base's folder (config and
    tokenizer files), ``adapter`` the adapter's. Plain LoRA only: DoRA, per-module ranks or
    scales and fully trained extra modules are refused by name."""

    def __init__(self, spec: str | os.PathLike[str], allow_pickle: bool = False) -> None:
        self.adapter = Path(spec)
        super().__init__(adapter_base(spec), allow_pickle)
        config = json.loads((self.adapter / ADAPTER_CONFIG).read_text())
        unsupported = [
            key
            for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
            if config.get(key)
        ]
        if config.get("peft_type", "LORA") != "LORA" or unsupported:
            what = unsupported[0] if unsupported else f"peft_type {config.get('peft_type')}"
            raise InputError(
                f"adapter {spec}: {what} is not supported here (plain LoRA only); merge it "
                "with PEFT's merge_and_unload and save the model instead."
            )
        rank = int(config["r"])
        self.scale = float(config["lora_alpha"]) / (
            math.sqrt(rank) if config.get("use_rslora") else rank
        )
        self._factors = SafetensorsFile(self.adapter / ADAPTER_WEIGHTS)
        self.adapted: dict[str, tuple[str, str]] = {}  # weight name → (A key, B key)
        for key in self._factors.entries:
            module, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise InputError(f"adapter {spec}: {key} is not a LoRA factor.")
            name = module.removeprefix("base_model.model.") + ".weight"
            if name not in self._where:
                raise InputError(
                    f"adapter {spec} adapts {name}, which its base {self.path} does not hold."
                )
            self.adapted[name] = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")

    def get(self, name: str) -> torch.Tensor:
        weight = super().get(name)
        factors = self.adapted.get(self.aliases.get(name, name))
        if factors is None:
            return weight
        a, b = (self._factors.read(key).float() for key in factors)
        return weight.float().addmm_(b, a, alpha=self.scale).to(weight.dtype)

    def sample_bytes(self, name: str) -> bytes:
        factors = self.adapted.get(self.aliases.get(name, name), ())
        extra = b"".join(
            self._factors.read(key).reshape(-1).view(torch.uint8).numpy().tobytes()
            for key in factors
        )
        return super().sample_bytes(name) + extra

    def close(self) -> None:
        super().close()
        self._factors.close()


class AdapterDelta(AdapterReader):
    """The task vector an SFT adapter folder stands for against its own base, read lazily:
    ``τ = s·B·A`` (float32, from the factors: no rounding of ``W₀ + s·B·A`` to the weight's
    dtype and back) on each adapted weight, zeros of the weight's shape elsewhere. Names and
    shapes are ``AdapterReader``'s; fingerprint the adapter's model with an ``AdapterReader``."""

    def get(self, name: str) -> torch.Tensor:
        factors = self.adapted.get(self.aliases.get(name, name))
        if factors is None:
            if name not in self:
                raise self._no_tensor(name)
            return torch.zeros(self.shape(name), dtype=torch.float32)
        a, b = (self._factors.read(key).float() for key in factors)
        return torch.mm(b, a).mul_(self.scale)


def open_model(spec: str | os.PathLike[str], allow_pickle: bool = False) -> ModelReader:
    """A reader of the model in ``spec``: an ``AdapterReader`` for a LoRA adapter folder, else
    a ``ModelReader``."""
    if is_adapter(spec):
        return AdapterReader(spec, allow_pickle)
    return ModelReader(spec, allow_pickle)
