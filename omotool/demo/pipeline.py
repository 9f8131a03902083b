"""``omotool demo``: the paper in miniature, each stage through the public commands' code.

Stages (each cached in the work dir, keyed by its settings and its inputs' keys, so a second
run skips what is done and an interrupted run resumes at the stage it was in):

1. ``world``: the generated data (``omotool.demo.world``) and the evaluation suite;
2. ``base``: a tokenizer and a small Llama pre-trained on the world's corpus;
3. ``sft``: ``omotool train --algo sft --merge none`` of the base model on the SFT data;
4. ``tau``: ``omotool delta base sft``;
5. ``runs/<method>/lr-<lr>/seed-<s>``: ``omotool train --algo dpo`` with AdamW, OnDARE, OnTIES
   and ChildTuning (OnDARE with ``α = 0``), each over its own learning-rate grid and seeds;
6. ``merges/seed-<s>``: ``omotool merge-offline`` sweep of an AdamW run over ``α``;
7. ``eval/``: ``omotool eval`` of every model on the suite (one cached report per model);
8. ``report.md``, ``results.json``, ``tradeoff.png``: ``omotool.demo.report``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omotool import __version__
from omotool.errors import OutputError
from omotool.io.formats import write_text_atomic

MARKER = "demo-stage.json"  # in each finished stage's folder
WORKDIR_SIGN = "omotool-demo.json"  # in a work dir the demo made
METHODS: dict[str, dict[str, Any]] = {  # name: omotool train options
    "adamw": {"merge": "none"},
    "ondare": {"merge": "dare"},
    "onties": {"merge": "ties"},
    "childtuning": {"merge": "dare", "alpha_ratio": 0.0},
}


@dataclass(frozen=True)
class DemoSettings:
    """Every size and hyper-parameter of the miniature (see docs/demo.md for the choices)."""

    world_seed: int = 0
    entities: int = 24
    reversals: int = 800
    vocab_size: int = 512
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 1000
    sft_lr: float = 1e-3
    sft_epochs: float = 6.0
    dpo_epochs: float = 3.0
    dpo_batch: int = 8
    beta: float = 0.1
    reserve_p: float = 0.01
    alpha_ratio: float = 1.0  # OnDARE / OnTIES α = alpha_ratio × lr
    lr_grid: tuple[float, ...] = (1.5e-5, 2e-5, 3e-5, 5e-5)  # AdamW, OnDARE, ChildTuning
    ties_lr_grid: tuple[float, ...] = (2e-4, 3e-4, 4e-4, 6e-4)  # OnTIES: only the top p moves
    merge_lr: float = 5e-5  # the AdamW run that merge-offline sweeps
    merge_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    seeds: int = 3
    max_new_tokens: int = 24

    def grid(self, method: str) -> tuple[float, ...]:
        return self.ties_lr_grid if method == "onties" else self.lr_grid


FAST = DemoSettings(
    reversals=600,
    pretrain_steps=600,
    lr_grid=(2e-5, 5e-5),
    ties_lr_grid=(3e-4, 6e-4),
    merge_alphas=(0.5,),
    seeds=1,
)


@dataclass
class DemoRun:
    """What one ``run_demo`` did: the output files and which stages ran or came from cache."""

    workdir: Path
    report: Path
    plot: Path | None
    results: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0


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


def run_demo(
    workdir: str | Path,
    settings: DemoSettings = DemoSettings(),
    progress: Progress | None = None,
    threads: int | None = 1,
) -> DemoRun:
    """Run (or resume) the demo in ``workdir``; see the module docstring for the stages.

    ``threads``: torch (and numba) threads while it runs, restored afterwards (None: leave
    them). One by default: the miniature's matrices are too small for intra-op threads to
    pay, and threads that spin-wait at every op's barrier slow a busy machine down manyfold."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(workdir, settings, progress)
    finally:
        torch.set_num_threads(previous)


def _run_demo(workdir: str | Path, settings: DemoSettings, progress: Progress | None) -> DemoRun:
    from omotool.demo.report import build_results, plot_frontiers, write_demo_report

    started = time.perf_counter()
    workdir = _claim_workdir(Path(workdir).resolve())
    stages = _Stages(workdir, progress)
    common = {"omotool": __version__}  # another version may generate another world
    world = _world_stage(stages, workdir, settings, common)
    base = _base_stage(stages, workdir, settings, world)
    sft = _sft_stage(stages, workdir, settings, world, base)
    tau = _tau_stage(stages, workdir, base, sft)
    models = _train_stages(stages, workdir, settings, world, sft, tau)
    models += _merge_stages(stages, workdir, settings, sft, models)
    evaluations = _eval_stages(stages, workdir, settings, world, sft, models)
    results = build_results(settings, evaluations)
    plot = plot_frontiers(results, workdir / "tradeoff.png")
    seconds = time.perf_counter() - started
    report = write_demo_report(results, workdir, plot, seconds)
    return DemoRun(workdir, report, plot, results, stages.ran, stages.cached, seconds)


