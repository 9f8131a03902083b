"""Task vectors: ``τ = θ_sft − θ_base``, tensor by tensor, and their statistics.

``compute_delta`` streams both models one tensor at a time (memory: a few tensors), computes
each difference in float32, optionally sparsifies it with a rule from ``omotool.merging``, and
writes it atomically as safetensors with the SFT model's tensor names, plus ``omotool.json``:
inputs, their fingerprints, dtype, sparsification, seed, version and the resolved config.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omotool import __version__
from omotool.config import config_dict, parse_size
from omotool.errors import InputError, UsageError
from omotool.io import ModelReader, ModelWriter, check_output, fingerprint
from omotool.io.adapters import open_model
from omotool.merging import RESCALES, SPARSIFIERS, keyed_generator

METADATA_FILE = "omotool.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
VOCAB_MISMATCH = ("error", "truncate")


@dataclass
class DeltaConfig:
    """Options of ``omotool delta`` (recipe keys and CLI flags have these names)."""

    base: str
    sft: str
    out: str
    dtype: str | None = None  # None: the SFT model's dtype
    sparsify: str = "none"
    density: float = 1.0
    rescale: str | None = None  # None: the sparsifier's default (DARE: inverse, 1/density)
    seed: int = 0
    shard_size: str = "5GB"
    vocab_mismatch: str = "error"
    allow_pickle: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ``UsageError`` for options out of range, before anything is read."""
        SPARSIFIERS.get(self.sparsify)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        if not 0.0 < self.density <= 1.0:
            raise UsageError(f"density must be in (0, 1] (the fraction kept), got {self.density}.")
        if self.sparsify == "none" and self.density != 1.0:
            raise UsageError("density needs a sparsifier: add --sparsify dare or magnitude.")
        if self.rescale is not None and self.rescale not in RESCALES:
            raise UsageError(f"rescale {self.rescale!r} is not one of {', '.join(RESCALES)}.")
        if self.vocab_mismatch not in VOCAB_MISMATCH:
            raise UsageError(f"vocab-mismatch must be one of {', '.join(VOCAB_MISMATCH)}.")
        parse_size(self.shard_size)

    @property
    def resolved_rescale(self) -> str:
        return self.rescale or SPARSIFIERS.get(self.sparsify).default_rescale


@dataclass
class TensorChange:
    """One tensor's task vector, measured."""

    name: str
    numel: int
    tau_norm: float  # ‖τ_i‖ as written (after sparsification and cast)
    base_norm: float  # ‖θ_base,i‖
    dense_norm: float  # ‖θ_sft,i − θ_base,i‖ before sparsification
    kept: int  # entries the sparsifier kept

    @property
    def relative(self) -> float:
        return self.tau_norm / self.base_norm if self.base_norm > 0 else math.inf


@dataclass
class DeltaSummary:
    """What ``compute_delta`` wrote and measured; totals are derived from ``changes``."""

    out: Path
    dtype: str
    changes: list[TensorChange] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-float tensors, equal in both
    truncated: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tensors(self) -> int:
        return len(self.changes)

    @property
    def parameters(self) -> int:
        return sum(c.numel for c in self.changes)

    @property
    def tau_norm(self) -> float:
        return math.sqrt(sum(c.tau_norm**2 for c in self.changes))

    @property
    def dense_tau_norm(self) -> float:
        return math.sqrt(sum(c.dense_norm**2 for c in self.changes))

    @property
    def base_norm(self) -> float:
        return math.sqrt(sum(c.base_norm**2 for c in self.changes))

    @property
    def kept_fraction(self) -> float:
        return sum(c.kept for c in self.changes) / self.parameters if self.parameters else 0.0

    @property
    def relative_norm(self) -> float:
        return self.tau_norm / self.base_norm if self.base_norm > 0 else math.inf

    def top_changes(self, count: int = 10) -> list[TensorChange]:
        """Tensors with the largest ``‖τ_i‖ / ‖θ_base,i‖``."""
        return sorted(self.changes, key=lambda c: c.relative, reverse=True)[:count]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "tensors": self.tensors,
            "parameters": self.parameters,
            "tau_norm": self.tau_norm,
            "dense_tau_norm": self.dense_tau_norm,
            "base_norm": self.base_norm,
            "relative_norm": self.relative_norm,
            "kept_fraction": self.kept_fraction,
            "dtype": self.dtype,
            "skipped": self.skipped,
            "truncated": self.truncated,
            "top_changes": [
                {
                    "name": c.name,
                    "numel": c.numel,
                    "tau_norm": c.tau_norm,
                    "base_norm": c.base_norm,
                    "relative": c.relative,
                }
                for c in self.top_changes(top)
            ],
        }


