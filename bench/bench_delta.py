"""Benchmark ``omotool delta`` against the naive way of computing a task vector.

What it measures
----------------
A Llama-style model of about 127M parameters (float32, sharded into 200MB safetensors files)
and an "SFT" model derived from it (every parameter moved by 0.001·N(0, 1)) are written to a
work folder. The task vector ``τ = θ_sft − θ_base`` is then computed by two methods, each in a
fresh child process so that its memory is its own:

- ``omotool``: the real CLI, ``omotool delta BASE SFT -o OUT --overwrite``, run in-process
  in the child (streams one tensor at a time).
- ``naive``: both models loaded with ``AutoModelForCausalLM.from_pretrained(dtype=float32)``,
  ``sft_state[k] - base_state[k]`` for every state-dict key, saved with
  ``safetensors.torch.save_file``.

Per run it records the child's wall time (measured by this script, so it includes interpreter
start-up and imports) and its peak resident set size. Peak RSS is the child's own ``VmHWM``
from ``/proc/self/status``, reported on the child's last line of stdout. (``ru_maxrss`` is not
used on Linux: it carries the parent's RSS over across fork/exec, so a child of a large
parent would report the parent's size.) The child also samples its anonymous RSS, which
separates memory the process allocated from file pages it merely mapped (mmap), and records
its RSS after imports, the floor every method pays.

Methods alternate (omotool, naive, omotool, naive, ...) so that drift on a shared machine
hits both alike. The report gives the median wall time and the maximum peak RSS per method,
the ratios naive/omotool, the goals (omotool peak RSS at least 3x below naive; time no worse
than naive) with PASS/MISS, and a one-off check that omotool's tensors equal the naive
differences exactly.

How to run
----------
    python bench/bench_delta.py                      # ~127M parameters, 3 repeats
    python bench/bench_delta.py --workdir /tmp/bd    # keep (and later reuse) the models there
    python bench/bench_delta.py --hidden 256 --layers 2 --vocab 4000 --repeats 1  # smoke run
    python bench/bench_delta.py --json               # results as JSON

Linux is assumed for the memory figures (``/proc``); elsewhere ``ru_maxrss`` is used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

METHODS = ("omotool", "naive")
SHARD_SIZE = "200MB"
PERTURB_SCALE = 0.001
RSS_GOAL = 3.0  # omotool's peak RSS should be at least this many times below naive's
TIME_GOAL = 1.0  # naive time / omotool time should be at least this (omotool no slower)
MIN_PARAMS = 100_000_000  # the default size must be at least this large
RESULT_TAG = "BENCH_RESULT "
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- child side: run one method and report its own measurements ------------------------------
def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _AnonSampler(threading.Thread):
    """Polls ``RssAnon`` every few milliseconds; ``peak_kb`` is the largest value seen."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kb = _status_kb("RssAnon") or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon") or 0)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon") or 0)
        return self.peak_kb


def _import_omotool() -> Any:
    import omotool.cli
    import omotool.delta  # noqa: F401  (imported lazily by the command; count it as an import)

    return omotool.cli.main


def _run_omotool(main: Any, base: str, sft: str, out: str) -> None:
    argv = sys.argv
    sys.argv = ["omotool", "delta", base, sft, "-o", out, "--overwrite"]
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"omotool delta exited with {exc.code}") from exc
    finally:
        sys.argv = argv


