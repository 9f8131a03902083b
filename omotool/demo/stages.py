"""The demo's stage machinery, shared by every track (``pipeline`` for the miniature's tracks,
``real`` for the real model's): the cached stage runner, the model points, and the stages
that train a grid of runs, sweep offline merges and evaluate models.

A stage runs unless its folder holds a marker (``MARKER``) whose key (settings and the keys of
its inputs) is the same; a stale or half-built stage is rebuilt from nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omotool.demo.report import MERGING  # the methods that take an α
from omotool.io.formats import write_text_atomic

if TYPE_CHECKING:
    from omotool.eval.device import Placement


class TrackSettings(Protocol):
    """What the shared stages read of a track's settings (``settings.DemoSettings``)."""

    reserve_p: float
    merge_alphas: tuple[float, ...]

    def grid(self, method: str) -> list[tuple[float, float]]: ...

    def merge_lr_of_track(self) -> float: ...


MARKER = "demo-stage.json"  # in each finished stage's folder


METHODS: dict[str, str] = {  # name: omotool train --merge
    "adamw": "none",
    "ondare": "dare",
    "onties": "ties",
    "childtuning": "dare",  # OnDARE with α = 0
}


LORA_METHODS: dict[str, str] = {  # the lora track's adapters: name: omotool train --merge
    "lora-adamw": "none",
    "lora-ondare": "dare",
    "lora-onties": "ties",
}


Progress = Callable[[str, str], None]  # (stage, message)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class _Stages:
    """Runs a stage unless its folder holds a marker with the same key (settings + inputs)."""

    def __init__(self, workdir: Path, progress: Progress | None) -> None:
        self.workdir = workdir
        self.progress = progress or (lambda stage, message: None)
        self.ran: list[str] = []
        self.cached: list[str] = []

    def run(self, name: str, folder: Path, key: dict[str, Any], build: Callable[[], None]) -> str:
        digest = _digest(key)
        marker = folder / MARKER
        label = str(folder.relative_to(self.workdir))
        if marker.exists() and json.loads(marker.read_text()).get("digest") == digest:
            self.cached.append(label)
            self.progress(name, f"{label}: cached")
            return digest
        if folder.exists():  # a stale or half-built stage: built anew
            shutil.rmtree(folder)
        started = time.perf_counter()
        self.progress(name, f"{label}: running")
        build()
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, json.dumps({"digest": digest, "key": key}, indent=2))
        self.ran.append(label)
        self.progress(name, f"{label}: done in {time.perf_counter() - started:.1f} s")
        return digest


@dataclass(frozen=True)
class _Model:
    """A model folder of the demo and where it sits in the comparison."""

    path: Path
    digest: str
    method: str  # sft | adamw | ondare | onties | childtuning | lora-<...> | merge
    seed: int
    lr: float | None = None
    alpha: float | None = None  # the optimizer's α (OnDARE, OnTIES), or the merge weight


def _train(out: Path, **options: Any) -> None:
    """``omotool train`` (its library entry point) with the demo's quiet defaults."""
    from omotool.train.runner import TrainConfig, run_training

    result = run_training(TrainConfig(out=str(out), overwrite=True, **options))
    if result.interrupted:  # Ctrl-C: the stage stays unfinished (no marker) and is redone
        raise KeyboardInterrupt


def _tau_stage(stages: _Stages, folder: Path, base_model: Path, base: str, sft: str) -> str:
    """τ = θ_sft − θ_base (``omotool delta``) into ``folder/tau``, from ``base_model`` and
    ``folder/sft``; keyed by the digests of both (``base``, ``sft``)."""
    from omotool.delta import DeltaConfig, compute_delta

    out = folder / "tau"
    key = {"stage": "tau", "base": base, "sft": sft}
    config = DeltaConfig(base=str(base_model), sft=str(folder / "sft"), out=str(out))
    return stages.run("delta", out, key, lambda: compute_delta(config))


def run_name(lr: float, alpha: float, method: str) -> str:
    """The folder of a run: ``lr-<lr>``, and ``-alpha-<α>`` for the methods that merge."""
    return f"lr-{lr:g}" + (f"-alpha-{alpha:g}" if method in MERGING else "")


