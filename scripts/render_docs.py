"""Render the demo's tables, verdicts and plots in README.md and docs/demo.md from the committed
results files (docs/results/demo.json and, for the GRPO track, docs/results/grpo.json, written
by `omotool demo [--track grpo] --results`).

    python scripts/render_docs.py           # rewrite the marked sections and the plot
    python scripts/render_docs.py --check   # exit 1 when a document differs from the render
"""

from __future__ import annotations

import sys
from pathlib import Path

from omotool.demo.render import render_documents, stale_documents


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    if "--check" in sys.argv[1:]:
        stale = stale_documents(root)
        for name in stale:
            print(f"{name} differs from the render of the results file; run "
                  "`python scripts/render_docs.py`.")  # fmt: skip
        return 1 if stale else 0
    for name in render_documents(root):
        print(f"rendered {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
