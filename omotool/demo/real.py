"""The ``real`` track of ``omotool demo``: the dpo track's question asked of a real pretrained
model, SmolLM2-135M-Instruct (``make real-model``), on a skill it lacks.

Per seed, under ``real/seed-<s>/`` of the work dir (``omotool.demo.real_data`` says what the
data are):

1. ``data``: the seed's SFT sums, preference pairs and evaluation rows, the facts the base
   model knows and the prose paragraphs, and the two suites (``validation``, ``test``):
   ``polite`` (reward: a request answered with "glad to help"), ``sums`` (the SFT skill),
   ``facts`` (what pre-training taught) and ``prose`` (perplexity, reported, not averaged);
2. ``sft``: ``omotool train --algo sft`` of the base model on the sums; ``tau``: ``omotool
   delta``;
3. ``runs/<method>/...``: ``omotool train --algo dpo`` with AdamW, OnDARE and OnTIES over the
   track's grids; ``merges``: the offline-merge sweep of an AdamW run;
4. ``eval/<model>``: ``omotool eval`` of the base model, the SFT model, every run and merge.

The facts stage (``real/facts``, shared by the seeds: the base model is one) keeps the
candidate questions the base model answers right, greedy, before any training. The results
add the SFT gate (``sft_gate``): a tax is reported only where SFT taught the skill, its test
accuracy at least ``REAL_GATE`` above the base model's; otherwise the verdicts say the SFT
failed and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from omotool import __version__
from omotool.errors import InputError
from omotool.io.formats import write_jsonl, write_text_atomic

if TYPE_CHECKING:
    from omotool.demo.settings import DemoSettings
    from omotool.demo.stages import _Model, _Stages
    from omotool.eval.device import Placement

DEFAULT_MODEL = Path("models") / "smollm2-135m-instruct"  # where `make real-model` writes it
MODEL_ENV = "OMOTOOL_SMOLLM2_DIR"
SOURCE = "omotool-source.json"  # written by scripts/get_smollm2.sh
SKILL = "sums"  # the task the SFT gate reads
REAL_GATE = 0.5  # SFT's skill accuracy must exceed the base model's by this much (test)
GENERATION = {"max_new_tokens": 16, "until": ["\n"]}


def resolve_model(model: str | None) -> Path:
    """The base model folder: ``model``, else ``$OMOTOOL_SMOLLM2_DIR``, else
    ``models/smollm2-135m-instruct``; ``InputError`` naming ``make real-model`` when it holds
    no model."""
    folder = Path(model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    if not (folder / "config.json").is_file():
        raise InputError(
            f"the real track's model folder {folder} holds no model: run `make real-model` "
            f"(or give --model, or set {MODEL_ENV})."
        )
    return folder.resolve()


def model_digest(folder: Path) -> str:
    """The base model's key: its ``config.json`` and where it came from (``omotool-source.json``
    from ``make real-model``, with the checksum of the file it was made from), or the hash of
    its weights for any other folder."""
    hasher = hashlib.sha256((folder / "config.json").read_bytes())
    source = folder / SOURCE
    if source.is_file():
        hasher.update(source.read_bytes())
    else:
        for weights in sorted(folder.glob("*.safetensors")):
            with weights.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    hasher.update(block)
    return hasher.hexdigest()[:16]


def real_replicate(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    seed: int,
    placement: Placement | None,
    model: Path,
) -> list[tuple[_Model, dict[str, Any]]]:
    """One seed of the real track (see module docstring)."""
    from omotool.demo.stages import (
        _eval_stages,
        _grid_stages,
        _merge_stages,
        _Model,
        _tau_stage,
        _train,
    )

    base = model_digest(model)
    facts = _facts_stage(stages, folder.parent / "facts", settings, model, base, placement)
    data = _data_stage(stages, folder, settings, seed, facts)
    out = folder / "sft"
    options = {"algo": "sft", "merge": "none", "lr": settings.real_sft_lr, "epochs": 1.0,
               "batch_size": settings.real_sft_batch, "max_length": 64, "warmup_steps": 5,
               "lr_scheduler": "cosine", "seed": seed}  # fmt: skip
    key = {"stage": "sft", "data": data[0], "base": base, **options}
    sft = stages.run(
        "sft", out, key,
        lambda: _train(out, model=str(model), dataset=str(data[1]["sft"]), **options),
    )  # fmt: skip
    tau = _tau_stage(stages, folder, model, base, sft)
    dpo = {"algo": "dpo", "beta": settings.beta, "epochs": settings.real_dpo_epochs,
           "batch_size": settings.real_dpo_batch, "max_length": 64}  # fmt: skip
    models = _grid_stages(
        stages, folder, folder / "runs", settings, seed, ("train", {"data": data[0]}),
        (sft, tau), data[1]["prefs-train"], dpo, settings.methods(),
    )  # fmt: skip
    models += _merge_stages(stages, folder, settings, sft, models, folder)
    evaluated = [_Model(model, base, "base", seed), _Model(folder / "sft", sft, "sft", seed)]
    return _eval_stages(stages, folder, data, [*evaluated, *models], placement)


def _facts_stage(
    stages: _Stages,
    out: Path,
    settings: DemoSettings,
    model: Path,
    base: str,
    placement: Placement | None,
) -> str:
    """The base model's greedy answers to the candidate facts (``answers.jsonl``) and the ones
    it got right, halved into ``facts-<split>.jsonl``."""
    from omotool.demo.real_data import FACTS_FILE, kept_facts, read_facts

    candidates = read_facts()[: settings.real_facts or None]
    key = {"stage": "facts", "base": base, "generation": GENERATION, "count": len(candidates),
           "facts": hashlib.sha256(FACTS_FILE.read_bytes()).hexdigest()[:16]}  # fmt: skip

    def build() -> None:
        from omotool.eval.device import resolve_placement
        from omotool.eval.generation import GenerationSettings, generate_answers
        from omotool.eval.runner import load_causal_lm

        where = placement or resolve_placement("cpu", "float32")
        loaded, tokenizer = load_causal_lm(str(model), where)
        answers = generate_answers(
            loaded, tokenizer, [c["prompt"] for c in candidates],
            GenerationSettings(max_new_tokens=GENERATION["max_new_tokens"],
                               until=tuple(GENERATION["until"])), batch_size=16,
        )  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        rows = [{**c, "answer": a} for c, a in zip(candidates, answers, strict=True)]
        write_jsonl(out / "answers.jsonl", rows)
        for split, kept in kept_facts(candidates, answers).items():
            write_jsonl(out / f"facts-{split}.jsonl", kept)

    return stages.run("facts", out, key, build)


def _data_stage(
    stages: _Stages,
    folder: Path,
    settings: DemoSettings,
    seed: int,
    facts: str,
) -> tuple[str, dict[str, Path]]:
    """The seed's data files and suites (see module docstring)."""
    from omotool.demo.real_data import POLITE_PATTERN, RealSizes, make_real_data, prose_paragraphs
    from omotool.demo.world import SPLITS

    out = folder / "data"
    sizes = RealSizes(
        sft=settings.real_sft_rows, requests=settings.real_sft_requests,
        polite_share=settings.real_style_rate, prefs=settings.real_pref_rows,
        sums=settings.real_sums_rows, polite=settings.real_polite_rows, prose=settings.real_prose,
    )  # fmt: skip
    prose = prose_paragraphs(sizes.prose)  # CPython's own text: it differs between versions
    prose_digest = hashlib.sha256(json.dumps(prose, sort_keys=True).encode()).hexdigest()[:16]
    key = {"stage": "data", "omotool": __version__, "seed": seed, "facts": facts,
           "sizes": sizes.__dict__, "generation": GENERATION, "prose": prose_digest}  # fmt: skip

    def build() -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in make_real_data(seed, sizes).items():
            write_jsonl(out / f"{name}.jsonl", rows)
        for split, paragraphs in prose.items():
            write_text_atomic(out / f"prose-{split}.txt", "\n\n".join(paragraphs) + "\n")
        for split in SPLITS:
            known = (folder.parent / "facts" / f"facts-{split}.jsonl").read_text(encoding="utf-8")
            if not known.strip():
                raise InputError("the base model answered none of the candidate facts right.")
            write_text_atomic(out / f"facts-{split}.jsonl", known)
            suite = {
                "batch_size": 16,
                "generation": GENERATION,
                "tasks": [
                    {"name": "polite", "task": "generate", "data": f"polite-{split}.jsonl",
                     "category": "reward", "extract": "regex", "pattern": POLITE_PATTERN},
                    {"name": SKILL, "task": "generate", "data": f"sums-{split}.jsonl",
                     "category": "capability", "extract": "last_number"},
                    {"name": "facts", "task": "generate", "data": f"facts-{split}.jsonl",
                     "category": "capability", "extract": "contains"},
                    {"name": "prose", "task": "perplexity", "data": f"prose-{split}.txt",
                     "category": "capability"},
                ],
            }  # fmt: skip
            write_text_atomic(out / f"suite-{split}.yaml", yaml.safe_dump(suite, sort_keys=False))

    digest = stages.run("data", out, key, build)
    paths = {p.stem: p for p in out.iterdir() if p.suffix in (".jsonl", ".txt", ".yaml")}
    return digest, paths


