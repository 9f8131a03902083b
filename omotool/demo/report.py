"""The demo's results: per-method frontiers, the paper-style table, verdicts, plot, report.md.

Every trained model is one point ``(capability, reward)``: capability is the mean accuracy of
the SFT capabilities (the tax side), reward the mean of the reward tasks. A method's point at
a learning rate is the mean over seeds (± standard deviation). Methods are compared as
frontiers (method.md, "Comparing methods fairly"): each method's best learning rate by the
overall score ``(reward + capability) / 2``, differences against AdamW's best paired by seed
with a 95% t-interval, and each point's reward gap to AdamW's frontier (its runs, its offline
merges and the SFT model) at the same capability.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from omotool.errors import UsageError
from omotool.eval.runner import headline
from omotool.eval.suite import HEADLINE

LABELS = {"sft": "SFT", "adamw": "AdamW", "ondare": "OnDARE", "onties": "OnTIES",
          "childtuning": "ChildTuning", "merge": "AdamW + offline merge"}  # fmt: skip
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def _scores(evaluation: dict[str, Any]) -> dict[str, float]:
    scores = {name: headline(task) for name, task in evaluation["tasks"].items()}
    averages = evaluation["averages"]
    scores["reward"], scores["capability"] = averages["reward"], averages["capability"]
    scores["overall"] = (scores["reward"] + scores["capability"]) / 2
    return scores


def _summary(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = runs[0].keys()
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and 95% t-interval of ``values`` (no interval from one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def build_results(settings: Any, evaluations: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """The numbers behind the report (see module docstring) from each model's evaluation."""
    from dataclasses import asdict

    grouped: dict[tuple[str, float | None], list[dict[str, Any]]] = defaultdict(list)
    tasks: dict[str, str] = {}
    for model, evaluation in evaluations:
        tasks.update({name: t["category"] for name, t in evaluation["tasks"].items()})
        position = model.alpha if model.method == "merge" else model.lr
        grouped[(model.method, position)].append(
            {"seed": model.seed, "path": str(model.path), "scores": _scores(evaluation)}
        )
    points = []
    for (method, position), runs in grouped.items():
        mean, std = _summary([r["scores"] for r in runs])
        key = "alpha" if method == "merge" else "lr"
        points.append({"method": method, key: position, "runs": runs, "mean": mean, "std": std})
    best = {}
    for method in {p["method"] for p in points} - {"sft", "merge"}:
        mine = [p for p in points if p["method"] == method]
        best[method] = max(mine, key=lambda p: p["mean"]["overall"])
    differences = _differences(best)
    results = {
        "settings": asdict(settings),
        "tasks": tasks,
        "points": points,
        "best": {m: {"lr": p["lr"], "mean": p["mean"], "std": p["std"]} for m, p in best.items()},
        "differences": differences,
    }
    results["beyond_adamw_frontier"] = _beyond_frontier(points)
    sft = [e for m, e in evaluations if m.method == "sft"]
    results["tax"] = _tax(points, _half_width(sft[0], "capability") if sft else 0.0)
    results["verdicts"] = _verdicts(results)
    return results


def _half_width(evaluation: dict[str, Any], category: str) -> float:
    """The mean half-width of the 95% intervals of a category's tasks: how far a score of
    this model may move by the finite test sets alone."""
    widths = []
    for task in evaluation["tasks"].values():
        key = HEADLINE[task["task"]]
        if task["category"] == category and not task["failed"] and key in task["scores"]:
            widths.append((task["scores"][key]["high"] - task["scores"][key]["low"]) / 2)
    return statistics.fmean(widths) if widths else 0.0


