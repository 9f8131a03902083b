"""Model folders on disk: lazy per-tensor reads, atomic sharded writes, fingerprints.

Every command reads and writes models through this module, so the rules live here once:
- Hugging Face folders with ``model.safetensors`` or shards + ``model.safetensors.index.json``
  are read lazily (memory-mapped), one tensor at a time, by name; only files the index names
  are read, so stale shards left in a folder are ignored.
- Pickle checkpoints (``*.bin``, ``*.pt``) are refused unless ``allow_pickle``; then they load
  with ``torch.load(weights_only=True)``, which never runs code from the file.
- Tied embeddings: a model with ``tie_word_embeddings`` may store no ``lm_head.weight``;
  ``ModelReader.get`` resolves such a name to the embedding it is tied to.
- Outputs are written into a hidden temporary folder next to the target and renamed into place
  only when complete; memory stays at one tensor (shard data streams through a body file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from omotool.errors import InputError, OutputError

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
_CORRUPT = (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError)


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """A local model folder or file; a Hub id (``org/name``) is fetched when it can be reached.

    A spec is taken for a Hub id only when its first component is not a local folder, so a
    typo in ``runs/sft`` is reported as a missing path, not sent to the network.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text.split("/")[0]).exists():
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
            return Path(snapshot_download(text, allow_patterns=patterns))
        except Exception as exc:  # any network or hub failure means: not reachable
            raise InputError(
                f"{text}: no such local path, and it could not be fetched from the Hugging Face "
                f"Hub ({type(exc).__name__}). Check the path, or the model id and your network."
            ) from exc
    raise InputError(f"{text}: no such file or folder. Check the path.")


