"""The eval tasks: one module each, registered in ``TASKS`` (``base.py`` says what an entry
holds). Every module of this package is imported here, so a new task is one new module."""

from __future__ import annotations

import importlib
import pkgutil

from omotool.eval.tasks.base import (
    FIRST_SCORE,
    TASKS,
    EvalTask,
    TaskRun,
    TaskSpec,
    headline_name,
    read_rows,
    readers,
    resolve,
)

__all__ = [
    "FIRST_SCORE",
    "TASKS",
    "EvalTask",
    "TaskRun",
    "TaskSpec",
    "headline_name",
    "read_rows",
    "readers",
    "resolve",
]


# The order tasks are listed in (--help, error messages); any other module follows by name.
LISTED_FIRST = ("preference", "reward_model", "perplexity", "generate", "choice", "lm_eval")


def _register_all() -> None:
    """Import every task module of this package (each registers its task)."""
    names = sorted(module.name for module in pkgutil.iter_modules(__path__))
    first = [name for name in LISTED_FIRST if name in names]
    for name in (*first, *(name for name in names if name not in first and name != "base")):
        importlib.import_module(f"{__name__}.{name}")


_register_all()
