"""The demo's figures in the docs, rendered from the committed results file, never typed.

``README.md`` and ``docs/demo.md`` hold marked sections::

    <!-- demo:summary:begin -->  ...  <!-- demo:summary:end -->
    <!-- demo:details:begin -->  ...  <!-- demo:details:end -->

whose text is exactly ``report.summary_markdown`` / ``report.details_markdown`` of
``docs/results/demo.json`` (which ``omotool demo --results`` writes), and
``<!-- demo:robustness:... -->``: the same run against re-runs on other settings of the
machine (``docs/results/demo-<variant>.json``, e.g. two threads). The GRPO track's section
``grpo-details`` renders ``docs/results/grpo.json`` (``omotool demo --track grpo --results``)
the same way, ``lora-details`` (docs/demo.md) and ``lora-summary`` (README.md: one line of
verdicts) render ``docs/results/lora.json`` (``omotool demo --track lora --results``), and
``cost`` each committed run's command, machine, date and time (from the
results files' provenance). ``real-details`` (docs/real-model.md) renders
``docs/results/real.json`` (``omotool demo --track real --results``).
``scripts/render_docs.py`` rewrites them (and the plots); a test fails when a document differs
from the render.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omotool.errors import InputError

RESULTS = Path("docs/results/demo.json")
PLOT = Path("docs/demo-tradeoff.png")
GRPO_RESULTS = Path("docs/results/grpo.json")  # the grpo track's
GRPO_PLOT = Path("docs/demo-grpo-tradeoff.png")
LORA_RESULTS = Path("docs/results/lora.json")  # the lora track's
LORA_PLOT = Path("docs/demo-lora-tradeoff.png")
REAL_RESULTS = Path("docs/results/real.json")  # the real track's
REAL_PLOT = Path("docs/demo-real-tradeoff.png")
# document -> the sections it holds
DOCUMENTS: dict[str, tuple[str, ...]] = {
    "README.md": ("summary", "lora-summary"),
    "docs/demo.md": ("details", "robustness", "grpo-details", "lora-details", "cost"),
    "docs/real-model.md": ("real-details",),
}


def render_sections(root: Path) -> dict[str, str]:
    """Every section's text, from the results files under ``root``."""
    from omotool.demo.markdown import (
        details_markdown,
        lora_summary_markdown,
        robustness_markdown,
        summary_markdown,
    )

    results = load_results(root / RESULTS)
    grpo = load_results(root / GRPO_RESULTS, "--track grpo ", GRPO_RESULTS)
    lora = (  # optional: the docs say how to make it until it is committed
        load_results(root / LORA_RESULTS, "--track lora ", LORA_RESULTS)
        if (root / LORA_RESULTS).exists()
        else None
    )
    real = (
        load_results(root / REAL_RESULTS, "--track real ", REAL_RESULTS)
        if (root / REAL_RESULTS).exists()
        else None
    )
    missing = f"Not made yet: `omotool demo --track lora --results {LORA_RESULTS}`.\n"
    variants = {
        path.stem.removeprefix("demo-"): load_results(path)
        for path in sorted((root / RESULTS.parent).glob("demo-*.json"))
    }
    return {
        "summary": summary_markdown(results),
        "details": details_markdown(results),
        "robustness": robustness_markdown(results, variants),
        "grpo-details": details_markdown(grpo),
        "lora-details": details_markdown(lora) if lora else missing,
        "lora-summary": lora_summary_markdown(lora) if lora else missing,
        "real-details": details_markdown(real)
        if real
        else f"Not made yet: `omotool demo --track real --results {REAL_RESULTS}`.\n",
        "cost": cost_markdown(results, grpo, variants, lora, real),
    }


def cost_markdown(
    results: dict[str, Any],
    grpo: dict[str, Any],
    variants: dict[str, dict[str, Any]],
    lora: dict[str, Any] | None = None,
    real: dict[str, Any] | None = None,
) -> str:
    """One line per committed run: its command, machine, date and seconds (its provenance)."""

    def line(name: str, made: dict[str, Any], seeds: int) -> str:
        seconds = made.get("seconds", 0)
        return (
            f"| {name} | `{made.get('command')}` | {made.get('date')} | {made.get('cpu')}, "
            f"ATen {made.get('cpu_capability')}, {made.get('threads')} thread(s) | "
            f"{seconds:.0f} s ({seconds / 60:.1f} min; {seconds / seeds:.0f} s a seed) | "
            + (f"{made['peak_memory_gb']:.1f} GB |" if made.get("peak_memory_gb") else "|")
        )

    rows = [("DPO track", results), ("GRPO track", grpo)]
    rows += [("LoRA track", lora)] if lora is not None else []
    rows += [("Real-model track", real)] if real is not None else []
    rows += [(f"DPO track, {name}", variant) for name, variant in variants.items()]
    lines = ["| run | command | date | machine | time | peak memory |", "|---|---|---|---|---|---|"]
    lines += [line(n, r["provenance"], r["settings"]["seeds"]) for n, r in rows]
    return "\n".join(lines) + "\n"


def _pattern(section: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- demo:{section}:begin -->\n)(.*?)(<!-- demo:{section}:end -->)", re.DOTALL
    )


def render_text(text: str, sections: tuple[str, ...], rendered: dict[str, str], name: str) -> str:
    """``text`` with each named section replaced by its ``rendered`` text."""
    for section in sections:
        pattern = _pattern(section)
        if not pattern.search(text):
            raise InputError(f"{name} has no <!-- demo:{section}:begin/end --> markers.")
        body = rendered[section]
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(3), text, count=1)
    return text


def load_results(path: Path, options: str = "", target: Path = RESULTS) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path}: {error}; make it with `omotool demo {options}--results {target}`."
        ) from None


def stale_documents(root: Path) -> list[str]:
    """The documents under ``root`` whose marked sections differ from the render."""
    rendered = render_sections(root)
    stale = []
    for name, sections in DOCUMENTS.items():
        text = (root / name).read_text(encoding="utf-8")
        if render_text(text, sections, rendered, name) != text:
            stale.append(name)
    return stale


def render_documents(root: Path, plot: bool = True) -> list[str]:
    """Rewrite the marked sections (and the plot) from the results file; returns what changed."""
    from omotool.demo.report import plot_frontiers
    from omotool.io.formats import write_text_atomic

    rendered = render_sections(root)
    changed = []
    for name, sections in DOCUMENTS.items():
        text = (root / name).read_text(encoding="utf-8")
        new = render_text(text, sections, rendered, name)
        if new != text:
            write_text_atomic(root / name, new)
            changed.append(name)
    figures = ((RESULTS, PLOT), (GRPO_RESULTS, GRPO_PLOT), (LORA_RESULTS, LORA_PLOT),
               (REAL_RESULTS, REAL_PLOT))  # fmt: skip
    for results, figure in figures:
        if results in (LORA_RESULTS, REAL_RESULTS) and not (root / results).exists():
            continue
        if plot and plot_frontiers(load_results(root / results), root / figure) is not None:
            changed.append(str(figure))
    return changed
