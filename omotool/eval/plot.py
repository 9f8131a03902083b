"""The trade-off figure: capability average (x) against reward average (y), one point per model.

Error bars are the mean half-width of the 95% intervals of the tasks in each average: a
conservative bar (it treats the tasks' errors as fully correlated). Models named
``alpha-<a>`` in one folder (an ``omotool merge-offline`` sweep) are joined by a line in order
of ``a``. Needs matplotlib (``pip install 'omotool[plot]'``).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from omotool.errors import UsageError
from omotool.eval.tasks import headline_name

_SWEEP = re.compile(r"^alpha-([0-9.]+)$")


def _bar(model: dict[str, Any], category: str) -> float:
    widths = []
    for task in model["tasks"].values():
        key = headline_name(task["task"])
        if task["category"] == category and not task["failed"] and key in task["scores"]:
            score = task["scores"][key]
            widths.append((score["high"] - score["low"]) / 2)
    return sum(widths) / len(widths) if widths else 0.0


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on a file backend, or a UsageError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'omotool[plot]'") from None
    return plt


def plot_tradeoff(report: dict[str, Any], path: Path) -> int:
    """Draw the figure into ``path`` (PNG, written whole then renamed); returns the points."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    sweeps: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    points = 0
    for model in report["models"]:
        x, y = model["averages"]["capability"], model["averages"]["reward"]
        if x is None or y is None:
            continue
        name = Path(model["path"]).name
        axes.errorbar(
            x, y, xerr=_bar(model, "capability"), yerr=_bar(model, "reward"), fmt="o",
            capsize=3, label=name if not _SWEEP.match(name) else None,
        )  # fmt: skip
        points += 1
        if match := _SWEEP.match(name):
            sweeps[str(Path(model["path"]).parent)].append((float(match.group(1)), x, y))
    for folder, sweep in sweeps.items():
        sweep.sort()
        axes.plot(
            [s[1] for s in sweep],
            [s[2] for s in sweep],
            "--",
            label=f"{Path(folder).name} (α sweep)",
        )
    axes.set_xlabel("capability average (higher: less alignment tax)")
    axes.set_ylabel("reward average")
    axes.set_title("reward against alignment tax")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(plt, figure, path)
    return points


def save_figure(plt: Any, figure: Any, path: Path) -> None:
    """Write ``figure`` to ``path`` as a PNG, whole then renamed, and close it."""
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    os.replace(partial, path)
