"""The SFT task vector ``τ_r = θ_sft − θ_base`` as the optimizer consumes it.

``TaskVector`` answers ``get(name)`` with τ for one parameter, in float32, read on demand
from the output of ``omotool delta`` (``load``), from two models (``from_models``, streaming:
neither model is held in memory), or from a plain ``{name: tensor}`` mapping.

``FlatDelta`` is how the optimizer keeps the sparsified ``F(τ_r)`` between steps: the kept
flat indices and their values when few entries are kept (8 bytes per kept entry with int32
indices, so 0.08 bytes per parameter at p = 0.01), a dense tensor otherwise.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omotool.errors import InputError
from omotool.io import ModelReader, fingerprint

SPARSE_BELOW = 0.5  # store F(τ) as (indices, values) when it keeps less than this fraction


class TaskVector:
    """τ by parameter name; see module docstring. Use ``load``/``from_models``/``from_mapping``."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        reader: ModelReader | None = None,
        base: ModelReader | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._tensors = dict(tensors) if tensors is not None else None
        self._reader = reader  # τ on disk, or the SFT model when ``base`` is given
        self._base = base
        self.metadata: dict[str, Any] = metadata or {}

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> TaskVector:
        """The task vector written by ``omotool delta`` into ``folder``."""
        folder = Path(folder)
        meta_path = folder / "omotool.json"
        if not meta_path.is_file():
            raise InputError(
                f"{folder}: not a task vector (no omotool.json). Make one with "
                "`omotool delta BASE SFT -o OUT`."
            )
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{meta_path}: not valid JSON ({exc}).") from exc
        if metadata.get("kind") != "task_vector":
            raise InputError(f"{folder}: omotool.json does not describe a task vector.")
        return cls(reader=ModelReader(folder), metadata=metadata)

    @classmethod
    def from_models(
        cls, base: str | os.PathLike[str], sft: str | os.PathLike[str], allow_pickle: bool = False
    ) -> TaskVector:
        """τ computed per name on request from two model folders (or Hub ids)."""
        base_reader = ModelReader(base, allow_pickle)
        sft_reader = ModelReader(sft, allow_pickle)
        metadata = {"sft": {"path": str(sft_reader.path), "fingerprint": fingerprint(sft_reader)}}
        return cls(reader=sft_reader, base=base_reader, metadata=metadata)

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, torch.Tensor]) -> TaskVector:
        return cls(tensors=tensors)

    @classmethod
    def coerce(cls, source: TaskVector | Mapping[str, torch.Tensor] | str | os.PathLike[str]):
        """A ``TaskVector`` from itself, a mapping, or a ``delta`` output folder."""
        if isinstance(source, TaskVector):
            return source
        if isinstance(source, Mapping):
            return cls.from_mapping(source)
        return cls.load(source)

    @property
    def sft_fingerprint(self) -> str | None:
        """Fingerprint of the SFT model τ was taken from (None for a plain mapping)."""
        return (self.metadata.get("sft") or {}).get("fingerprint")

    def __contains__(self, name: object) -> bool:
        if self._tensors is not None:
            return name in self._tensors
        return self._reader is not None and name in self._reader

    def shape(self, name: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[name].shape)
        assert self._reader is not None
        return self._reader.shape(name)

    def get(self, name: str) -> torch.Tensor:
        """τ for parameter ``name`` in float32 (a fresh tensor)."""
        if self._tensors is not None:
            tau = self._tensors[name].detach().to("cpu", torch.float32, copy=True)
        else:
            assert self._reader is not None
            tau = self._reader.get(name).float()
            if self._base is not None:
                tau.sub_(self._base.get(name))
        if not bool(torch.isfinite(tau).all()):
            raise InputError(f"task vector entry {name} holds NaN or inf values.")
        return tau

    def close(self) -> None:
        for reader in (self._reader, self._base):
            if reader is not None:
                reader.close()


@dataclass
class FlatDelta:
    """A sparsified delta over a flattened tensor: ``indices``/``values`` or dense ``values``.

    ``indices is None`` means dense: ``values`` has the tensor's shape. Otherwise ``values[i]``
    sits at flat position ``indices[i]`` (sorted).
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    numel: int

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> FlatDelta:
        """Sparse if fewer than ``SPARSE_BELOW`` of the entries are nonzero, else dense."""
        flat = dense.reshape(-1)
        kept = torch.nonzero(flat).flatten()
        if kept.numel() >= SPARSE_BELOW * flat.numel():
            return cls(values=dense.contiguous(), indices=None, numel=flat.numel())
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.long
        return cls(values=flat[kept].contiguous(), indices=kept.to(index_dtype), numel=flat.numel())

    @functools.cached_property
    def sq_norm(self) -> float:
        """``‖values‖²``, computed once (logged every step as the τ contribution)."""
        return float(torch.dot(self.values.reshape(-1), self.values.reshape(-1)))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.indices is None else self.indices.numel() * self.indices.element_size()
        return self.values.numel() * self.values.element_size() + extra

    def flat_indices(self) -> torch.Tensor:
        """The kept flat positions (all positions when dense), as int64."""
        if self.indices is None:
            return torch.arange(self.numel, device=self.values.device)
        return self.indices.long()

    def flat_values(self) -> torch.Tensor:
        return self.values.reshape(-1)

    def to_dense(self) -> torch.Tensor:
        if self.indices is None:
            return self.values.reshape(-1).clone()
        dense = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        dense[self.indices.long()] = self.values
        return dense

    def to(self, device: torch.device | str) -> FlatDelta:
        indices = None if self.indices is None else self.indices.to(device)
        return FlatDelta(self.values.to(device), indices, self.numel)