def _import_naive() -> None:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def _run_naive(base: str, sft: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base_state = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    sft_state = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).state_dict()
    diffs = {}
    for key, value in sft_state.items():
        if value.is_floating_point():
            diffs[key] = (value.float() - base_state[key].float()).contiguous()
        else:
            diffs[key] = value.clone().contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(diffs, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def child_main(method: str, base: str, sft: str, out: str) -> None:
    """Run ``method`` once and print its measurements as JSON on the last line of stdout."""
    sampler = _AnonSampler()
    sampler.start()
    started = time.perf_counter()
    if method == "omotool":
        main = _import_omotool()
    else:
        _import_naive()
    imported = time.perf_counter()
    rss_after_imports_kb = _status_kb("VmRSS")
    if method == "omotool":
        _run_omotool(main, base, sft, out)
    else:
        _run_naive(base, sft, out)
    finished = time.perf_counter()
    peak_anon_kb = sampler.stop()
    hwm_kb = _status_kb("VmHWM")
    result = {
        "method": method,
        "import_s": imported - started,
        "work_s": finished - imported,
        # ru_maxrss is in kB on Linux; it is only a fallback (see the module docstring).
        "peak_rss_kb": hwm_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_source": "VmHWM" if hwm_kb else "ru_maxrss",
        "peak_anon_kb": peak_anon_kb or None,
        "rss_after_imports_kb": rss_after_imports_kb,
    }
    sys.stdout.flush()
    print("\n" + RESULT_TAG + json.dumps(result), flush=True)


# -- parent side: models, runs, verification, report -----------------------------------------
def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    heads = args.heads or max(1, args.hidden // 64)
    # MLP size: 8/3 of the hidden size, rounded up to a multiple of 64 (768 -> 2048).
    intermediate = args.intermediate or -(-args.hidden * 8 // 3 // 64) * 64
    return {
        "arch": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "layers": args.layers,
        "heads": heads,
        "intermediate_size": intermediate,
        "seed": 0,
        "perturb_scale": PERTURB_SCALE,
        "max_shard_size": SHARD_SIZE,
    }


def prepare_models(workdir: Path, spec: dict[str, Any], log: Any) -> tuple[Path, Path, bool]:
    """Write (or reuse) ``base`` and ``sft`` for ``spec`` under ``workdir``; returns paths."""
    folder = workdir / "llama-v{vocab_size}-h{hidden_size}-l{layers}".format(**spec)
    base, sft, marker = folder / "base", folder / "sft", folder / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return base, sft, True
    import torch
    from transformers import AutoModelForCausalLM

    from omotool.tiny_models import build_model, perturbed, save_model

    shutil.rmtree(folder, ignore_errors=True)
    config = {k: spec[k] for k in ("vocab_size", "hidden_size", "layers", "heads")}
    log(f"building models in {folder} ...")
    build_model(
        base, spec["arch"], spec["seed"], torch.float32, spec["max_shard_size"],
        with_tokenizer=True, intermediate_size=spec["intermediate_size"], **config,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    save_model(perturbed(model, scale=spec["perturb_scale"]), sft, spec["max_shard_size"])
    del model
    marker.write_text(json.dumps(spec))
    return base, sft, False


def model_size(folder: Path) -> dict[str, int]:
    from omotool.io import ModelReader

    with ModelReader(folder) as reader:
        parameters = reader.numel()
    files = sorted(folder.glob("*.safetensors"))
    return {
        "parameters": parameters,
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "shards": len(files),
    }


def run_child(method: str, base: Path, sft: Path, out: Path) -> dict[str, Any]:
    """One run of ``method`` in a fresh interpreter; its wall time and its own report."""
    shutil.rmtree(out, ignore_errors=True)  # same starting point for both methods
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method]
    cmd += [str(base), str(sft), str(out)]
    env = {**os.environ, **CHILD_ENV}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"{method} run failed (exit {proc.returncode}):\n{tail}")
    report = json.loads(lines[-1].removeprefix(RESULT_TAG))
    report["wall_s"] = wall
    report["stderr_lines"] = len(proc.stderr.splitlines())
    return report


def verify(omotool_out: Path, naive_out: Path) -> dict[str, Any]:
    """Do omotool's tensors equal the naive differences exactly (same names, dtypes, values)?"""
    import torch

    from omotool.io import ModelReader

    with ModelReader(omotool_out) as ours, ModelReader(naive_out) as naive:
        only_ours = sorted(set(ours.names) - set(naive.names))
        only_naive = sorted(set(naive.names) - set(ours.names))
        common = sorted(set(ours.names) & set(naive.names))
        unequal, max_abs = [], 0.0
        for name in common:
            a, b = ours.get(name), naive.get(name)
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                unequal.append(name)
                if a.shape == b.shape:
                    max_abs = max(max_abs, float((a.double() - b.double()).abs().max()))
    return {
        "equal": not (only_ours or only_naive or unequal),
        "tensors_compared": len(common),
        "only_omotool": only_ours,
        "only_naive": only_naive,
        "unequal": unequal,
        "max_abs_difference": max_abs,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {
            "runs": len(mine),
            "median_wall_s": statistics.median(r["wall_s"] for r in mine),
            "median_work_s": statistics.median(r["work_s"] for r in mine),
            "median_import_s": statistics.median(r["import_s"] for r in mine),
            "peak_rss_mb": max(r["peak_rss_kb"] for r in mine) / 1024,
            "peak_anon_mb": max((r["peak_anon_kb"] or 0) for r in mine) / 1024 or None,
            "rss_after_imports_mb": max((r["rss_after_imports_kb"] or 0) for r in mine) / 1024,
            "wall_s": [r["wall_s"] for r in mine],
            "peak_rss_source": mine[0]["peak_rss_source"],
        }
    return summary


def _ratio_text(ratio: float, below: str, above: str) -> str:
    return f"{ratio:.2f}x {below}" if ratio >= 1 else f"{1 / ratio:.2f}x {above}"


def render(result: dict[str, Any]) -> str:
    model, methods, ratios = result["model"], result["methods"], result["ratios"]
    lines = [
        "omotool delta vs naive (load both models, subtract, save_file)",
        f"model: llama, {model['parameters']:,} parameters, "
        f"{model['bytes_on_disk'] / 1e6:,.1f} MB on disk per model "
        f"({model['shards']} shard(s) of <= {SHARD_SIZE}, float32); "
        f"{'reused' if result['reused_models'] else 'built'} in {result['models_dir']}",
        f"runs: {result['repeats']} per method, alternating; {os.cpu_count()} CPUs; "
        f"peak RSS from {methods['omotool']['peak_rss_source']}",
        "",
        f"{'method':<9}{'median wall s':>14}{'peak RSS MB':>13}{'peak anon MB':>14}"
        f"{'RSS after imports MB':>22}{'median work s':>15}  wall s per run",
    ]
    for method in METHODS:
        m = methods[method]
        anon = f"{m['peak_anon_mb']:.0f}" if m["peak_anon_mb"] else "n/a"
        per_run = ", ".join(f"{w:.2f}" for w in m["wall_s"])
        lines.append(
            f"{method:<9}{m['median_wall_s']:>14.2f}{m['peak_rss_mb']:>13.0f}{anon:>14}"
            f"{m['rss_after_imports_mb']:>22.0f}{m['median_work_s']:>15.2f}  {per_run}"
        )
    rss, wall = ratios["peak_rss_naive_over_omotool"], ratios["wall_naive_over_omotool"]
    lines += [
        "",
        f"ratios naive/omotool: peak RSS {rss:.2f}, wall time {wall:.2f}",
        f"omotool peak RSS is {_ratio_text(rss, 'below', 'above')} naive; "
        f"time {_ratio_text(wall, 'faster', 'slower')}",
        "",
        "goals:",
    ]
    for goal in result["goals"]:
        lines.append(f"  [{'PASS' if goal['met'] else 'MISS'}] {goal['goal']} ({goal['actual']})")
    check = result["correctness"]
    if check["equal"]:
        verdict = f"EQUAL ({check['tensors_compared']} tensors, torch.equal)"
    else:
        verdict = (
            f"DIFFERENT: {len(check['unequal'])} unequal of {check['tensors_compared']}, "
            f"only in omotool {check['only_omotool'][:5]}, only in naive "
            f"{check['only_naive'][:5]}, max |diff| {check['max_abs_difference']:.3g}"
        )
    lines.append(f"correctness (omotool tau vs naive differences): {verdict}")
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, workdir: Path, log: Any) -> dict[str, Any]:
    spec = model_spec(args)
    base, sft, reused = prepare_models(workdir, spec, log)
    size = model_size(base)
    if args.enforce_size and size["parameters"] < MIN_PARAMS:
        raise SystemExit(f"default model has {size['parameters']:,} < {MIN_PARAMS:,} parameters")
    outs = {method: workdir / f"out-{method}" for method in METHODS}
    runs = []
    for repeat in range(1, args.repeats + 1):
        for method in METHODS:
            report = run_child(method, base, sft, outs[method])
            log(
                f"run {repeat}/{args.repeats} {method:<8} wall {report['wall_s']:6.2f} s  "
                f"peak RSS {report['peak_rss_kb'] / 1024:7.0f} MB"
            )
            runs.append(report)
    correctness = verify(outs["omotool"], outs["naive"])
    methods = summarise(runs)
    ours, naive = methods["omotool"], methods["naive"]
    rss_ratio = naive["peak_rss_mb"] / ours["peak_rss_mb"]
    wall_ratio = naive["median_wall_s"] / ours["median_wall_s"]
    goals = [
        {
            "goal": f"omotool peak RSS at least {RSS_GOAL:g}x below naive",
            "met": rss_ratio >= RSS_GOAL,
            "actual": f"{rss_ratio:.2f}x",
        },
        {
            "goal": "omotool median wall time no worse than naive",
            "met": wall_ratio >= TIME_GOAL,
            "actual": f"{ours['median_wall_s']:.2f} s vs {naive['median_wall_s']:.2f} s",
        },
    ]
    return {
        "model": {**spec, **size},
        "models_dir": str(base.parent),
        "reused_models": reused,
        "repeats": args.repeats,
        "methods": methods,
        "ratios": {"peak_rss_naive_over_omotool": rss_ratio, "wall_naive_over_omotool": wall_ratio},
        "goals": goals,
        "correctness": correctness,
        "runs": runs,
    }


def add_model_options(parser: argparse.ArgumentParser, repeats_help: str) -> None:
    """The options every model benchmark shares: work folder, repeats, model size, --json."""
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) models here [temp dir]")
    parser.add_argument("--repeats", type=int, default=3, help=f"{repeats_help} [3]")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size [768]")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers [12]")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size [32000]")
    parser.add_argument("--heads", type=int, help="attention heads [hidden/64]")
    parser.add_argument("--intermediate", type=int, help="MLP size [8/3·hidden, /64]")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    defaults = {"hidden": 768, "layers": 12, "vocab": 32000}
    args.enforce_size = all(getattr(args, k) == v for k, v in defaults.items())


def run_benchmark(args: argparse.Namespace, benchmark, render, prefix: str) -> None:
    """Run ``benchmark(args, workdir, log)`` in --workdir or a temp dir; print the result."""

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = benchmark(args, args.workdir.resolve(), log)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            result = benchmark(args, Path(tmp), log)
    print(json.dumps(result, indent=2) if args.json else render(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `omotool delta` against loading both models and subtracting."
    )
    add_model_options(parser, "runs per method")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    run_benchmark(args, benchmark, render, "bench-delta-")


if __name__ == "__main__":
    main()
