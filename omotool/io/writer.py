"""Writing model folders atomically: sharded safetensors + index, planned from a layout.

Outputs go to a hidden temporary folder next to the target and are renamed into place only
when complete. The writer is given the layout (names, shapes, dtypes) up front, so each shard's
header is written first and every tensor goes straight to its place on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from omotool.errors import InputError, OutputError, UsageError
from omotool.io.formats import (
    _ST_NAMES,
    DEFAULT_SHARD_SIZE,
    MODEL_FILES,
    SAFE_INDEX,
    SAFE_SINGLE,
    TensorLayout,
    _numel,
    _tensor_array,
    fsync_path,
)


class ModelWriter:
    """Writes the tensors of ``layout`` as sharded safetensors (+ index) into ``out``, atomically.

    Use as a context manager. Shards are planned from the layout (a new shard starts when the
    next tensor would pass ``shard_size``), so each file's header is written first and
    ``add`` writes a tensor straight to its place: memory is one tensor. Everything goes to a
    hidden temporary folder next to ``out``; a clean exit checks that every tensor arrived and
    renames the folder into place (replacing an old ``out`` only if ``overwrite``); an
    exception or Ctrl-C removes it. One shard is ``model.safetensors``; several are
    ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        layout: TensorLayout,
        shard_size: int = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.out = Path(out).expanduser().absolute()
        check_output(self.out, overwrite, inputs)
        if shard_size <= 0:
            raise InputError(f"shard size must be positive, got {shard_size}.")
        self.tmp = self.out.parent / f".{self.out.name}.omotool-tmp-{uuid.uuid4().hex[:8]}"
        self._layout = {name: (tuple(shape), dtype) for name, (shape, dtype) in layout.items()}
        self._shards = _plan_shards(self._layout, shard_size)
        self._where = {name: shard for shard, names in enumerate(self._shards) for name in names}
        self._offsets: dict[str, int] = {}
        self._pending = [set(names) for names in self._shards]
        self._files: dict[int, Any] = {}
        self.total_bytes = sum(
            _numel(shape) * dtype.itemsize for shape, dtype in self._layout.values()
        )

    @property
    def shard_names(self) -> list[str]:
        count = len(self._shards)
        if count <= 1:
            return [SAFE_SINGLE]
        return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]

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
            except OSError as error:
                self._abort()
                raise _output_error(self.out, error) from error
            except BaseException:
                self._abort()
                raise
        self._abort()

    @property
    def folder(self) -> Path:
        """The temporary folder being filled (for callers that add their own files)."""
        return self.tmp

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor of the layout to disk (any order; each name once)."""
        if name not in self._layout:
            raise UsageError(f"tensor {name} is not in the writer's layout")
        shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise InputError(
                f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the layout says {shape} {dtype}"
            )
        shard = self._where[name]
        if name not in self._pending[shard]:
            raise UsageError(f"tensor {name} written twice")
        data = _tensor_array(tensor)
        try:
            file = self._shard_file(shard)
            file.seek(self._offsets[name])
            _write_all(file, memoryview(data))
            self._pending[shard].discard(name)
            if not self._pending[shard]:
                file.close()
                del self._files[shard]
        except OSError as exc:
            raise _output_error(self.out, exc) from exc

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
    def _shard_file(self, shard: int) -> Any:
        """Open a shard, writing its header on first use."""
        if shard in self._files:
            return self._files[shard]
        entries, offset = {}, 0
        for name in self._shards[shard]:
            shape, dtype = self._layout[name]
            nbytes = _numel(shape) * dtype.itemsize
            entries[name] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":"))
        header_bytes = header.encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
        data_start = 8 + len(header_bytes)
        for name, entry in entries.items():
            self._offsets[name] = data_start + entry["data_offsets"][0]
        # Unbuffered: nothing is left to flush (and to fail) on close.
        file = open(self.tmp / self.shard_names[shard], "wb", buffering=0)  # noqa: SIM115
        _write_all(file, struct.pack("<Q", len(header_bytes)) + header_bytes)
        self._files[shard] = file
        return file

    def _commit(self) -> None:
        missing = [name for names in self._pending for name in names]
        if missing:
            raise UsageError(
                f"{len(missing)} tensors of the layout were never written, e.g. {missing[:3]}"
            )
        for shard in range(len(self._shards)):  # a layout with no tensors still gets its file
            if not (self.tmp / self.shard_names[shard]).exists():
                self._shard_file(shard).close()
        if len(self._shards) > 1:
            weight_map = {name: self.shard_names[self._where[name]] for name in self._layout}
            self.write_json(
                SAFE_INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )
        for path in self.tmp.iterdir():
            fsync_path(path)
        fsync_path(self.tmp)
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.omotool-old-{uuid.uuid4().hex[:8]}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        fsync_path(self.out.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()

    def _abort(self) -> None:
        for file in self._files.values():
            with contextlib.suppress(OSError):
                file.close()
        self._files.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_all(file: Any, data: bytes | memoryview) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += file.write(view[done:])


def _plan_shards(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], shard_size: int):
    shards: list[list[str]] = [[]]
    filled = 0
    for name, (shape, dtype) in layout.items():
        nbytes = _numel(shape) * dtype.itemsize
        if shards[-1] and filled + nbytes > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


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