def _claim_workdir(workdir: Path) -> Path:
    """Create the work dir, or accept one the demo made: stages replace their own folders,
    so a folder holding anything else is refused rather than written into."""
    sign = workdir / WORKDIR_SIGN
    if workdir.exists() and not workdir.is_dir():
        raise OutputError(f"--workdir {workdir} is a file; give a folder for the demo.")
    if workdir.exists() and any(workdir.iterdir()) and not sign.exists():
        raise OutputError(
            f"--workdir {workdir} holds files the demo did not make; give a new or empty "
            "folder (the demo replaces the folders of its stages)."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if not sign.exists():
        write_text_atomic(sign, json.dumps({"omotool": __version__, "kind": "demo"}) + "\n")
    return workdir


@dataclass(frozen=True)
class _Model:
    """A model folder of the demo and where it sits in the comparison."""

    path: Path
    digest: str
    method: str  # sft | adamw | ondare | onties | childtuning | merge
    lr: float | None = None
    seed: int | None = None
    alpha: float | None = None


def _world_stage(
    stages: _Stages, workdir: Path, settings: DemoSettings, common: dict[str, Any]
) -> tuple[str, dict[str, Path]]:
    from omotool.demo.world import make_world, write_suite, write_world

    folder = workdir / "world"
    key = {**common, "stage": "world", "seed": settings.world_seed, "entities": settings.entities,
           "reversals": settings.reversals, "max_new_tokens": settings.max_new_tokens}  # fmt: skip

    def build() -> None:
        world = make_world(settings.world_seed, settings.entities, reversals=settings.reversals)
        paths = write_world(world, folder)
        write_suite(paths, folder / "suite.yaml", settings.max_new_tokens)

    digest = stages.run("world", folder, key, build)
    paths = {p.stem: p for p in folder.iterdir() if p.suffix in (".jsonl", ".txt", ".yaml")}
    return digest, paths


def _base_stage(
    stages: _Stages, workdir: Path, settings: DemoSettings, world: tuple[str, dict[str, Path]]
) -> str:
    from omotool.demo.pretrain import pretrain
    from omotool.demo.world import read_jsonl
    from omotool.tiny_models import build_tokenizer

    folder = workdir / "base"
    key = {"stage": "base", "world": world[0], "vocab": settings.vocab_size,
           "hidden": settings.hidden, "layers": settings.layers, "heads": settings.heads,
           "steps": settings.pretrain_steps}  # fmt: skip

    def build() -> None:
        corpus = world[1]["corpus"].read_text(encoding="utf-8").splitlines()
        chats = [
            " ".join(turn["content"] for part in ("prompt", "completion") for turn in row[part])
            for row in read_jsonl(world[1]["sft"])
        ]
        tokenizer = build_tokenizer(None, settings.vocab_size, corpus + chats)
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)

        def tick(step: int, loss: float) -> None:
            if step % 100 == 0 or step == settings.pretrain_steps:
                stages.progress("base", f"pre-training step {step}/{settings.pretrain_steps}, "
                                f"loss {loss:.3f}")  # fmt: skip

        pretrain(
            tokenizer, corpus, staging, hidden=settings.hidden, layers=settings.layers,
            heads=settings.heads, steps=settings.pretrain_steps, progress=tick,
        )  # fmt: skip
        staging.rename(folder)

    return stages.run("base", folder, key, build)


def _train(out: Path, **options: Any) -> None:
    """``omotool train`` (its library entry point) with the demo's quiet defaults."""
    from omotool.train.runner import TrainConfig, run_training

    result = run_training(TrainConfig(out=str(out), overwrite=True, **options))
    if result.interrupted:  # Ctrl-C: the stage stays unfinished (no marker) and is redone
        raise KeyboardInterrupt


def _sft_stage(
    stages: _Stages,
    workdir: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    base: str,
) -> str:
    folder = workdir / "sft"
    options = {
        "algo": "sft",
        "merge": "none",
        "lr": settings.sft_lr,
        "epochs": settings.sft_epochs,
        "batch_size": 16,
        "max_length": 64,
        "warmup_steps": 10,
        "lr_scheduler": "cosine",
    }
    key = {"stage": "sft", "world": world[0], "base": base, **options}
    return stages.run(
        "sft",
        folder,
        key,
        lambda: _train(
            folder, model=str(workdir / "base"), dataset=str(world[1]["sft"]), **options
        ),
    )