@dataclass
class _Plan:
    names: list[str]  # SFT tensor names, in order
    truncated: dict[str, list[int]]  # name -> [sft_rows, base_rows]
    float_names: list[str]  # the names τ is written for (non-float tensors are only compared)


def plan_delta(
    base: ModelReader,
    sft: ModelReader,
    vocab_mismatch: str = "error",
    labels: tuple[str, str] = ("base", "SFT"),
) -> _Plan:
    """Check that two models line up (names, shapes, dtypes) before anything is computed.

    ``labels`` name the two models in messages (``merge-offline`` compares SFT and RLHF).
    """
    first, second = labels
    only_base = sorted(base.logical_names() - sft.logical_names())
    only_sft = sorted(sft.logical_names() - base.logical_names())
    if only_base or only_sft:
        parts = []
        if only_sft:
            parts.append(f"only in the {second} model: {_listing(only_sft)}")
        if only_base:
            parts.append(f"only in the {first} model: {_listing(only_base)}")
        raise InputError(
            f"{base.path} and {sft.path} do not have the same tensors ({'; '.join(parts)}). "
            "Both models must have the same architecture."
        )
    truncated: dict[str, list[int]] = {}
    mismatched = []
    only_rows_added = True  # every mismatch is a matrix that gained rows (vocabulary) and no more
    for name in sft.names:
        b_shape, s_shape = base.shape(name), sft.shape(name)
        if b_shape == s_shape:
            continue
        added_rows = (
            len(b_shape) == len(s_shape) >= 1
            and b_shape[1:] == s_shape[1:]
            and s_shape[0] > b_shape[0]
        )
        if added_rows and vocab_mismatch == "truncate":
            truncated[name] = [s_shape[0], b_shape[0]]
        else:
            only_rows_added = only_rows_added and added_rows and len(s_shape) == 2
            mismatched.append(f"{name} {list(s_shape)} ({second}) vs {list(b_shape)} ({first})")
    if mismatched:
        # --vocab-mismatch truncate helps only when nothing but the vocabulary dimension differs;
        # any other difference (hidden size, layers, heads) is another architecture.
        if only_rows_added and vocab_mismatch == "error":
            hint = (
                f" The {second} model seems to add vocabulary rows: pass --vocab-mismatch "
                "truncate to take τ over the rows both models have."
            )
        else:
            hint = " The models have different architectures: τ needs two models of one shape."
        raise InputError(f"shapes differ: {_listing(mismatched)}.{hint}")
    for name in sft.names:
        b_float, s_float = base.dtype(name).is_floating_point, sft.dtype(name).is_floating_point
        if b_float != s_float:
            raise InputError(
                f"tensor {name} is {sft.dtype(name)} in the {second} model and "
                f"{base.dtype(name)} in the {first} model; both must be floating point "
                "(dequantize quantized models first)."
            )
    float_names = [name for name in sft.names if sft.dtype(name).is_floating_point]
    return _Plan(names=list(sft.names), truncated=truncated, float_names=float_names)


