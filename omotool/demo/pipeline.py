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
under ``real/seed-<s>/``; it shares the stage runner, grids, merges and evaluations of
``omotool.demo.stages`` with the other tracks; ``omotool.demo.settings`` holds every track's
sizes and grids.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omotool import __version__
from omotool.demo.settings import TRACKS, DemoSettings
from omotool.demo.stages import (
    LORA_METHODS,
    Progress,
    _eval_stages,
    _grid_stages,
    _merge_stages,
    _Model,
    _Stages,
    _tau_stage,
    _train,
)
from omotool.errors import OutputError, UsageError
from omotool.io.formats import write_jsonl, write_text_atomic

if TYPE_CHECKING:
    from omotool.eval.device import Placement

WORKDIR_SIGN = "omotool-demo.json"  # in a work dir the demo made


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
    tau = _tau_stage(stages, folder, folder / "base", base, sft)
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
        write_jsonl(prompts, rows)

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
