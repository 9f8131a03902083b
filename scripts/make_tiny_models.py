"""Write a tiny base model and an "SFT" model derived from it, for the Quickstart.

Usage: python scripts/make_tiny_models.py OUT   (writes OUT/base and OUT/sft)
"""

import shutil
import sys
from pathlib import Path

from omotool.tiny_models import build_pair

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
    for name in ("base", "sft"):
        shutil.rmtree(out / name, ignore_errors=True)
    base, sft = build_pair(out, arch="llama", hidden_size=64, layers=2)
    print(f"wrote {base} and {sft}")
