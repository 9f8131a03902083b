"""``omotool demo``: the paper in miniature, each stage through the public commands' code.

A *seed* is a whole replicate of the pipeline: its own world (creatures, facts, strings, data
order), tokenizer and pre-trained base, SFT model, task vector and DPO runs, so the intervals
over seeds hold every source of variation a verdict depends on. Stages (each cached in the
work dir, keyed by its settings and its inputs' keys, so a second run skips what is done and
an interrupted run resumes at the stage it was in), under ``seed-<s>/``:

1. ``world``: the generated data (``omotool.demo.world``) and its two evaluation suites
   (``validation``: where settings are chosen; ``test``: what is reported);
2. ``base``: a tokenizer and a small Llama pre-trained on the world's corpus;
3. ``sft``: ``omotool train --algo sft --merge none`` of the base model on the SFT data;
4. ``tau``: ``omotool delta base sft``;
5. ``runs/<method>/lr-<lr>[-alpha-<α>]``: ``omotool train --algo dpo`` with AdamW, OnDARE
   (over learning rates × ``α``), OnTIES and ChildTuning (OnDARE with ``α = 0``);
6. ``merges``: ``omotool merge-offline`` sweep of an AdamW run over the merge weight;
7. ``eval/<model>``: ``omotool eval`` of every model on both suites;

then ``report.md``, ``results.json`` and ``tradeoff.png`` (``omotool.demo.report``).

The ``grpo`` track (``DemoSettings.track``) runs stages 1–4 in a world of its own, whose SFT
answers are polite more often (``grpo_style_rate``: sampled completions must differ in reward
for GRPO to learn), under ``grpo/seed-<s>/``, and replaces DPO by online RL:
``omotool train --algo grpo`` from the SFT model on the requests of the preference data, with
the rule that judges the style at evaluation as its reward (a completion that closes with
"glad to help" scores 1), with AdamW, OnDARE and OnTIES over their own grids
(``grpo/seed-<s>/grpo/runs/``), the offline-merge sweep of an AdamW run (``.../grpo/merges``),
the same evaluations, and its report in ``grpo/`` of the work dir.

The ``lora`` track asks the dpo track's question of LoRA adapters: the same worlds, seeds, SFT
models, τ, DPO data and options, with full AdamW (the dpo track's runs, ``seed-<s>/runs/adamw``,
shared when both tracks run in one work dir) and ``omotool train --lora-r`` with AdamW, OnDARE
and OnTIES over the LoRA grids (``seed-<s>/lora/runs/``), the dpo track's offline-merge sweep,
the same evaluations (an adapter folder is evaluated merged into its SFT model), and its report
in ``lora/`` of the work dir.

The ``real`` track asks the dpo track's question of a real pretrained model (SmolLM2-135M-
Instruct, ``make real-model``) on a skill it lacks: its stages are ``omotool.demo.real``'s,
under ``real/seed-<s>/``; it reuses this module's stage runner, grids, merges and evaluations.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omotool import __version__
from omotool.demo.stages import (
    LORA_METHODS,
    METHODS,
    Progress,
    _eval_stages,
    _grid_stages,
    _merge_stages,
    _Model,
    _Stages,
    _train,
)
from omotool.errors import OutputError, UsageError
from omotool.io.formats import write_text_atomic

if TYPE_CHECKING:
    from omotool.eval.device import Placement

WORKDIR_SIGN = "omotool-demo.json"  # in a work dir the demo made
TRACKS = ("dpo", "grpo", "lora", "real")
GRPO_METHODS = ("adamw", "ondare", "onties")


@dataclass(frozen=True)
class DemoSettings:
    """Every size and hyper-parameter of the miniature (see docs/demo.md for the choices)."""

    track: str = "dpo"  # dpo (the paper's setting), grpo (online RL), lora (DPO, adapters)
    seeds: int = 4  # whole-pipeline replicates: world, base, SFT, τ and DPO
    entities: int = 24
    reversals: int = 800
    brief_polite: bool = True  # the preferred answer states no facts (world.make_world)
    style_rate: float = 0.2  # share of SFT answers to requests that are polite
    held_out: float = 0.5  # share of creatures never described in training (reward prompts)
    vocab_size: int = 512
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 700
    sft_lr: float = 1e-3
    sft_epochs: float = 6.0
    dpo_epochs: float = 3.0
    dpo_batch: int = 8
    beta: float = 0.1
    reserve_p: float = 0.01
    lr_grid: tuple[float, ...] = (2e-5, 3e-5, 5e-5)  # AdamW, OnDARE, ChildTuning
    ties_lr_grid: tuple[float, ...] = (3e-4, 4e-4, 6e-4)  # OnTIES: only the top p moves
    dare_alphas: tuple[float, ...] = (1e-4, 1e-3)  # OnDARE's merge weight α (not tied to lr)
    ties_alphas: tuple[float, ...] = (1e-3,)  # OnTIES's α (inert here: not swept, see docs)
    merge_lr: float = 5e-5  # the AdamW run that merge-offline sweeps
    merge_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    max_new_tokens: int = 24
    # the grpo track: its own grids; completions are sampled up to max_new_tokens
    grpo_lr_grid: tuple[float, ...] = (3e-5, 6e-5, 1e-4)  # AdamW, OnDARE
    grpo_ties_lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # OnTIES: only the top p moves
    grpo_dare_alphas: tuple[float, ...] = (1e-3,)
    grpo_ties_alphas: tuple[float, ...] = (1e-3,)
    grpo_epochs: float = 2.0
    grpo_generations: int = 4  # completions per prompt
    grpo_batch: int = 16  # completions per step (4 prompts)
    grpo_merge_lr: float = 1e-4  # the AdamW run that merge-offline sweeps
    grpo_style_rate: float = 0.4  # the grpo track's world: SFT samples the polite answer
    # the lora track: the dpo track's full AdamW runs and these adapters (DPO options as above)
    lora_r: int = 8
    lora_alpha: float = 16.0  # scale s = lora_alpha / lora_r
    lora_lr_grid: tuple[float, ...] = (1e-4, 2e-4, 5e-4)  # LoRA-AdamW, LoRA-OnDARE
    lora_ties_lr_grid: tuple[float, ...] = (5e-4, 1e-3, 2e-3)  # LoRA-OnTIES
    lora_dare_alphas: tuple[float, ...] = (1e-3,)
    lora_ties_alphas: tuple[float, ...] = (1e-3,)
    # the real track (SmolLM2-135M-Instruct; omotool.demo.real): data sizes, SFT, DPO grids
    real_sft_rows: int = 960
    real_sft_requests: int = 160  # requests in the SFT data, real_style_rate of them polite
    real_style_rate: float = 0.25
    real_pref_rows: int = 64
    real_eval_rows: int = 40  # sums and requests per evaluation split
    real_prose: int = 16  # paragraphs per evaluation split
    real_facts: int = 0  # candidate facts asked (0: all)
    real_sft_lr: float = 1e-4
    real_sft_batch: int = 16
    real_dpo_epochs: float = 1.0
    real_dpo_batch: int = 8
    real_lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # AdamW, OnDARE
    real_ties_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 6e-4)  # OnTIES
    real_dare_alphas: tuple[float, ...] = (1e-3,)
    real_ties_alphas: tuple[float, ...] = (1e-3,)
    real_merge_lr: float = 3e-5

    def world_style_rate(self) -> float:
        """The share of polite SFT answers in the track's world."""
        return self.grpo_style_rate if self.track == "grpo" else self.style_rate

    def methods(self) -> tuple[str, ...]:
        """The trained methods of the track."""
        if self.track == "lora":
            return ("adamw", *LORA_METHODS)
        return tuple(METHODS) if self.track == "dpo" else GRPO_METHODS  # grpo, real

    def grid(self, method: str) -> list[tuple[float, float]]:
        """The (learning rate, α) settings ``method`` is trained at."""
        if method == "lora-adamw":
            return [(lr, 0.0) for lr in self.lora_lr_grid]
        if method == "lora-ondare":
            return [(lr, a) for lr in self.lora_lr_grid for a in self.lora_dare_alphas]
        if method == "lora-onties":
            return [(lr, a) for lr in self.lora_ties_lr_grid for a in self.lora_ties_alphas]
        prefix = {"grpo": "grpo_", "real": "real_"}.get(self.track, "")
        lrs = getattr(self, f"{prefix}lr_grid")
        if method in ("adamw", "childtuning"):  # AdamW merges nothing; ChildTuning: α = 0
            return [(lr, 0.0) for lr in lrs]
        if method == "onties":
            ties_lrs = getattr(self, f"{prefix}ties_lr_grid")
            return [(lr, a) for lr in ties_lrs for a in getattr(self, f"{prefix}ties_alphas")]
        return [(lr, a) for lr in lrs for a in getattr(self, f"{prefix}dare_alphas")]

    def merge_lr_of_track(self) -> float:
        """The learning rate of the AdamW run that merge-offline sweeps."""
        return {"grpo": self.grpo_merge_lr, "real": self.real_merge_lr}.get(
            self.track, self.merge_lr
        )