def _tau_stage(stages: _Stages, workdir: Path, base: str, sft: str) -> str:
    from omotool.delta import DeltaConfig, compute_delta

    folder = workdir / "tau"
    key = {"stage": "tau", "base": base, "sft": sft}
    return stages.run(
        "delta",
        folder,
        key,
        lambda: compute_delta(
            DeltaConfig(base=str(workdir / "base"), sft=str(workdir / "sft"), out=str(folder))
        ),
    )


def _lr_name(lr: float) -> str:
    return f"lr-{lr:g}"


def _train_stages(
    stages: _Stages,
    workdir: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    sft: str,
    tau: str,
) -> list[_Model]:
    models = []
    for seed in range(settings.seeds):
        for method, preset in METHODS.items():
            for lr in settings.grid(method):
                folder = workdir / "runs" / method / _lr_name(lr) / f"seed-{seed}"
                alpha = preset.get("alpha_ratio", settings.alpha_ratio) * lr
                options = {"algo": "dpo", "merge": preset["merge"], "lr": lr, "seed": seed,
                           "beta": settings.beta, "epochs": settings.dpo_epochs,
                           "batch_size": settings.dpo_batch, "max_length": 96,
                           "reserve_p": settings.reserve_p, "alpha": alpha}  # fmt: skip
                key = {"stage": "train", "world": world[0], "sft": sft, "tau": tau, **options}
                inputs = {"model": str(workdir / "sft"), "dataset": str(world[1]["prefs-train"])}
                if preset["merge"] != "none":
                    inputs["task_vector"] = str(workdir / "tau")
                build = functools.partial(_train, folder, **options, **inputs)
                digest = stages.run("train", folder, key, build)
                models.append(_Model(folder, digest, method, lr=lr, seed=seed))
    return models


def _merge_stages(
    stages: _Stages, workdir: Path, settings: DemoSettings, sft: str, runs: list[_Model]
) -> list[_Model]:
    from omotool.merge_offline import MergeConfig, alpha_folder, run_merge

    merged = []
    for run in runs:
        if run.method != "adamw" or run.lr != settings.merge_lr:
            continue
        folder = workdir / "merges" / f"seed-{run.seed}"
        alphas = ",".join(f"{a:g}" for a in settings.merge_alphas)
        key = {"stage": "merge", "sft": sft, "rlhf": run.digest, "alphas": alphas}

        def build(folder: Path = folder, run: _Model = run, alphas: str = alphas) -> None:
            sweep = folder.with_name(folder.name + ".sweep")
            shutil.rmtree(sweep, ignore_errors=True)
            out = sweep
            if len(settings.merge_alphas) == 1:  # one alpha: merge-offline writes one model
                sweep.mkdir(parents=True)
                out = sweep / alpha_folder(settings.merge_alphas[0])
            run_merge(MergeConfig(sft=str(workdir / "sft"), rlhf=str(run.path),
                                  out=str(out), alpha=alphas))  # fmt: skip
            sweep.rename(folder)

        digest = stages.run("merge-offline", folder, key, build)
        merged += [
            _Model(folder / alpha_folder(a), digest, "merge", lr=run.lr, seed=run.seed, alpha=a)
            for a in settings.merge_alphas
        ]
    return merged


def _eval_stages(
    stages: _Stages,
    workdir: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    sft: str,
    models: list[_Model],
) -> list[tuple[_Model, dict[str, Any]]]:
    """Every model's ``omotool eval`` report (cached per model, keyed by the model's stage)."""
    from omotool.eval.runner import run_suite
    from omotool.eval.suite import load_suite

    suite = load_suite(world[1]["suite"])
    everything = [_Model(workdir / "sft", sft, "sft"), *models]
    evaluated = []
    for model in everything:
        name = str(model.path.relative_to(workdir)).replace("/", "__")
        folder = workdir / "eval" / name
        key = {"stage": "eval", "world": world[0], "model": model.digest,
               "alpha": model.alpha}  # fmt: skip

        def build(folder: Path = folder, model: _Model = model) -> None:
            report = run_suite([str(model.path)], suite)
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / "report.json", json.dumps(report, indent=2))

        stages.run("eval", folder, key, build)
        report = json.loads((folder / "report.json").read_text())
        evaluated.append((model, report["models"][0]))
    return evaluated


def settings_for(fast: bool, seeds: int | None = None) -> DemoSettings:
    """The full or ``--fast`` settings, with ``seeds`` if given."""
    chosen = FAST if fast else DemoSettings()
    return replace(chosen, seeds=seeds) if seeds is not None else chosen