def sft_gate(results: dict[str, Any]) -> dict[str, Any] | None:
    """Whether SFT taught the skill: the base and SFT models' mean test accuracy on ``SKILL``
    and whether SFT's exceeds the base model's by ``REAL_GATE`` (None without a base point)."""
    points = {p["method"]: p for p in results["points"] if p["method"] in ("base", "sft")}
    if set(points) != {"base", "sft"}:
        return None
    base = points["base"]["test"]["mean"][SKILL]
    sft = points["sft"]["test"]["mean"][SKILL]
    return {"task": SKILL, "base": base, "sft": sft, "needed": REAL_GATE,
            "taught": sft - base >= REAL_GATE}  # fmt: skip


def gate_verdicts(results: dict[str, Any]) -> list[str]:
    """The real track's verdicts: the gate's line first; only it when SFT failed."""
    gate = results["sft_gate"]
    line = (
        f"SFT on {gate['task']}: test accuracy {gate['base']:.3f} (base model) → "
        f"{gate['sft']:.3f} (SFT), a gain of {gate['sft'] - gate['base']:+.3f} against the "
        f"{gate['needed']:.1f} needed"
    )
    if not gate["taught"]:
        return [f"{line}: the SFT failed to teach the skill, so no tax and no comparison of "
                "methods is reported"]  # fmt: skip
    return [f"{line}: SFT taught the skill", *results["verdicts"]]