FAST = DemoSettings(
    seeds=1,
    reversals=600,
    pretrain_steps=400,
    lr_grid=(2e-5, 5e-5),
    ties_lr_grid=(3e-4, 6e-4),
    dare_alphas=(1e-3,),
    ties_alphas=(1e-3,),
    merge_alphas=(0.5,),
    grpo_lr_grid=(3e-5, 1e-4),
    grpo_ties_lr_grid=(3e-4, 3e-3),
    lora_lr_grid=(2e-4, 1e-3),
    lora_ties_lr_grid=(5e-4, 2e-3),
    real_sft_rows=320,
    real_sft_requests=64,
    real_pref_rows=32,
    real_eval_rows=16,
    real_prose=4,
    real_lr_grid=(3e-5,),
    real_ties_lr_grid=(3e-4,),
    real_merge_lr=3e-5,
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


def run_demo(
    workdir: str | Path,
    settings: DemoSettings = DemoSettings(),
    progress: Progress | None = None,
    threads: int | None = 1,
    command: str | None = None,
    placement: Placement | None = None,
    model: str | None = None,
) -> DemoRun:
    """Run (or resume) the demo in ``workdir``; see the module docstring for the stages.

    ``threads``: torch (and numba) threads while it runs, restored afterwards (None: leave
    them). One by default: the miniature's matrices are too small for intra-op threads to
    pay, and threads that spin-wait at every op's barrier slow a busy machine down manyfold.
    ``command``: how the run was started, recorded in the results' provenance.
    ``placement``: the device and dtype of the evaluation stages (``omotool eval``'s
    ``--device``/``--dtype``); the CPU in float32 when not given, as the committed results.
    Another placement is part of the evaluation stages' keys; the default is not, so the
    stages cached before it could be chosen are still found.
    ``model``: the real track's base model folder (``omotool.demo.real.resolve_model``)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(workdir, settings, progress, command, placement, model)
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    workdir: str | Path,
    settings: DemoSettings,
    progress: Progress | None,
    command: str | None,
    placement: Placement | None = None,
    model: str | None = None,
) -> DemoRun:
    from omotool.demo.markdown import write_demo_report
    from omotool.demo.provenance import provenance
    from omotool.demo.real import gate_verdicts, real_replicate, resolve_model, sft_gate
    from omotool.demo.report import build_results, plot_frontiers

    if settings.track not in TRACKS:
        raise UsageError(f"track {settings.track!r}: choose one of {', '.join(TRACKS)}.")
    real = resolve_model(model) if settings.track == "real" else None
    started = time.perf_counter()
    workdir = _claim_workdir(Path(workdir).resolve())
    stages = _Stages(workdir, progress)
    evaluations = []
    for seed in range(settings.seeds):
        folder = seeds_folder(workdir, settings) / f"seed-{seed}"
        if real is not None:
            evaluations += real_replicate(stages, folder, settings, seed, placement, real)
        else:
            evaluations += _replicate(stages, folder, settings, seed, placement)
    results = build_results(settings, evaluations)
    if real is not None:
        results["sft_gate"] = sft_gate(results)
        results["verdicts"] = gate_verdicts(results)
    seconds = time.perf_counter() - started
    results["provenance"] = provenance(command, seconds)
    out = report_folder(workdir, settings.track)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_frontiers(results, out / "tradeoff.png")
    report = write_demo_report(results, out, plot)
    return DemoRun(workdir, report, plot, results, stages.ran, stages.cached, seconds)


def report_folder(workdir: Path, track: str) -> Path:
    """Where a track's report, results and plot go: the work dir (dpo) or its ``<track>/``."""
    return workdir if track == "dpo" else workdir / track


def seeds_folder(workdir: Path, settings: DemoSettings) -> Path:
    """Where the ``seed-<s>/`` pipelines go: the work dir, shared by the tracks with the dpo
    track's world, or ``<track>/`` for a track with a world of its own (grpo: more polite
    SFT answers), whose world, base, SFT and τ stages would otherwise replace the shared ones."""
    own_world = settings.world_style_rate() != settings.style_rate or settings.track == "real"
    return workdir / settings.track if own_world else workdir


def _replicate(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    seed: int,
    placement: Placement | None = None,
) -> list[tuple[_Model, dict[str, Any]]]:
    """One whole pipeline (world to evaluations) for ``seed``."""
    common = {"omotool": __version__, "seed": seed}  # another version may make another world
    world = _world_stage(stages, folder, settings, common)
    base = _base_stage(stages, folder, settings, world, seed)
    sft = _sft_stage(stages, folder, settings, world, base, seed)
    tau = _tau_stage(stages, folder, base, sft)
    if settings.track == "grpo":
        models = _grpo_stages(stages, folder, settings, world, sft, tau, seed)
        models += _merge_stages(stages, folder, settings, sft, models, folder / "grpo")
    elif settings.track == "lora":
        models = _train_stages(stages, folder, settings, world, sft, tau, seed, ("adamw",))
        models += _merge_stages(stages, folder, settings, sft, models, folder)
        models += _train_stages(
            stages, folder, settings, world, sft, tau, seed, tuple(LORA_METHODS), lora=True
        )
    else:
        models = _train_stages(stages, folder, settings, world, sft, tau, seed)
        models += _merge_stages(stages, folder, settings, sft, models, folder)
    evaluated = [_Model(folder / "sft", sft, "sft", seed), *models]
    return _eval_stages(stages, folder, world, evaluated, placement)


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


def _world_stage(
    stages: _Stages, folder: Path, settings: DemoSettings, common: dict[str, Any]
) -> tuple[str, dict[str, Path]]:
    from omotool.demo.world import SPLITS, make_world, write_suite, write_world

    folder = folder / "world"
    key = {**common, "stage": "world", "entities": settings.entities,
           "reversals": settings.reversals, "brief_polite": settings.brief_polite,
           "style_rate": settings.world_style_rate(), "held_out": settings.held_out,
           "max_new_tokens": settings.max_new_tokens}  # fmt: skip

    def build() -> None:
        world = make_world(
            common["seed"], settings.entities, reversals=settings.reversals,
            brief_polite=settings.brief_polite, style_rate=settings.world_style_rate(),
            held_out=settings.held_out,
        )  # fmt: skip
        paths = write_world(world, folder)
        for split in SPLITS:
            write_suite(paths, folder / f"suite-{split}.yaml", split, settings.max_new_tokens)

    digest = stages.run("world", folder, key, build)
    paths = {p.stem: p for p in folder.iterdir() if p.suffix in (".jsonl", ".txt", ".yaml")}
    return digest, paths


def _base_stage(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    seed: int,
) -> str:
    from omotool.demo.pretrain import pretrain
    from omotool.demo.world import read_jsonl
    from omotool.tiny_models import build_tokenizer

    folder = folder / "base"
    key = {"stage": "base", "world": world[0], "vocab": settings.vocab_size,
           "hidden": settings.hidden, "layers": settings.layers, "heads": settings.heads,
           "steps": settings.pretrain_steps, "seed": seed}  # fmt: skip

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
                stages.progress("base", f"seed {seed}: pre-training step {step}/"
                                f"{settings.pretrain_steps}, loss {loss:.3f}")  # fmt: skip

        pretrain(
            tokenizer, corpus, staging, hidden=settings.hidden, layers=settings.layers,
            heads=settings.heads, steps=settings.pretrain_steps, seed=seed, progress=tick,
        )  # fmt: skip
        staging.rename(folder)

    return stages.run("base", folder, key, build)


def _sft_stage(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    base: str,
    seed: int,
) -> str:
    out = folder / "sft"
    options = {
        "algo": "sft",
        "merge": "none",
        "lr": settings.sft_lr,
        "epochs": settings.sft_epochs,
        "batch_size": 16,
        "max_length": 64,
        "warmup_steps": 10,
        "lr_scheduler": "cosine",
        "seed": seed,
    }
    key = {"stage": "sft", "world": world[0], "base": base, **options}
    model, dataset = str(folder / "base"), str(world[1]["sft"])
    return stages.run("sft", out, key, lambda: _train(out, model=model, dataset=dataset, **options))


def _tau_stage(stages: _Stages, folder: Path, base: str, sft: str) -> str:
    from omotool.delta import DeltaConfig, compute_delta

    out = folder / "tau"
    key = {"stage": "tau", "base": base, "sft": sft}
    config = DeltaConfig(base=str(folder / "base"), sft=str(folder / "sft"), out=str(out))
    return stages.run("delta", out, key, lambda: compute_delta(config))


def _train_stages(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    sft: str,
    tau: str,
    seed: int,
    methods: tuple[str, ...] | None = None,
    lora: bool = False,
) -> list[_Model]:
    """The dpo track's runs (of ``methods``, all when None): ``omotool train --algo dpo`` on
    the preference pairs, in ``runs/``; with ``lora``, the lora track's adapters
    (``--lora-r``/``--lora-alpha``, every linear layer but the head) in ``lora/runs/``."""
    dpo = {"algo": "dpo", "beta": settings.beta, "epochs": settings.dpo_epochs,
           "batch_size": settings.dpo_batch, "max_length": 96}  # fmt: skip
    if lora:  # the adapters' runs key on these too; full AdamW's keys stay the dpo track's
        dpo.update(lora_r=settings.lora_r, lora_alpha=settings.lora_alpha)
    return _grid_stages(
        stages, folder, folder / "lora" / "runs" if lora else folder / "runs", settings, seed,
        ("train", {"world": world[0]}), (sft, tau), world[1]["prefs-train"], dpo,
        methods or settings.methods(),
    )  # fmt: skip


def _grpo_stages(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    world: tuple[str, dict[str, Path]],
    sft: str,
    tau: str,
    seed: int,
) -> list[_Model]:
    """The grpo track's runs: ``omotool train --algo grpo`` from the SFT model on the
    preference data's requests, rewarded by the evaluation's style rule."""
    from omotool.demo.world import STYLE_PATTERN, read_jsonl

    data = folder / "grpo" / "data"
    prompts = data / "prompts.jsonl"

    def build_data() -> None:
        rows = [{"prompt": row["prompt"], "reference": "glad to help"}
                for row in read_jsonl(world[1]["prefs-train"])]  # fmt: skip
        data.mkdir(parents=True, exist_ok=True)
        write_text_atomic(prompts, "".join(json.dumps(row) + "\n" for row in rows))

    data_digest = stages.run("grpo-data", data, {"stage": "grpo-data", "world": world[0]},
                             build_data)  # fmt: skip
    grpo = {"algo": "grpo", "epochs": settings.grpo_epochs, "batch_size": settings.grpo_batch,
            "num_generations": settings.grpo_generations,
            "max_completion_length": settings.max_new_tokens, "reward": ["regex"],
            "reward_pattern": STYLE_PATTERN}  # fmt: skip
    return _grid_stages(
        stages, folder, folder / "grpo" / "runs", settings, seed, ("grpo", {"data": data_digest}),
        (sft, tau), prompts, grpo, settings.methods(),
    )  # fmt: skip


def settings_for(fast: bool, seeds: int | None = None, track: str = "dpo") -> DemoSettings:
    """The full or ``--fast`` settings of ``track``, with ``seeds`` if given (the real track:
    one seed unless given, see docs/real-model.md)."""
    if track not in TRACKS:
        raise UsageError(f"--track {track!r}: choose one of {', '.join(TRACKS)}.")
    chosen = replace(FAST if fast else DemoSettings(), track=track)
    if track == "real":
        chosen = replace(chosen, seeds=1)
    return replace(chosen, seeds=seeds) if seeds is not None else chosen
