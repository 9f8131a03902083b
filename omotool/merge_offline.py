"""Offline merging of an RLHF model back toward its SFT model: the paper's baselines.

``θ = θ_sft + a·(θ_rlhf − θ_sft)`` for ``linear`` (``a = 0`` the SFT model, ``a = 1`` the RLHF
model, ``a > 1`` extrapolates, ExPO); the task-vector methods of ``omotool.merging.methods``
merge ``τ_sft = θ_sft − θ_b`` and ``τ_rlhf = θ_rlhf − θ_b`` with weights ``(1 − a, a)``.

A list of alphas is a sweep: every input tensor is read once and each alpha's model is written
to ``OUT/alpha-<a>/``; the sweep folder appears only when every model in it is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from omotool import __version__
from omotool.config import config_dict, parse_size
from omotool.delta import DTYPES, plan_delta
from omotool.errors import InputError, UsageError
from omotool.io import ModelReader, ModelWriter, check_output, fingerprint
from omotool.io.adapters import open_model
from omotool.merging import RESCALES, keyed_generator
from omotool.merging.methods import MERGE_METHODS

METADATA_FILE = "omotool.json"


@dataclass
class MergeConfig:
    """Options of ``omotool merge-offline`` (recipe keys and CLI flags have these names)."""

    sft: str
    rlhf: str
    out: str
    alpha: str = "0.5"  # one number, or a comma-separated list (a sweep)
    method: str = "linear"
    layer_alpha: str | None = None  # "0-9:0.2,10-:0.8,embed:0.1,head:0.9" or a YAML file
    base: str | None = None
    density: float = 1.0
    seed: int = 0
    normalize: bool | None = None  # None: the method's default
    rescale: str | None = None  # None: DARE inverse (1/density), TIES none
    dtype: str | None = None  # None: the SFT model's dtype
    shard_size: str = "5GB"
    allow_pickle: bool = False
    overwrite: bool = False

    def alphas(self) -> list[float]:
        """The alphas, in order; a UsageError names the part that is not a number."""
        values = []
        for part in str(self.alpha).split(","):
            try:
                values.append(float(part))
            except ValueError:
                raise UsageError(f"alpha {part.strip()!r} is not a number.") from None
        if len(set(values)) != len(values):
            raise UsageError(f"alpha lists a value twice: {self.alpha}.")
        return values

    def validate(self) -> None:
        method = MERGE_METHODS.get(self.method)
        if self.layer_alpha is not None:
            if len(self.alphas()) > 1:
                raise UsageError("--layer-alpha sets one model's alphas; give a single --alpha.")
            LayerAlphas.parse(self.layer_alpha)
        self.alphas()
        if method.needs_base and self.base is None:
            raise UsageError(f"method {self.method!r} merges task vectors: give --base BASE.")
        if not 0.0 < self.density <= 1.0:
            raise UsageError(f"density must be in (0, 1] (the fraction kept), got {self.density}.")
        if method.sparsifier is None and self.density != 1.0:
            raise UsageError(f"method {self.method!r} does not sparsify; drop --density.")
        if self.rescale is not None and self.rescale not in RESCALES:
            raise UsageError(f"rescale {self.rescale!r} is not one of {', '.join(RESCALES)}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        parse_size(self.shard_size)


_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in")
_HEAD = ("lm_head", "embed_out")


@dataclass
class LayerAlphas:
    """Per-tensor alphas (heterogeneous model averaging, Lin et al. 2024).

    Transformer blocks are found by name (``model.layers.<i>.`` for Llama/Qwen2/Mistral,
    ``transformer.h.<i>.`` for GPT-2); ``embed`` and ``head`` name the embeddings and the output
    head. Any other tensor (final norm, ...) takes the global alpha and is listed as unmatched.
    """

    ranges: list[tuple[int, int | None, float]]  # first block, last block (None: open), alpha
    embed: float | None = None
    head: float | None = None

    @classmethod
    def parse(cls, spec: str) -> LayerAlphas:
        """From ``"0-9:0.2,10-19:0.5,20-:0.8,embed:0.1,head:0.9"`` or a YAML file of that map."""
        path = Path(spec)
        if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
            if not path.is_file():
                raise InputError(f"{spec}: no such layer-alpha file.")
            mapping = yaml.safe_load(path.read_text())
            if not isinstance(mapping, dict):
                raise InputError(f"{spec}: a layer-alpha file maps block ranges to alphas.")
            items = [(str(key), value) for key, value in mapping.items()]
        else:
            items = []
            for part in spec.split(","):
                key, sep, value = part.rpartition(":")
                if not sep:
                    raise UsageError(f"layer-alpha part {part!r} is not RANGE:ALPHA.")
                items.append((key.strip(), value))
        parsed = cls(ranges=[])
        for key, value in items:
            try:
                alpha = float(value)
            except (TypeError, ValueError):
                raise UsageError(
                    f"layer-alpha value {value!r} for {key!r} is not a number."
                ) from None
            if key in ("embed", "head"):
                setattr(parsed, key, alpha)
                continue
            match = re.fullmatch(r"(\d+)(?:-(\d*))?", key)
            if match is None:
                raise UsageError(
                    f"layer-alpha key {key!r} is not a block range (3, 0-9, 20-), embed or head."
                )
            first = int(match.group(1))
            last = (
                first
                if match.group(2) is None
                else (int(match.group(2)) if match.group(2) else None)
            )
            if last is not None and last < first:
                raise UsageError(f"layer-alpha range {key!r} ends before it starts.")
            parsed.ranges.append((first, last, alpha))
        return parsed

    def alpha_for(self, name: str) -> float | None:
        """The alpha of tensor ``name``, or None if no key matches it."""
        block = _BLOCK.search(name)
        if block is not None:
            index = int(block.group(1))
            for first, last, alpha in self.ranges:
                if first <= index and (last is None or index <= last):
                    return alpha
            return None
        if any(part in name for part in _HEAD):
            return self.head
        if any(part in name for part in _EMBED):
            return self.embed
        return None


@dataclass
class MergeSummary:
    out: Path
    alphas: list[float]
    outputs: list[Path]
    tensors: int
    extrapolated: list[float]
    unmatched: list[str]  # tensors --layer-alpha did not match (they took the global alpha)


def alpha_folder(alpha: float) -> str:
    return f"alpha-{alpha:g}"


def merge_tensor(
    name: str,
    sft: torch.Tensor,
    rlhf: torch.Tensor,
    base: torch.Tensor | None,
    alpha: float,
    config: MergeConfig,
) -> torch.Tensor:
    """The merged float32 tensor for one alpha (DARE masks keyed by seed, name and model)."""
    method = MERGE_METHODS.get(config.method)
    kwargs: dict[str, Any] = {}
    if config.normalize is not None:
        kwargs["normalize"] = config.normalize
    if method.sparsifier is not None:
        kwargs.update(density=config.density, rescale_mode=config.rescale)
    if method.sparsifier == "dare":
        kwargs["generators"] = [keyed_generator(config.seed, "merge", name, i) for i in range(2)]
    return method.merge(base, [sft, rlhf], [1.0 - alpha, alpha], **kwargs)


def run_merge(
    config: MergeConfig, progress: Callable[[str, int, int], None] | None = None
) -> MergeSummary:
    """Write the merged model(s) of ``config``; see the module docstring."""
    config.validate()
    alphas = config.alphas()
    inputs = [p for p in (config.sft, config.rlhf, config.base) if p is not None]
    check_output(config.out, config.overwrite, inputs)
    with contextlib.ExitStack() as stack:
        sft = stack.enter_context(open_model(config.sft, config.allow_pickle))
        rlhf = stack.enter_context(open_model(config.rlhf, config.allow_pickle))
        base = (
            stack.enter_context(ModelReader(config.base, config.allow_pickle))
            if MERGE_METHODS.get(config.method).needs_base and config.base is not None
            else None
        )
        plan = plan_delta(sft, rlhf, labels=("SFT", "RLHF"))
        if base is not None:
            plan_delta(base, sft, labels=("base", "SFT"))
        out_dtype = DTYPES[config.dtype] if config.dtype else sft.dominant_dtype()
        layout = {
            name: (sft.shape(name), out_dtype if name in plan.float_names else sft.dtype(name))
            for name in sft.names
        }
        metadata = {
            "kind": "merge",
            "omotool_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sft": {"path": _source(sft), "fingerprint": fingerprint(sft)},
            "rlhf": {"path": _source(rlhf), "fingerprint": fingerprint(rlhf)},
            "base": None
            if base is None
            else {"path": str(base.path.absolute()), "fingerprint": fingerprint(base)},
            "method": config.method,
            "config": config_dict(config),
        }
        sweep = len(alphas) > 1
        root = _SweepFolder(Path(config.out), config.overwrite) if sweep else None
        folder = stack.enter_context(root) if root is not None else None
        writers = []
        for alpha in alphas:
            target = folder / alpha_folder(alpha) if folder is not None else Path(config.out)
            writer = ModelWriter(
                target, layout, parse_size(config.shard_size), config.overwrite or sweep, inputs
            )
            writers.append(stack.enter_context(writer))
        layers = LayerAlphas.parse(config.layer_alpha) if config.layer_alpha else None
        unmatched: list[str] = []
        for done, name in enumerate(sft.names, start=1):
            _merge_one(name, sft, rlhf, base, plan.float_names, alphas, writers, layers,
                       unmatched, config, out_dtype)  # fmt: skip
            if progress is not None:
                progress(name, done, len(sft.names))
        config_json = dict(sft.config)
        if config.dtype:  # transformers 5 reads "dtype", older versions "torch_dtype"
            config_json.update({"dtype": config.dtype, "torch_dtype": config.dtype})
        for alpha, writer in zip(alphas, writers, strict=True):
            writer.copy_model_files(sft.path)
            if config_json:
                writer.write_json("config.json", config_json)
            note = "extrapolates beyond the RLHF model (ExPO)" if alpha > 1 else None
            writer.write_json(
                METADATA_FILE, {**metadata, "alpha": alpha, "note": note, "unmatched": unmatched}
            )
    outputs = [Path(config.out) / alpha_folder(a) for a in alphas] if sweep else [Path(config.out)]
    return MergeSummary(
        out=Path(config.out),
        alphas=alphas,
        outputs=outputs,
        tensors=len(sft.names),
        extrapolated=[a for a in alphas if a > 1],
        unmatched=unmatched,
    )


def _source(reader: ModelReader) -> str:
    """The folder a reader reads: the adapter's for an adapter, else the model's."""
    return str(getattr(reader, "adapter", reader.path).absolute())


def _merge_one(
    name: str,
    sft: ModelReader,
    rlhf: ModelReader,
    base: ModelReader | None,
    float_names: list[str],
    alphas: list[float],
    writers: list[ModelWriter],
    layers: LayerAlphas | None,
    unmatched: list[str],
    config: MergeConfig,
    out_dtype: torch.dtype,
) -> None:
    """Merge and write one tensor for every alpha (a function, so its tensors are freed
    before the next tensor is read: peak memory stays a few tensors)."""
    theta_sft = sft.get(name)
    if name not in float_names:  # integer buffers are copied from the SFT model
        for writer in writers:
            writer.add(name, theta_sft)
        return
    theta_sft = theta_sft.float()
    theta_rlhf = rlhf.get(name).float()
    theta_base = base.get(name).float() if base is not None else None
    for alpha, writer in zip(alphas, writers, strict=True):
        if layers is not None:
            tensor_alpha = layers.alpha_for(name)
            if tensor_alpha is None:
                unmatched.append(name)
            alpha = alpha if tensor_alpha is None else tensor_alpha
        merged = merge_tensor(name, theta_sft, theta_rlhf, theta_base, alpha, config)
        if not bool(torch.isfinite(torch.stack(torch.aminmax(merged))).all()):
            raise InputError(f"tensor {name} holds NaN or inf after merging: an input holds them.")
        writer.add(name, merged.to(out_dtype))
        del merged


class _SweepFolder:
    """A folder filled in a hidden temporary place and renamed into ``out`` when complete.

    Enter it after the writers' readers, before the writers: contexts exit in reverse, so the
    writers commit into it first and it is renamed last (or removed on any error).
    """

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out.expanduser().absolute()
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.omotool-tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.omotool-old-{uuid.uuid4().hex[:8]}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
