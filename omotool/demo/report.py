"""The demo's results: choices on validation, test numbers, frontiers, verdicts, plot, results file.

Every trained model is one point ``(capability, reward)`` per split: capability is the mean
accuracy of the SFT capabilities (the tax side), reward the mean of the reward tasks, overall
their mean. A seed is a whole replicate of the pipeline (world, base, SFT, τ, DPO), so points
are paired across methods by seed. The rules (method.md, "Comparing methods fairly"):

- each method's setting (learning rate, and ``α`` where swept) is the one with the best mean
  *validation* overall score; every reported number is a *test* number;
- a difference against AdamW is paired by seed with a 95% t-interval over seeds; a verdict
  ("better", "worse", "beyond", "behind") needs the interval to exclude zero, otherwise "not
  distinguishable"; with one seed there is no verdict ("not tested");
- AdamW's frontier in a seed joins the Pareto-optimal test points of that seed's AdamW runs,
  offline merges and SFT model; a point's *gap* is its reward minus the frontier's reward at
  its capability, defined only up to the frontier's highest capability (beyond it no AdamW
  point exists to compare with);
- AdamW's *tax* is the test capability change against SFT at AdamW's highest-validation-reward
  learning rate; it is *measurable* when the drop exceeds the test sets' own 95% half-width
  (of the SFT capability average) and its seed interval lies below zero.
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
from omotool.eval.tasks import headline_name

LABELS = {"base": "Base model", "sft": "SFT", "adamw": "AdamW", "ondare": "OnDARE",
          "onties": "OnTIES", "childtuning": "ChildTuning", "lora-adamw": "LoRA-AdamW",
          "lora-ondare": "LoRA-OnDARE", "lora-onties": "LoRA-OnTIES",
          "merge": "AdamW + offline merge"}  # fmt: skip
TRAINED = ("adamw", "ondare", "onties", "childtuning", "lora-adamw", "lora-ondare", "lora-onties")
MERGING = ("ondare", "onties", "lora-ondare", "lora-onties")  # the methods that take an α
LORA_REFERENCE = "lora-adamw"  # what the merging adapters are also paired with
FRONTIER = ("adamw", "merge", "sft")  # what AdamW's frontier is made of
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
Interval = dict[str, float | None]


def _scores(evaluation: dict[str, Any]) -> dict[str, float]:
    """Each task's headline score (a task without one, e.g. perplexity: its first score),
    the reward and capability averages and their mean, ``overall``."""
    scores = {name: _score(task) for name, task in evaluation["tasks"].items()}
    averages = evaluation["averages"]
    scores["reward"], scores["capability"] = averages["reward"], averages["capability"]
    scores["overall"] = (scores["reward"] + scores["capability"]) / 2
    return scores


def _score(task: dict[str, Any]) -> float:
    value = headline(task)
    if value is None and not task["failed"] and task["scores"]:
        value = next(iter(task["scores"].values()))["value"]
    if value is None:
        raise UsageError(f"task {task['task']!r} has no score to report")
    return value


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = runs[0].keys()
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return {"mean": mean, "std": std}


def interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (no interval from one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def judge(entry: Interval | None) -> int | None:
    """+1 / −1 when the interval lies above / below zero, 0 when it holds zero, None when
    there is no interval (one seed: not tested)."""
    if entry is None or entry["low"] is None or entry["high"] is None:
        return None
    return 1 if entry["low"] > 0 else -1 if entry["high"] < 0 else 0


def setting_name(point: dict[str, Any]) -> str:
    """``lr 3e-05``, ``lr 3e-05, α 0.001`` or ``α 0.5`` (a merge's weight)."""
    if point["method"] == "merge":
        return f"α {point['alpha']:g}"
    if point["method"] in MERGING:
        return f"lr {point['lr']:g}, α {point['alpha']:g}"
    return f"lr {point['lr']:g}"


def build_results(
    settings: Any, evaluations: list[tuple[Any, dict[str, dict[str, Any]]]]
) -> dict[str, Any]:
    """The numbers behind the report (see module docstring). ``evaluations`` holds, per model,
    its ``omotool eval`` result on each split: ``(model, {"validation": ..., "test": ...})``."""
    from dataclasses import asdict

    grouped: dict[tuple[str, float | None, float | None], list[dict[str, Any]]] = defaultdict(list)
    tasks: dict[str, str] = {}
    sft_half_widths = []
    for model, splits in evaluations:
        tasks.update({name: t["category"] for name, t in splits["test"]["tasks"].items()})
        run = {"seed": model.seed, **{s: _scores(e) for s, e in splits.items()}}
        grouped[(model.method, model.lr, model.alpha)].append(run)
        if model.method == "sft":
            sft_half_widths.append(average_half_width(splits["test"], "capability"))
    points = []
    for (method, lr, alpha), runs in grouped.items():
        runs.sort(key=lambda r: r["seed"])
        point = {"method": method, "lr": lr, "alpha": alpha, "runs": runs}
        point.update({s: _summary([r[s] for r in runs]) for s in ("validation", "test")})
        points.append(point)
    points.sort(key=lambda p: (list(LABELS).index(p["method"]), p["lr"] or 0, p["alpha"] or 0))
    best = {
        method: max(
            (p for p in points if p["method"] == method),
            key=lambda p: p["validation"]["mean"]["overall"],
        )
        for method in TRAINED
        if any(p["method"] == method for p in points)
    }
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "tasks": tasks,
        "points": points,
        "best": {m: _position(p) for m, p in best.items()},
        "differences": _differences(best),
        "frontier": _frontier_gaps(points, best),
        "tax": _tax(points, statistics.fmean(sft_half_widths) if sft_half_widths else 0.0),
    }
    if any(method in MERGING and method.startswith("lora-") for method in best):
        results["lora_differences"] = _differences(best, LORA_REFERENCE)  # the lora track's
    results["verdicts"] = verdicts(results)
    return results