def compute_delta(
    config: DeltaConfig, progress: Callable[[str, int, int], None] | None = None
) -> DeltaSummary:
    """Write ``τ = θ_sft − θ_base`` (optionally sparsified) to ``config.out``; see module doc.

    ``progress(name, done, total)`` is called after each tensor. Raises ``InputError`` for
    inputs that do not line up or hold NaN/inf, ``OutputError`` for an output that exists or
    cannot be written; in every failure nothing is left at ``config.out``.
    """
    config.validate()
    check_output(config.out, config.overwrite, [config.base, config.sft])
    with (
        ModelReader(config.base, config.allow_pickle) as base,
        open_model(config.sft, config.allow_pickle) as sft,  # a LoRA adapter folder too
    ):
        plan = plan_delta(base, sft, config.vocab_mismatch)
        out_dtype = DTYPES[config.dtype] if config.dtype else sft.dominant_dtype()
        summary = DeltaSummary(
            out=Path(config.out),
            dtype=str(out_dtype).removeprefix("torch."),
            truncated=plan.truncated,
        )
        metadata = {
            "kind": "task_vector",
            "omotool_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "base": {"path": str(base.path.absolute()), "fingerprint": fingerprint(base)},
            "sft": {
                "path": str(getattr(sft, "adapter", sft.path).absolute()),
                "fingerprint": fingerprint(sft),
            },
            "dtype": summary.dtype,
            "sparsify": {
                "method": config.sparsify,
                "density": config.density,
                "rescale": config.resolved_rescale,
                "seed": config.seed,
            },
            "tied": sft.aliases,
            "truncated": plan.truncated,
            "config": config_dict(config),
        }
        layout = {name: (base.shape(name), out_dtype) for name in plan.float_names}
        with ModelWriter(
            config.out,
            layout,
            parse_size(config.shard_size),
            config.overwrite,
            [config.base, config.sft],
        ) as writer:
            for done, name in enumerate(plan.names, start=1):
                if name not in layout:
                    if not torch.equal(base.get(name), sft.get(name)):
                        raise InputError(f"non-floating tensor {name} differs between the models.")
                    summary.skipped.append(name)
                    continue
                rows = plan.truncated.get(name, [None, None])[1]
                tau, change = delta_tensor(base, sft, name, config, out_dtype, rows)
                writer.add(name, tau)
                del tau  # before the next pair is read: peak memory stays at two tensors
                summary.changes.append(change)
                if progress is not None:
                    progress(name, done, len(plan.names))
            metadata.update(
                skipped=summary.skipped, tensors=summary.tensors, parameters=summary.parameters
            )
            writer.write_json(METADATA_FILE, metadata)
    return summary


def delta_tensor(
    base: ModelReader,
    sft: ModelReader,
    name: str,
    config: DeltaConfig,
    out_dtype: torch.dtype,
    rows: int | None = None,
) -> tuple[torch.Tensor, TensorChange]:
    """``τ_i = F(θ_sft,i[:rows] − θ_base,i)`` in float32, cast to ``out_dtype``, and its stats.

    ``F`` is ``config.sparsify`` with a generator keyed by ``(seed, "delta", name)``.
    """
    theta_base = base.get(name)
    # In place on the SFT buffer (readers hand out fresh buffers): two live tensors at most.
    dense = sft.get(name)[:rows].float().sub_(theta_base)
    dense_norm = _norm(dense)
    if not math.isfinite(dense_norm) and not bool(torch.isfinite(dense).all()):
        broken = sft if bool(torch.isfinite(theta_base).all()) else base
        raise InputError(
            f"{broken.path}: tensor {name} holds NaN or inf values. The model is broken; "
            "re-export it from a good checkpoint."
        )
    base_norm = _norm(theta_base)
    del theta_base
    if config.sparsify == "none":
        tau, kept = dense, dense.numel()
    else:
        generator = keyed_generator(config.seed, "delta", name)
        sparsifier = SPARSIFIERS.get(config.sparsify)
        tau = sparsifier.apply(dense, config.density, generator, config.resolved_rescale)
        kept = int(torch.count_nonzero(tau))
    tau = tau.to(out_dtype)
    tau_norm = dense_norm if tau is dense else _norm(tau)
    return tau, TensorChange(name, dense.numel(), tau_norm, base_norm, dense_norm, kept)


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.float()))


def _listing(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
