"""Reading model folders: lazy per-tensor reads, pickle refusal, tied names, fingerprints.

Hugging Face folders with ``model.safetensors`` or shards + ``model.safetensors.index.json``
are read lazily, one tensor at a time, by name, with positioned reads into a fresh buffer:
unlike a memory map, pages already read do not stay in the process's resident memory, so peak
RSS is a few tensors. Only files the index names are read (stale shards are ignored). Pickle
checkpoints are refused unless ``allow_pickle``, then load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from omotool.errors import InputError
from omotool.io.formats import (
    _MAX_HEADER,
    _ST_DTYPES,
    PICKLE_INDEX,
    PICKLE_SINGLES,
    SAFE_INDEX,
    SAFE_SINGLE,
    TIED_HEADS,
    _config_ties_embeddings,
    _numel,
    _read_json,
    _tensor_bytes,
)


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
        self._open: dict[Path, SafetensorsFile] = {}
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
        return {name: (e.shape, e.dtype) for name, e in self._safetensors(file).entries.items()}

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
        return self._stored_meta(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._stored_meta(name)[1]

    def _stored_meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        meta = self._meta.get(self.aliases.get(name, name))
        if meta is None:
            raise self._no_tensor(name)
        return meta

    def _no_tensor(self, name: str) -> InputError:
        return InputError(f"{self.path}: the model has no tensor {name!r}.")

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Stored names → (shape, dtype): the layout a ``ModelWriter`` copy of this model has."""
        return dict(self._meta)

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
        """The tensor ``name`` (or the one a tied alias points to) in a fresh buffer it owns."""
        stored = self.aliases.get(name, name)
        file = self._where.get(stored)
        if file is None:
            raise self._no_tensor(name)
        if self.format == "pickle":
            return self._load_pickle(file)[stored].clone()
        return self._safetensors(file).read(stored)

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
        file = self._safetensors(self._where[stored])
        return b"".join(_tensor_bytes(file.read(stored, rows=(r, r + 1))) for r in rows)

    def close(self) -> None:
        for file in self._open.values():
            file.close()
        self._open.clear()
        self._pickled = None

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _safetensors(self, file: Path) -> SafetensorsFile:
        if file not in self._open:
            self._open[file] = SafetensorsFile(file)
        return self._open[file]

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


class _Entry:
    __slots__ = ("dtype", "shape", "start", "nbytes")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], start: int, nbytes: int):
        self.dtype, self.shape, self.start, self.nbytes = dtype, shape, start, nbytes


class SafetensorsFile:
    """One ``.safetensors`` file: header validated on open, tensors read by positioned reads.

    Format: 8-byte little-endian header length, a JSON header mapping each name to its dtype,
    shape and ``data_offsets`` (relative to the data section), then the data. Every damage
    that a truncated download or a wrong file produces is reported as an ``InputError``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(8)
                length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
                if not 0 < length <= min(size - 8, _MAX_HEADER):
                    raise self._damaged("the header length is impossible")
                header = json.loads(f.read(length))
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._damaged("the header is not valid JSON") from exc
        if not isinstance(header, dict):
            raise self._damaged("the header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries: dict[str, _Entry] = {}
        end = 0
        for name, spec in header.items():
            try:
                dtype = _ST_DTYPES[spec["dtype"]]
                shape = tuple(int(d) for d in spec["shape"])
                begin, stop = (int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._damaged(f"tensor {name} has an unreadable entry ({spec!r})") from exc
            nbytes = _numel(shape) * dtype.itemsize
            if begin < 0 or stop - begin != nbytes:
                raise self._damaged(f"tensor {name} has inconsistent offsets")
            self.entries[name] = _Entry(dtype, shape, self.data_start + begin, nbytes)
            end = max(end, stop)
        if self.data_start + end != size:
            raise self._damaged(
                f"the header describes {self.data_start + end:,} bytes but the file has {size:,}"
            )

    def _damaged(self, why: str) -> InputError:
        return InputError(
            f"{self.path}: not a valid safetensors file ({why}). It may be corrupted or "
            "truncated; download or copy it again."
        )

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[start, stop)``) in a fresh buffer."""
        entry = self.entries[name]
        shape, start, nbytes = entry.shape, entry.start, entry.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            shape = (rows[1] - rows[0], *shape[1:])
            start, nbytes = start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        try:
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (see close)
            self._file.seek(start)
            while done < nbytes:
                count = self._file.readinto(view[done:])
                if not count:
                    raise self._damaged(f"tensor {name} ends past the end of the file")
                done += count
        except OSError as exc:
            raise InputError(f"{self.path}: cannot be read ({exc.strerror or exc}).") from exc
        return buffer.view(entry.dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
