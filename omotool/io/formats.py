"""On-disk formats shared by the model reader and writer: names, dtypes, small helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from omotool.errors import InputError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Non-weight files copied to a written model so transformers loads model and tokenizer."""

DEFAULT_SHARD_SIZE = 5 * 1024**3

# Output heads and the input embeddings they may be tied to, by architecture family.
TIED_HEADS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",  # Llama, Qwen2, Mistral, Gemma, ...
        "transformer.wte.weight",  # GPT-2
        "transformer.word_embeddings.weight",  # Bloom, Falcon
        "model.decoder.embed_tokens.weight",  # OPT
    ),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),  # GPT-NeoX, Pythia
}

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

TensorLayout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""Names (in writing order) → (shape, dtype) of the tensors a ``ModelWriter`` will receive."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}).") from exc


def _config_ties_embeddings(config: dict[str, Any]) -> bool:
    text_config = config.get("text_config") or {}
    value = config.get("tie_word_embeddings", text_config.get("tie_word_embeddings"))
    return True if value is None else bool(value)  # transformers' default is True


def _tensor_array(tensor: torch.Tensor) -> Any:
    """The tensor's raw little-endian bytes as a uint8 numpy array (no copy when contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return _tensor_array(tensor).tobytes()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` (newline-terminated) whole or not at: written aside, renamed."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    os.replace(partial, path)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """``path`` holds ``rows`` as JSON Lines (one object a line), written atomically."""
    write_text_atomic(path, "".join(json.dumps(dict(row)) + "\n" for row in rows))