def _by_seed(point: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {r["seed"]: r["scores"] for r in point["runs"]}


def _differences(best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each method's best point minus AdamW's best, paired by seed, with 95% intervals."""
    if "adamw" not in best:
        return {}
    reference = _by_seed(best["adamw"])
    differences = {}
    for method, point in best.items():
        if method == "adamw":
            continue
        mine = _by_seed(point)
        seeds = sorted(set(mine) & set(reference))
        differences[method] = {
            key: interval([mine[s][key] - reference[s][key] for s in seeds])
            for key in point["mean"]
        }
    return differences


def _beyond_frontier(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: its points' reward gap to AdamW's frontier at their capability.

    The frontier joins the Pareto-optimal (capability, reward) points of the AdamW runs, the
    offline merges and the SFT model by straight lines; below its lowest capability it is the
    best reward, above its highest there is none (any reward is a gap). A point is *beyond*
    it when its gap exceeds its own seed standard deviation."""
    candidates = [
        (p["mean"]["capability"], p["mean"]["reward"])
        for p in points
        if p["method"] in ("adamw", "merge", "sft")
    ]
    frontier = sorted(
        (x, y)
        for x, y in candidates
        if not any(fx >= x and fy >= y and (fx, fy) != (x, y) for fx, fy in candidates)
    )
    summary: dict[str, dict[str, Any]] = {}
    for p in sorted(points, key=lambda p: p.get("lr") or 0):
        if p["method"] in ("adamw", "merge", "sft"):
            continue
        x, y = p["mean"]["capability"], p["mean"]["reward"]
        gap = y - _frontier_reward(frontier, x)
        entry = summary.setdefault(p["method"], {"beyond": 0, "points": 0, "gaps": {}})
        entry["points"] += 1
        entry["beyond"] += gap > p["std"]["reward"]
        entry["gaps"][f"{p['lr']:g}"] = gap
    return summary


def _frontier_reward(frontier: list[tuple[float, float]], x: float) -> float:
    """The frontier's reward at capability ``x`` (``frontier`` sorted by capability)."""
    if not frontier or x > frontier[-1][0]:
        return 0.0 if not frontier else min(0.0, frontier[-1][1])
    if x <= frontier[0][0]:
        return frontier[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(frontier):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable: x lies within the frontier")


def _tax(points: list[dict[str, Any]], sft_half_width: float) -> dict[str, Any]:
    """AdamW's reward gain and capability change against the SFT model, per learning rate,
    and the SFT capability's test-set half-width they are judged against."""
    sft = next((p for p in points if p["method"] == "sft"), None)
    if sft is None:
        return {}
    base = sft["mean"]
    rows = {}
    for p in sorted((p for p in points if p["method"] == "adamw"), key=lambda p: p["lr"]):
        runs = [r["scores"] for r in p["runs"]]
        rows[f"{p['lr']:g}"] = {
            "reward": interval([r["reward"] - base["reward"] for r in runs]),
            "capability": interval([r["capability"] - base["capability"] for r in runs]),
        }
    return {"sft": base, "adamw": rows, "sft_capability_half_width": sft_half_width}


def _significance(entry: dict[str, float | None]) -> int:
    """+1 / −1 when the interval lies above / below zero, 0 when it holds zero or is absent."""
    if entry["low"] is None or entry["high"] is None:
        return 0
    return 1 if entry["low"] > 0 else -1 if entry["high"] < 0 else 0


def _verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    if results["tax"]:
        lines.append(
            "Test-set uncertainty of the SFT capability average: ±"
            f"{results['tax']['sft_capability_half_width']:.3f} (mean 95% half-width)"
        )
    for lr, row in results["tax"].get("adamw", {}).items():
        reward, capability = row["reward"], row["capability"]
        # A tax counts when the drop is larger than the test sets' own uncertainty (the SFT
        # capability's interval) and, with several seeds, the seed interval excludes zero.
        beyond_tests = -capability["mean"] > results["tax"]["sft_capability_half_width"]
        beyond_seeds = capability["low"] is None or _significance(capability) < 0
        judged = (
            " (a tax beyond the test sets' interval"
            + (")" if capability["low"] is not None else "; one seed)")
            if beyond_tests and beyond_seeds
            else " (no tax beyond the intervals)"
        )
        lines.append(
            f"AdamW at lr {lr}: reward {_fmt_interval(reward)}, capability "
            f"{_fmt_interval(capability)} against SFT{judged}"
        )
    for method, difference in results["differences"].items():
        overall = difference["overall"]
        sign = _significance(overall)
        word = {1: "better than", -1: "worse than", 0: "not distinguishable from"}[sign]
        shown = _fmt_interval(overall)
        lines.append(f"{LABELS[method]} (best lr) is {word} AdamW (best lr) overall: Δ {shown}")
    for method, count in results["beyond_adamw_frontier"].items():
        lr, gap = max(count["gaps"].items(), key=lambda item: item[1])
        lines.append(
            f"{LABELS[method]}: {count['beyond']} of {count['points']} learning rates lie "
            "beyond AdamW's frontier (its runs, offline merges and SFT, joined by lines); "
            f"largest reward gap at equal capability {gap:+.3f} (lr {lr})"
        )
    return lines


def _fmt_interval(entry: dict[str, float | None]) -> str:
    if entry["low"] is None:
        return f"{entry['mean']:+.3f}"
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def plot_frontiers(results: dict[str, Any], path: Path) -> Path | None:
    """Capability (x) against reward (y): each method's learning rates joined in order, with
    seed standard deviations as bars; the offline-merge sweep dashed. None without matplotlib."""
    from omotool.eval.plot import require_matplotlib, save_figure

    try:
        plt = require_matplotlib()
    except UsageError:  # the report is complete without the figure
        return None
    figure, axes = plt.subplots(figsize=(6.5, 4.8))
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in results["points"]:
        by_method[p["method"]].append(p)
    for method, points in by_method.items():
        order = "alpha" if method == "merge" else "lr"
        points.sort(key=lambda p: p[order] or 0)
        xs = [p["mean"]["capability"] for p in points]
        ys = [p["mean"]["reward"] for p in points]
        style = {"sft": "k*", "merge": "--s"}.get(method, "-o")
        axes.errorbar(
            xs, ys, xerr=[p["std"]["capability"] for p in points],
            yerr=[p["std"]["reward"] for p in points], fmt=style, capsize=3,
            label=LABELS[method], markersize=10 if method == "sft" else 5,
        )  # fmt: skip
        if method != "sft":
            for p, x, y in zip(points, xs, ys, strict=True):
                tag = f"α {p['alpha']:g}" if method == "merge" else f"{p['lr']:g}"
                axes.annotate(tag, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("capability (mean accuracy of SFT skills; right: less tax)")
    axes.set_ylabel("reward (preferred style rate)")
    axes.set_title("omotool demo: reward against alignment tax")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(plt, figure, path)
    return path


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f}" if seeds < 2 else f"{mean:.3f} ± {std:.3f}"


def report_markdown(results: dict[str, Any], plot: Path | None, seconds: float | None) -> str:
    settings = results["settings"]
    tasks = list(results["tasks"])
    columns = [*tasks, "reward", "capability", "overall"]
    seeds = settings["seeds"]
    lines = ["# omotool demo: online merging in miniature", ""]
    lines += [
        f"A {settings['layers']}-layer Llama (hidden {settings['hidden']}) pre-trained for "
        f"{settings['pretrain_steps']} steps, SFT for {settings['sft_epochs']:g} epochs, then DPO "
        f"(β {settings['beta']}, {settings['dpo_epochs']:g} epochs) with each optimizer over its "
        f"learning-rate grid, {seeds} seed(s); `p = {settings['reserve_p']}`, "
        f"`α = {settings['alpha_ratio']:g} × lr`. Reward tasks: "
        + ", ".join(t for t in tasks if results["tasks"][t] == "reward")
        + "; capability (tax) tasks: "
        + ", ".join(t for t in tasks if results["tasks"][t] == "capability")
        + ". Cells are means over seeds ± standard deviation.",
        "",
    ]
    if seconds is not None:
        lines += [f"Run time: {seconds:.0f} s.", ""]
    lines += ["## Each method at its best learning rate", "",
              "| method | lr | " + " | ".join(columns) + " |",
              "|---|---|" + "---|" * len(columns)]  # fmt: skip
    sft = next((p for p in results["points"] if p["method"] == "sft"), None)
    if sft:
        lines.append("| SFT | | " + " | ".join(f"{sft['mean'][c]:.3f}" for c in columns) + " |")
    for method, point in sorted(results["best"].items(), key=lambda kv: list(LABELS).index(kv[0])):
        cells = [_cell(point["mean"][c], point["std"][c], seeds) for c in columns]
        lines.append(f"| {LABELS[method]} | {point['lr']:g} | " + " | ".join(cells) + " |")
    if results["differences"]:
        lines += [
            "",
            "## Differences against AdamW (best learning rates, paired by seed)",
            "",
            "Mean difference and 95% t-interval over seeds.",
            "",
            "| method | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for method, difference in sorted(
            results["differences"].items(), key=lambda kv: list(LABELS).index(kv[0])
        ):
            cells = [_fmt_interval(difference[c]) for c in columns]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every learning rate (and the offline merges)",
        "",
        "| method | lr / α | reward | capability | overall |",
        "|---|---|---|---|---|",
    ]
    order = list(LABELS)
    for p in sorted(
        results["points"],
        key=lambda p: (order.index(p["method"]), p.get("lr") or p.get("alpha") or 0),
    ):
        if p["method"] == "sft":
            continue
        position = f"α {p['alpha']:g}" if p["method"] == "merge" else f"{p['lr']:g}"
        cells = [_cell(p["mean"][c], p["std"][c], len(p["runs"])) for c in
                 ("reward", "capability", "overall")]  # fmt: skip
        lines.append(f"| {LABELS[p['method']]} | {position} | " + " | ".join(cells) + " |")
    lines += ["", "## What it shows", ""] + [f"- {v}" for v in results["verdicts"]]
    if plot is not None:
        lines += ["", f"![reward against tax]({plot.name})"]
    return "\n".join(lines) + "\n"


def write_demo_report(
    results: dict[str, Any], workdir: Path, plot: Path | None, seconds: float | None = None
) -> Path:
    """``results.json`` and ``report.md`` in ``workdir`` (each written whole, then renamed)."""
    import json

    from omotool.io.formats import write_text_atomic

    write_text_atomic(workdir / "results.json", json.dumps(results, indent=2, allow_nan=False))
    target = workdir / "report.md"
    write_text_atomic(target, report_markdown(results, plot, seconds))
    return target
