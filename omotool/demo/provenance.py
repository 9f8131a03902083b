"""Where a demo result came from: version, commit, command, machine, threads, date, time and
the process's peak memory.

Stored in the results file beside the numbers, so a table rendered from it can say which code
on which machine printed it, and a reader can tell a re-run from a copy."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path
from typing import Any

# Keys that differ between two runs of the same code on the same machine.
VOLATILE = ("date", "seconds", "peak_memory_gb")


def provenance(command: str | None, seconds: float) -> dict[str, Any]:
    """The run's provenance (see module docstring)."""
    import torch

    from omotool import __version__

    return {
        "omotool": __version__,
        "commit": source_commit(),
        "command": command,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "seconds": round(seconds, 1),
        "peak_memory_gb": peak_memory_gb(),
    }


def peak_memory_gb() -> float | None:
    """The largest resident memory of this process so far, in GB (None where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak * (1 if platform.system() == "Darwin" else 1024) / 1e9, 2)


def source_commit() -> str | None:
    """The git commit of the omotool source that ran, ``+dirty`` when it had uncommitted
    changes; None outside a git checkout (an installed wheel)."""
    folder = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(folder.parent))
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
