"""The demo's results as Markdown: the short summary (README, the command's output), the
details (docs/demo.md, report.md) and the comparison of re-runs on other machine settings.
Every figure comes from a results file (``report.build_results``); nothing here computes.
``write_demo_report`` saves the results and their long form side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omotool.demo.report import (
    FRONTIER,
    LABELS,
    TAX_KEY,
    TRAINED,
    find_point,
    fmt_interval,
    setting_name,
    verdict_words,
    write_results,
)


def _cell(summary: dict[str, dict[str, float]], key: str, seeds: int) -> str:
    mean, std = summary["mean"][key], summary["std"][key]
    return f"{mean:.3f}" if seeds < 2 else f"{mean:.3f} ± {std:.3f}"


def provenance_line(results: dict[str, Any]) -> str:
    """Which command, code, machine and date made ``results``."""
    made = results.get("provenance", {})
    commit = (made.get("commit") or "unknown")[:12]
    return (
        f"`{made.get('command') or 'omotool demo'}` ({made.get('date')}; omotool "
        f"{made.get('omotool')} at {commit}; {made.get('threads')} thread(s) on "
        f"{made.get('cpu')}, ATen {made.get('cpu_capability')}; {made.get('seconds', 0):.0f} s)"
    )


def best_table(results: dict[str, Any], columns: list[str] | None = None) -> list[str]:
    """Markdown rows: SFT and each method at its chosen setting, test means ± std over seeds."""
    columns = columns or ["reward", "capability", "overall"]
    seeds = results["settings"]["seeds"]
    lines = [
        "| method | setting | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for method in ("base", "sft"):  # the base model: the real track's
        point = next((p for p in results["points"] if p["method"] == method), None)
        if point:
            cells = [_cell(point["test"], c, seeds) for c in columns]
            lines.append(f"| {LABELS[method]} | | " + " | ".join(cells) + " |")
    for method, position in results["best"].items():
        point = find_point(results, method, position)
        cells = [_cell(point["test"], c, seeds) for c in columns]
        lines.append(f"| {LABELS[method]} | {position['setting']} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(results: dict[str, Any]) -> str:
    """The short form (README, the command's output): the table at each method's chosen
    setting and the verdicts."""
    lines = [
        f"Test scores, mean ± std over {results['settings']['seeds']} seed(s); each method at "
        "the setting with the best validation overall score. Made by " + provenance_line(results)
        + ":",
        "",
        *best_table(results),
        "",
        *[f"- {v}" for v in results["verdicts"]],
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def lora_summary_markdown(results: dict[str, Any]) -> str:
    """The lora track in one line (README): each verdict's word, from the results file."""
    words = verdict_words(results)
    seeds = results["settings"]["seeds"]
    findings = "; ".join(f"{key}: {word}" for key, word in words.items() if key != TAX_KEY)
    return f"LoRA track (rank {results['settings']['lora_r']}, {seeds} seeds): {findings}.\n"


def details_markdown(results: dict[str, Any]) -> str:
    """The long form (docs/demo.md, report.md): per-task table, paired differences, AdamW's
    tax per learning rate, every setting with its frontier gap, and the verdicts."""
    tasks = list(results["tasks"])
    columns = [*tasks, "reward", "capability", "overall"]
    seeds = results["settings"]["seeds"]
    lines = [
        f"Made by {provenance_line(results)}. Test scores, mean ± std over {seeds} seed(s); "
        "settings chosen on validation. Reward tasks: "
        + ", ".join(t for t in tasks if results["tasks"][t] == "reward")
        + "; capability (tax) tasks: "
        + ", ".join(t for t in tasks if results["tasks"][t] == "capability") + ".",
        "",
        "#### Each method at its chosen setting",
        "",
        *best_table(results, columns),
    ]  # fmt: skip
    for key, against in (("differences", "AdamW"), ("lora_differences", "LoRA-AdamW")):
        if results.get(key):
            lines += [
                "",
                f"#### Differences against {against} (chosen settings, test, paired by seed)",
                "",
                "Mean difference and 95% t-interval over seeds.",
                "",
                "| method | " + " | ".join(columns) + " |",
                "|---|" + "---|" * len(columns),
            ]
            for method, difference in results[key].items():
                cells = [fmt_interval(difference[c]) for c in columns]
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    if results["tax"]:
        lines += ["", "#### AdamW against SFT (test, paired by seed)", "",
                  "| lr | reward | capability |", "|---|---|---|"]  # fmt: skip
        for lr, row in results["tax"]["adamw"].items():
            mark = " (highest validation reward)" if lr == results["tax"]["top_reward_lr"] else ""
            lines.append(
                f"| {lr}{mark} | {fmt_interval(row['reward'])} | "
                f"{fmt_interval(row['capability'])} |"
            )
    lines += ["", "#### Every setting", "",
              "| method | setting | validation overall | reward | capability | overall | "
              "gap to AdamW's frontier |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in results["points"]:
        if p["method"] in ("sft", "base"):
            continue
        gaps = results["frontier"].get(p["method"], {}).get("settings", {})
        name = setting_name(p)
        gap = fmt_interval(gaps[name]) if gaps.get(name) else ""
        if p["method"] not in FRONTIER and gaps.get(name) is None:
            gap = "not comparable"
        cells = [_cell(p["test"], c, len(p["runs"])) for c in ("reward", "capability", "overall")]
        lines.append(
            f"| {LABELS[p['method']]} | {name} | {p['validation']['mean']['overall']:.3f} | "
            + " | ".join(cells) + f" | {gap} |"
        )  # fmt: skip
    lines += ["", "#### Verdicts", "", *[f"- {v}" for v in results["verdicts"]]]
    return "\n".join(lines) + "\n"


def report_markdown(results: dict[str, Any], plot: Path | None) -> str:
    name = results["settings"].get("track", "dpo")
    track = {"grpo": " (GRPO track)", "lora": " (LoRA track)", "real": " (real-model track)"}
    subject = "on SmolLM2-135M-Instruct" if name == "real" else "in miniature"
    lines = [
        f"# omotool demo{track.get(name, '')}: online merging {subject}", "",
        details_markdown(results),
    ]  # fmt: skip
    if plot is not None:
        lines += [f"![reward against tax]({plot.name})", ""]
    return "\n".join(lines)


def robustness_markdown(results: dict[str, Any], variants: dict[str, dict[str, Any]]) -> str:
    """The run against re-runs of the same code on other machine settings (threads, the CPU
    kernels ATen picks): the headline numbers and each verdict side by side."""
    runs = {"this run": results, **variants}
    names = list(runs)

    def setting(r: dict[str, Any]) -> str:
        made = r.get("provenance", {})
        return f"{made.get('threads')} thread(s), ATen {made.get('cpu_capability')}"

    def headline(r: dict[str, Any], method: str) -> str:
        if method == "sft":
            point = next(p for p in r["points"] if p["method"] == "sft")
            return f"{point['test']['mean']['capability']:.3f}"
        point = find_point(r, method, r["best"][method])
        mean = point["test"]["mean"]
        return f"{mean['reward']:.3f} / {mean['capability']:.3f} ({r['best'][method]['setting']})"

    lines = [
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| machine setting | " + " | ".join(setting(runs[n]) for n in names) + " |",
        "| SFT capability | " + " | ".join(headline(runs[n], "sft") for n in names) + " |",
    ]
    for method in TRAINED:
        if method in results["best"]:
            cells = [headline(runs[n], method) for n in names]
            lines.append(f"| {LABELS[method]} reward / capability | " + " | ".join(cells) + " |")
    words = {n: verdict_words(runs[n]) for n in names}
    for key in words["this run"]:
        cells = [words[n].get(key, "") for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    same = sum(all(words[n].get(k) == w for n in names) for k, w in words["this run"].items())
    lines += [
        "",
        f"{same} of {len(words['this run'])} verdicts are the same in every run.",
    ]
    for name, variant in variants.items():
        lines.append(f"- {name}: {provenance_line(variant)}")
    return "\n".join(lines) + "\n"


def write_demo_report(results: dict[str, Any], workdir: Path, plot: Path | None) -> Path:
    """``results.json`` and ``report.md`` in ``workdir`` (each written whole, then renamed)."""
    from omotool.io.formats import write_text_atomic

    write_results(results, workdir / "results.json")
    target = workdir / "report.md"
    write_text_atomic(target, report_markdown(results, plot))
    return target