def _grid_stages(
    stages: _Stages,
    folder: Path,
    runs: Path,
    settings: TrackSettings,
    seed: int,
    stage: tuple[str, dict[str, Any]],
    sources: tuple[str, str],
    dataset: Path,
    algorithm: dict[str, Any],
    methods: tuple[str, ...],
) -> list[_Model]:
    """Each of ``methods`` over its grid, one stage per run in ``runs/<method>/``:
    ``omotool train`` from the seed's SFT model on ``dataset`` with the ``algorithm`` options,
    the method's ``--merge``, learning rate and seed, and the merge options where it merges.
    ``stage``: the stage's name and what its key holds besides the options and the
    ``sources`` (the SFT and τ stages' digests)."""
    name, inputs_key = stage
    models = []
    for method in methods:
        merge = {**METHODS, **LORA_METHODS}[method]
        for lr, alpha in settings.grid(method):
            out = runs / method / run_name(lr, alpha, method)
            options = {**algorithm, "merge": merge, "lr": lr, "seed": seed}
            if merge != "none":  # AdamW takes no merge options (train refuses them)
                options.update(reserve_p=settings.reserve_p, alpha=alpha)
            key = {"stage": name, **inputs_key, "sft": sources[0], "tau": sources[1], **options}
            inputs = {"model": str(folder / "sft"), "dataset": str(dataset)}
            if merge != "none":
                inputs["task_vector"] = str(folder / "tau")
            digest = stages.run(name, out, key, functools.partial(_train, out, **options, **inputs))
            models.append(_Model(out, digest, method, seed, lr=lr, alpha=alpha))
    return models


def _merge_stages(
    stages: _Stages,
    folder: Path,
    settings: TrackSettings,
    sft: str,
    runs: list[_Model],
    parent: Path,
) -> list[_Model]:
    """``merge-offline`` sweep of the AdamW run at the track's merge learning rate, into
    ``parent / "merges"``."""
    from omotool.merge_offline import MergeConfig, alpha_folder, run_merge

    merge_lr = settings.merge_lr_of_track()
    run = next(r for r in runs if r.method == "adamw" and r.lr == merge_lr)
    out = parent / "merges"
    alphas = ",".join(f"{a:g}" for a in settings.merge_alphas)
    key = {"stage": "merge", "sft": sft, "rlhf": run.digest, "alphas": alphas}

    def build() -> None:
        sweep = out.with_name(out.name + ".sweep")
        shutil.rmtree(sweep, ignore_errors=True)
        target = sweep
        if len(settings.merge_alphas) == 1:  # one alpha: merge-offline writes one model
            sweep.mkdir(parents=True)
            target = sweep / alpha_folder(settings.merge_alphas[0])
        run_merge(MergeConfig(sft=str(folder / "sft"), rlhf=str(run.path), out=str(target),
                              alpha=alphas))  # fmt: skip
        sweep.rename(out)

    digest = stages.run("merge-offline", out, key, build)
    return [
        _Model(out / alpha_folder(a), digest, "merge", run.seed, lr=run.lr, alpha=a)
        for a in settings.merge_alphas
    ]


def _eval_stages(
    stages: _Stages,
    folder: Path,
    world: tuple[str, dict[str, Path]],
    models: list[_Model],
    placement: Placement | None = None,
) -> list[tuple[_Model, dict[str, Any]]]:
    """Every model's ``omotool eval`` reports on both splits (cached per model, keyed by the
    model's stage, and by ``placement`` when it is not the CPU in float32):
    ``(model, {"validation": evaluation, "test": evaluation})``."""
    from omotool.demo.world import SPLITS
    from omotool.eval.device import resolve_placement
    from omotool.eval.runner import run_suite
    from omotool.eval.suite import load_suite

    placement = placement or resolve_placement("cpu", "float32")
    where = {} if placement.is_default else {
        "device": placement.device.type, "dtype": placement.dtype_name
    }  # fmt: skip
    suites = {split: load_suite(world[1][f"suite-{split}"]) for split in SPLITS}
    evaluated = []
    for model in models:
        inside = model.path.is_relative_to(folder)  # the real track's base model is not
        name = str(model.path.relative_to(folder)).replace("/", "__") if inside else model.method
        out = folder / "eval" / name
        key = {"stage": "eval", "world": world[0], "model": model.digest, "alpha": model.alpha,
               **where}  # fmt: skip

        def build(out: Path = out, model: _Model = model) -> None:
            out.mkdir(parents=True, exist_ok=True)
            for split, suite in suites.items():
                report = run_suite(
                    [str(model.path)], suite, device=placement.device, dtype=placement.dtype
                )
                write_text_atomic(out / f"{split}.json", json.dumps(report, indent=2))

        stages.run("eval", out, key, build)
        reports = {
            split: json.loads((out / f"{split}.json").read_text())["models"][0] for split in SPLITS
        }
        evaluated.append((model, reports))
    return evaluated