class ModelReader:
    """Read-only, lazy view of a model's tensors by name (see module docstring).

    ``names`` lists the stored tensors; ``aliases`` maps tied names that are not stored
    (``lm_head.weight``) to the stored tensor they share; ``get`` accepts both.
    """

    def __init__(self, spec: str | os.PathLike[str], allow_pickle: bool = False) -> None:
        self.path = resolve_model_path(spec)
        config_path = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        self.config: dict[str, Any] = _read_json(config_path) if config_path.is_file() else {}
        self._files = self._locate_files(allow_pickle)
        self.format = "pickle" if self._files[0].suffix in (".bin", ".pt") else "safetensors"
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._handles: dict[Path, Any] = {}
        self._pickled: tuple[Path, dict[str, torch.Tensor]] | None = None
        for file in self._files:
            for name, meta in self._scan(file).items():
                self._where[name] = file
                self._meta[name] = meta
        if not self._where:
            raise InputError(f"{self.path}: the weight files hold no tensors.")
        self.names: list[str] = list(self._where)
        self.aliases: dict[str, str] = self._tied_aliases()

    # -- discovery -------------------------------------------------------------------------
    def _locate_files(self, allow_pickle: bool) -> list[Path]:
        path = self.path
        if path.is_file():
            if path.suffix == ".safetensors":
                return [path]
            if path.suffix in (".bin", ".pt"):
                return self._pickle_ok([path], allow_pickle)
            raise InputError(f"{path}: not a model file (expected .safetensors, or .bin/.pt).")
        if (path / SAFE_INDEX).is_file():
            return self._indexed(path / SAFE_INDEX)
        if (path / SAFE_SINGLE).is_file():
            return [path / SAFE_SINGLE]
        if (path / PICKLE_INDEX).is_file():
            return self._pickle_ok(self._indexed(path / PICKLE_INDEX), allow_pickle)
        singles = [path / name for name in PICKLE_SINGLES if (path / name).is_file()]
        if singles:
            return self._pickle_ok(singles[:1], allow_pickle)
        raise InputError(
            f"{path}: not a model folder (no {SAFE_SINGLE}, {SAFE_INDEX} or pytorch_model.bin). "
            "Point to a Hugging Face model folder."
        )

    def _pickle_ok(self, files: list[Path], allow_pickle: bool) -> list[Path]:
        if not allow_pickle:
            raise InputError(
                f"{self.path}: holds pickle checkpoints ({files[0].name}), which can run code "
                "when loaded. Convert the model to safetensors, or pass --allow-pickle to load "
                "it with torch.load(weights_only=True)."
            )
        return files

    def _indexed(self, index_path: Path) -> list[Path]:
        try:
            weight_map = _read_json(index_path)["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index_path}: not a valid index (no weight_map).") from exc
        missing = [f for f in files if not (index_path.parent / f).is_file()]
        if missing:
            raise InputError(
                f"{index_path}: names shard files that are missing: {', '.join(missing[:5])}. "
                "The download or copy is incomplete."
            )
        return [index_path.parent / f for f in files]

    def _scan(self, file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.format == "pickle":
            return {n: (tuple(t.shape), t.dtype) for n, t in self._load_pickle(file).items()}
        handle = self._handle(file)
        meta = {}
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            tensor_slice = handle.get_slice(name)
            dtype = _ST_DTYPES.get(tensor_slice.get_dtype())
            if dtype is None:
                raise InputError(
                    f"{file}: tensor {name} has unsupported dtype {tensor_slice.get_dtype()}."
                )
            meta[name] = (tuple(tensor_slice.get_shape()), dtype)
        return meta

    def _tied_aliases(self) -> dict[str, str]:
        if not _config_ties_embeddings(self.config):
            return {}
        aliases = {}
        for head, embeddings in TIED_HEADS.items():
            if head in self._where:
                continue
            source = next((e for e in embeddings if e in self._where), None)
            if source is not None:
                aliases[head] = source
        return aliases

    # -- access ----------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self.aliases

    def logical_names(self) -> set[str]:
        """Stored names plus tied aliases: the names ``get`` answers."""
        return set(self._where) | set(self.aliases)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self.aliases.get(name, name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self.aliases.get(name, name)][1]

    def numel(self) -> int:
        """Number of stored parameters (tied aliases not counted twice)."""
        return sum(_numel(shape) for shape, _ in self._meta.values())

    def dominant_dtype(self) -> torch.dtype:
        """The floating dtype holding most parameters (the model's working dtype)."""
        counts: dict[torch.dtype, int] = {}
        for shape, dtype in self._meta.values():
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + _numel(shape)
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (or the tensor a tied alias points to), loaded on its own."""
        stored = self.aliases.get(name, name)
        file = self._where.get(stored)
        if file is None:
            raise KeyError(name)
        try:
            if self.format == "pickle":
                return self._load_pickle(file)[stored]
            return self._handle(file).get_tensor(stored)
        except _CORRUPT as exc:
            raise InputError(
                f"{file}: could not read tensor {stored} ({type(exc).__name__}: {exc}). "
                "The file may be corrupted or truncated; download or copy it again."
            ) from exc

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def sample_bytes(self, name: str) -> bytes:
        """Bytes of the first, middle and last rows of a tensor: cheap content evidence."""
        shape = self.shape(name)
        stored = self.aliases.get(name, name)
        if len(shape) == 0 or _numel(shape) <= 4096:
            return _tensor_bytes(self.get(name))
        rows = sorted({0, shape[0] // 2, shape[0] - 1})
        if self.format == "pickle":
            full = self.get(name)
            return b"".join(_tensor_bytes(full[r : r + 1]) for r in rows)
        tensor_slice = self._handle(self._where[stored]).get_slice(stored)
        return b"".join(_tensor_bytes(tensor_slice[r : r + 1]) for r in rows)

    def close(self) -> None:
        self._handles.clear()
        self._pickled = None

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except _CORRUPT as exc:
                raise InputError(
                    f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc}). "
                    "It may be corrupted or truncated; download or copy it again."
                ) from exc
        return self._handles[file]

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        # One pickle file at a time is held; weights_only=True refuses anything but tensors.
        if self._pickled is None or self._pickled[0] != file:
            self._pickled = None
            try:
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # unpickling errors have no common base class
                raise InputError(
                    f"{file}: could not be loaded as a weights-only checkpoint "
                    f"({type(exc).__name__}: {exc}). It may be corrupted, or hold code or "
                    "objects other than tensors; omotool does not run code from model files."
                ) from exc
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise InputError(f"{file}: is not a state dict of tensors.")
            self._pickled = (file, state)
        return self._pickled[1]


def fingerprint(reader: ModelReader) -> str:
    """``sha256:<hex>`` over every stored tensor's name, dtype, shape and sampled rows.

    Independent of sharding and file format; changes when weights change (a fine-tune moves
    every row), costs a few rows per tensor instead of a read of the whole model.
    """
    digest = hashlib.sha256()
    for name in sorted(reader.names):
        digest.update(f"{name}|{reader.dtype(name)}|{reader.shape(name)}\n".encode())
        digest.update(reader.sample_bytes(name))
    return "sha256:" + digest.hexdigest()


class ModelWriter:
    """Writes tensors as sharded safetensors (+ index) into ``out``, atomically.

    Use as a context manager: tensors and files go to a hidden temporary folder next to
    ``out``; a clean exit renames it into place (replacing an old ``out`` only if
    ``overwrite``), an exception or Ctrl-C removes it. One shard is ``model.safetensors``;
    several are ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        shard_size: int = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.out = Path(out).expanduser().absolute()
        check_output(self.out, overwrite, inputs)
        if shard_size <= 0:
            raise InputError(f"shard size must be positive, got {shard_size}.")
        self.shard_size = shard_size
        self.tmp = self.out.parent / f".{self.out.name}.omotool-tmp-{uuid.uuid4().hex[:8]}"
        self._shards: list[tuple[Path, list[str]]] = []
        self._entries: dict[str, dict[str, Any]] = {}
        self._body: Any = None
        self._body_bytes = 0
        self.total_bytes = 0

    def __enter__(self) -> ModelWriter:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise _output_error(self.out, exc) from exc
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self._commit()
                return
            except OSError as exc:
                self._abort()
                raise _output_error(self.out, exc) from exc
            except BaseException:
                self._abort()
                raise
        self._abort()

    @property
    def folder(self) -> Path:
        """The temporary folder being filled (for callers that add their own files)."""
        return self.tmp

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; it is written to disk before this returns."""
        if name in self._entries or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        data = _tensor_array(tensor)
        try:
            if self._body is not None and self._body_bytes + data.nbytes > self.shard_size:
                self._close_shard()
            if self._body is None:
                body = self.tmp / f".body-{len(self._shards) + 1:05d}"
                self._body = open(body, "wb")  # noqa: SIM115 (closed in _close_shard/_abort)
                self._body_bytes = 0
            self._body.write(data.data)
        except OSError as exc:
            raise _output_error(self.out, exc) from exc
        self._entries[name] = {
            "dtype": _ST_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._body_bytes, self._body_bytes + data.nbytes],
        }
        self._body_bytes += data.nbytes
        self.total_bytes += data.nbytes

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as ``name`` into the output folder."""
        try:
            (self.tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        except OSError as exc:
            raise _output_error(self.out, exc) from exc

    def copy_model_files(
        self, source: str | os.PathLike[str], names: Iterable[str] = MODEL_FILES
    ) -> list[str]:
        """Copy config/tokenizer/chat-template files that exist in ``source``; returns names."""
        source = Path(source)
        folder = source if source.is_dir() else source.parent
        copied = []
        try:
            for name in names:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, self.tmp / name)
                    copied.append(name)
        except OSError as exc:
            raise _output_error(self.out, exc) from exc
        return copied

    # -- internals -------------------------------------------------------------------------
    def _close_shard(self) -> None:
        body_path = Path(self._body.name)
        self._body.close()
        self._body = None
        index = len(self._shards) + 1
        shard = self.tmp / f".shard-{index:05d}.safetensors"
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")
        )
        header_bytes = header.encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
        with open(shard, "wb") as out, open(body_path, "rb") as body:
            out.write(struct.pack("<Q", len(header_bytes)))
            out.write(header_bytes)
            shutil.copyfileobj(body, out, length=16 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        body_path.unlink()
        self._shards.append((shard, list(self._entries)))
        self._entries = {}

    def _commit(self) -> None:
        if self._body is not None:
            self._close_shard()
        count = len(self._shards)
        weight_map = {}
        for i, (shard, names) in enumerate(self._shards, start=1):
            final = SAFE_SINGLE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            shard.rename(self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            self.write_json(
                SAFE_INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )
        _fsync_dir(self.tmp)
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.omotool-old-{uuid.uuid4().hex[:8]}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()

    def _abort(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_output(
    out: str | os.PathLike[str], overwrite: bool, inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is, or holds, an input."""
    out_path = Path(out).expanduser().absolute()
    for spec in inputs:
        source = Path(spec).expanduser().absolute()
        if source == out_path or out_path in source.parents:
            raise OutputError(
                f"{out}: is the input {spec} (or contains it). Choose another output folder."
            )
    if (out_path.exists() or out_path.is_symlink()) and not overwrite:
        raise OutputError(
            f"{out}: exists. Pass --overwrite to replace it (the old output is replaced only "
            "once the new one is complete), or choose another output folder."
        )


def _output_error(out: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(
            f"{out}: no space left on device while writing; nothing was written. "
            "Free some space or choose another output folder."
        )
    return OutputError(f"{out}: could not be written ({exc.strerror or exc}); nothing was written.")


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