def _position(point: dict[str, Any]) -> dict[str, Any]:
    return {"lr": point["lr"], "alpha": point["alpha"], "setting": setting_name(point)}


def find_point(results: dict[str, Any], method: str, position: dict[str, Any]) -> dict[str, Any]:
    """The point of ``method`` at ``position`` (``{"lr", "alpha"}``)."""
    return next(
        p
        for p in results["points"]
        if p["method"] == method and p["lr"] == position["lr"] and p["alpha"] == position["alpha"]
    )


def average_half_width(evaluation: dict[str, Any], category: str) -> float:
    """The 95% half-width of a category's average that the finite test sets alone cause: the
    tasks' intervals are independent, so the average's half-width is √(Σ hᵢ²) / n."""
    widths = []
    for task in evaluation["tasks"].values():
        key = headline_name(task["task"])
        if task["category"] == category and not task["failed"] and key in task["scores"]:
            widths.append((task["scores"][key]["high"] - task["scores"][key]["low"]) / 2)
    return math.sqrt(sum(w * w for w in widths)) / len(widths) if widths else 0.0


def _by_seed(point: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {r["seed"]: r["test"] for r in point["runs"]}


def _differences(best: dict[str, dict[str, Any]], against: str = "adamw") -> dict[str, Any]:
    """Each method's chosen point minus ``against``'s, on test, paired by seed, 95% intervals
    (against LoRA-AdamW: only the adapters that merge)."""
    if against not in best:
        return {}
    reference = _by_seed(best[against])
    differences = {}
    for method, point in best.items():
        if method == against or (against == LORA_REFERENCE and method not in MERGING):
            continue
        mine = _by_seed(point)
        seeds = sorted(set(mine) & set(reference))
        differences[method] = {
            key: interval([mine[s][key] - reference[s][key] for s in seeds])
            for key in point["test"]["mean"]
        }
    return differences


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (capability, reward) points no other point matches or beats on both, by capability."""
    return sorted(
        (x, y)
        for x, y in set(points)
        if not any(fx >= x and fy >= y and (fx, fy) != (x, y) for fx, fy in points)
    )


def frontier_reward(frontier: list[tuple[float, float]], x: float) -> float | None:
    """The frontier's reward at capability ``x``: interpolated between its points; below its
    lowest capability, its best reward (reached with more capability); None above its highest
    capability, where it is not defined."""
    if not frontier or x > frontier[-1][0]:
        return None
    if x <= frontier[0][0]:
        return frontier[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(frontier):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable: x lies within the frontier")


def _frontier_gaps(points: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any]:
    """Per method: each setting's test reward gap to AdamW's frontier of the same seed, over
    seeds (an interval), or None where the frontier is not defined in some seed."""
    frontiers: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        if p["method"] in FRONTIER:
            for run in p["runs"]:
                frontiers[run["seed"]].append((run["test"]["capability"], run["test"]["reward"]))
    frontiers = {seed: pareto(candidates) for seed, candidates in frontiers.items()}
    summary: dict[str, Any] = {}
    for p in points:
        if p["method"] in FRONTIER or p["method"] == "base":  # base: the real track's start
            continue
        gaps = []
        for run in p["runs"]:
            edge = frontier_reward(frontiers.get(run["seed"], []), run["test"]["capability"])
            gaps.append(None if edge is None else run["test"]["reward"] - edge)
        gap = None if None in gaps or not gaps else interval(gaps)
        entry = summary.setdefault(p["method"], {"settings": {}, "chosen": None})
        entry["settings"][setting_name(p)] = gap
        if p is best.get(p["method"]):
            entry["chosen"] = setting_name(p)
    for entry in summary.values():
        judged = [judge(g) for g in entry["settings"].values()]
        entry["beyond"] = sum(j == 1 for j in judged)
        entry["behind"] = sum(j == -1 for j in judged)
        entry["undefined"] = sum(g is None for g in entry["settings"].values())
    return summary


def _tax(points: list[dict[str, Any]], sft_half_width: float) -> dict[str, Any]:
    """AdamW's test reward and capability change against SFT, paired by seed, per learning
    rate; which learning rate reached the highest validation reward; the test sets'
    half-width of the SFT capability average (mean over seeds)."""
    sft = next((p for p in points if p["method"] == "sft"), None)
    adamw = [p for p in points if p["method"] == "adamw"]
    if sft is None or not adamw:
        return {}
    base = _by_seed(sft)
    rows = {}
    for p in adamw:
        mine = _by_seed(p)
        rows[f"{p['lr']:g}"] = {
            key: interval([mine[s][key] - base[s][key] for s in sorted(mine) if s in base])
            for key in ("reward", "capability")
        }
    top = max(adamw, key=lambda p: p["validation"]["mean"]["reward"])
    capability = rows[f"{top['lr']:g}"]["capability"]
    if judge(capability) is None:
        verdict = "not tested"
    elif -capability["mean"] > sft_half_width and judge(capability) == -1:
        verdict = "measurable"
    else:
        verdict = "not measurable"
    return {
        "adamw": rows,
        "top_reward_lr": f"{top['lr']:g}",
        "sft_capability_half_width": sft_half_width,
        "verdict": verdict,
    }


_WORDS = {1: "better", -1: "worse", 0: "not distinguishable", None: "not tested (one seed)"}
_GAP_WORDS = {1: "beyond", -1: "behind", 0: "not distinguishable", None: "not tested (one seed)"}
_TAX_WORDS = {"measurable": "a measurable tax", "not measurable": "no measurable tax",
              "not tested": "not tested (one seed)"}  # fmt: skip


TAX_KEY = "AdamW's tax"


def overall_key(method: str, against: str = "adamw") -> str:
    return f"{LABELS[method]} vs {LABELS[against]} overall"


def frontier_key(method: str) -> str:
    return f"{LABELS[method]} vs AdamW's frontier"


def _frontier_word(results: dict[str, Any], entry: dict[str, Any]) -> str:
    """Where a method's chosen setting lies against AdamW's frontier, in a word."""
    gap = entry["settings"].get(entry["chosen"])
    if gap is None and results["settings"]["seeds"] > 1:
        return "not comparable"  # more capability than any AdamW point in some seed
    return _GAP_WORDS[judge(gap)]


def verdict_words(results: dict[str, Any]) -> dict[str, str]:
    """Each finding as a word or phrase, keyed by what it judges (``verdicts`` says the same
    with the intervals)."""
    words = {}
    if results["tax"]:
        words[TAX_KEY] = _TAX_WORDS[results["tax"]["verdict"]]
    for method, difference in results["differences"].items():
        words[overall_key(method)] = _WORDS[judge(difference["overall"])]
    for method, difference in results.get("lora_differences", {}).items():
        words[overall_key(method, LORA_REFERENCE)] = _WORDS[judge(difference["overall"])]
    for method, entry in results["frontier"].items():
        words[frontier_key(method)] = _frontier_word(results, entry)
    return words


def verdicts(results: dict[str, Any]) -> list[str]:
    """One sentence per finding, each with the interval it rests on."""
    words = verdict_words(results)
    lines = []
    tax = results["tax"]
    if tax:
        row = tax["adamw"][tax["top_reward_lr"]]
        lines.append(
            f"AdamW's tax: at its highest-reward lr {tax['top_reward_lr']} (chosen on "
            f"validation) the reward moves {fmt_interval(row['reward'])} and capability "
            f"{fmt_interval(row['capability'])} against SFT (test; test sets' 95% half-width "
            f"±{tax['sft_capability_half_width']:.3f}): {words[TAX_KEY]}"
        )
    for method, difference in results["differences"].items():
        lines.append(
            f"{LABELS[method]} ({results['best'][method]['setting']}) against AdamW "
            f"({results['best']['adamw']['setting']}), overall: Δ "
            f"{fmt_interval(difference['overall'])}: {words[overall_key(method)]}"
        )
    for method, difference in results.get("lora_differences", {}).items():
        lines.append(
            f"{LABELS[method]} ({results['best'][method]['setting']}) against LoRA-AdamW "
            f"({results['best'][LORA_REFERENCE]['setting']}), overall: Δ "
            f"{fmt_interval(difference['overall'])}: "
            f"{words[overall_key(method, LORA_REFERENCE)]}"
        )
    for method, entry in results["frontier"].items():
        gap = entry["settings"].get(entry["chosen"])
        shown = "" if gap is None else f" (reward gap at equal capability {fmt_interval(gap)})"
        lines.append(
            f"{LABELS[method]} at {entry['chosen']} against AdamW's frontier{shown}: "
            f"{words[frontier_key(method)]}; of its "
            f"{len(entry['settings'])} settings {entry['beyond']} beyond, {entry['behind']} behind"
            + (f", {entry['undefined']} not comparable" if entry["undefined"] else "")
        )
    return lines


def fmt_interval(entry: Interval) -> str:
    if entry["low"] is None:
        return f"{entry['mean']:+.3f}"
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def plot_frontiers(results: dict[str, Any], path: Path) -> Path | None:
    """Capability (x) against reward (y) on test, means over seeds: each method's learning
    rates joined in order (one line per ``α`` for OnDARE), the offline-merge sweep dashed,
    SFT with its seed standard deviations. None without matplotlib."""
    from omotool.eval.plot import require_matplotlib, save_figure

    try:
        plt = require_matplotlib()
    except UsageError:  # the report is complete without the figure
        return None
    figure, axes = plt.subplots(figsize=(6.5, 4.8))
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in results["points"]:
        label = LABELS[p["method"]]
        several = p["method"] == "ondare" or (
            p["method"] in MERGING and len({q["alpha"] for q in results["points"]
                                            if q["method"] == p["method"]}) > 1
        )  # fmt: skip
        lines[f"{label}, α {p['alpha']:g}" if several else label].append(p)
    for label, points in lines.items():
        xs = [p["test"]["mean"]["capability"] for p in points]
        ys = [p["test"]["mean"]["reward"] for p in points]
        if points[0]["method"] in ("sft", "base"):
            std = points[0]["test"]["std"]
            axes.errorbar(
                xs, ys, xerr=[std["capability"]], yerr=[std["reward"]], capsize=3,
                fmt="k*" if points[0]["method"] == "sft" else "kx",
                markersize=10, label=f"{label} (± std over seeds)",
            )  # fmt: skip
            continue
        style = "--s" if points[0]["method"] == "merge" else "-o"
        axes.plot(xs, ys, style, label=label, markersize=4, linewidth=1)
        for p, x, y in zip(points, xs, ys, strict=True):
            tag = f"α {p['alpha']:g}" if p["method"] == "merge" else f"{p['lr']:g}"
            axes.annotate(tag, (x, y), fontsize=5, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("capability (mean accuracy of SFT skills, test; right: less tax)")
    axes.set_ylabel("reward (preferred style rate, test)")
    seeds = results["settings"]["seeds"]
    title = f"omotool demo: reward against alignment tax (means over {seeds} seed(s))"
    if results["settings"].get("track") == "grpo":
        title = f"omotool demo, GRPO: reward against tax (means over {seeds} seed(s))"
    if results["settings"].get("track") == "lora":
        title = f"omotool demo, LoRA: reward against tax (means over {seeds} seed(s))"
    if results["settings"].get("track") == "real":
        title = f"omotool demo, SmolLM2-135M: reward against tax ({seeds} seed(s))"
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    save_figure(plt, figure, path)
    return path


def write_results(results: dict[str, Any], path: Path) -> Path:
    """The results file (JSON, keys in a fixed order), written whole then renamed."""
    import json

    from omotool.io.formats import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1, allow_nan=False) + "\n")
    return path
