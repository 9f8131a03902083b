"""Benchmark ``omotool merge-offline`` against mergekit (``mergekit-yaml``) on the same merges.

What it measures
----------------
A Llama-style model of about 127M parameters (float32, sharded into 200MB safetensors files)
is the "SFT" model; an "RLHF" model is derived from it (every parameter moved by
0.001·N(0, 1), ``omotool.tiny_models.perturbed`` with an explicit seed). Both are written to
a work folder (model building follows ``bench_delta.py``). Two cases are run by both tools:

1. ``single``: one linear merge at alpha 0.3, ``θ = 0.7·θ_sft + 0.3·θ_rlhf``.

   - omotool: ``omotool merge-offline --sft SFT --rlhf RLHF --alpha 0.3 -o OUT --overwrite``,
     the real CLI run in-process in the child.
   - mergekit: ``mergekit-yaml config.yaml OUT`` + ``MERGEKIT_FLAGS``, config
     ``merge_method: linear``, SFT weight 0.7, RLHF weight 0.3, ``dtype: float32``.

2. ``sweep``: alphas 0.1, 0.3, 0.5, 0.7, 0.9.

   - omotool: one run, ``--alpha 0.1,0.3,0.5,0.7,0.9`` (reads every input tensor once).
   - mergekit: five separate ``mergekit-yaml`` runs, one per alpha (as a user would run them);
     their wall times are summed and their peak RSS is the largest of the five.

Every run is a fresh child process. omotool's child runs under this interpreter (the project
venv); mergekit's child runs under the Python of a separate benchmark venv (``--mergekit-env``,
mergekit is never installed into the project venv) and calls ``mergekit-yaml``'s ``main`` in
process, so that its memory is its own. Wall time is measured by this script (it includes
interpreter start-up and imports); peak RSS is the child's own ``VmHWM`` from
``/proc/self/status`` (``ru_maxrss`` would carry the parent's RSS over fork/exec). The child
also samples its anonymous RSS (``RssAnon``), separating memory it allocated from file pages
it memory-mapped, and records its RSS after imports.

The tools alternate within each case (the tool going first swaps every repeat), ``--repeats``
times (default 3). The report gives per tool and case the median wall time and the largest
peak RSS, the ratios mergekit/omotool, a one-off correctness check (every tensor of omotool's
output against mergekit's, ``allclose`` at ``atol`` 1e-6, max |diff| printed) and the goals
with PASS/MISS:

- single merge: omotool no slower than mergekit, and no more peak RSS;
- sweep: omotool under half the time of the five mergekit runs;
- memory bounded by a few tensors, not the model: omotool's peak RSS minus its RSS after
  imports, against the size of one model on disk (single: at most 4 of the largest tensor and
  under the model size; sweep, which holds five merged tensors at a time: under the model size).

How to run
----------
Set up the mergekit environment once (torch 2.13.0 first: it is on this machine's disk as a
CPU build; any other torch would pull a multi-GB CUDA build)::

    python3 -m venv /tmp/mergekit-env
    /tmp/mergekit-env/bin/pip install torch==2.13.0
    /tmp/mergekit-env/bin/pip install mergekit
    /tmp/mergekit-env/bin/pip list | grep -i torch      # must still say 2.13.0+cpu

Then, with the project venv active::

    python bench/bench_merge.py                        # ~127M parameters, 3 repeats
    python bench/bench_merge.py --workdir /tmp/bm      # keep (and later reuse) the models there
    python bench/bench_merge.py --hidden 256 --layers 2 --vocab 4000 --repeats 1  # smoke run
    python bench/bench_merge.py --mergekit-env PATH    # mergekit venv elsewhere
    python bench/bench_merge.py --json                 # results as JSON

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
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_delta import (  # noqa: E402
    _AnonSampler,
    _ratio_text,
    _status_kb,
    add_model_options,
    check_model_options,
    model_size,
    run_benchmark,
)

TOOLS = ("omotool", "mergekit")
CASES = ("single", "sweep")
SINGLE_ALPHA = 0.3
SWEEP_ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
SHARD_SIZE = "200MB"
PERTURB_SCALE = 0.001
PERTURB_SEED = 1
ATOL = 1e-6
FEW_TENSORS = 4  # single merge: omotool's RSS growth at most this many of the largest tensor
SWEEP_TIME_GOAL = 2.0  # five mergekit runs / one omotool sweep should be at least this
MIN_PARAMS = 100_000_000  # the default size must be at least this large
DEFAULT_ENV = Path("/tmp/mergekit-env")
# mergekit-yaml flags on CPU: lazy unpickler on (a no-op for safetensors inputs, which are read
# lazily anyway), no CUDA, no progress bars; tokenizer copied like omotool copies it.
MERGEKIT_FLAGS = ["--lazy-unpickle", "--no-cuda", "--copy-tokenizer", "--quiet"]
RESULT_TAG = "BENCH_RESULT "
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SETUP_HELP = """\
mergekit environment not found at {env} (need {python} with mergekit importable).
mergekit is benchmarked from its own venv, never from the project venv. Set it up with:

    python3 -m venv {env}
    {env}/bin/pip install torch==2.13.0     # first: the CPU build on this machine's disk
    {env}/bin/pip install mergekit          # if it wants another torch: --no-deps, then
                                            # its other requirements by hand
    {env}/bin/pip list | grep -i torch      # must still say 2.13.0+cpu

or pass --mergekit-env PATH to use a venv elsewhere."""


# -- child side: run one tool once and report its own measurements ---------------------------
def _import_tool(tool: str) -> Any:
    if tool == "omotool":
        import omotool.cli
        import omotool.merge_offline  # noqa: F401  (imported lazily by the command)

        return omotool.cli.main
    from mergekit.scripts.run_yaml import main as mergekit_main

    return mergekit_main


def _run_tool(tool: str, entry: Any, argv: list[str]) -> None:
    if tool == "mergekit":  # a click command: run it without letting it exit the process
        entry(argv, standalone_mode=False)
        return
    saved = sys.argv
    sys.argv = ["omotool", *argv]
    try:
        entry()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"omotool exited with {exc.code}") from exc
    finally:
        sys.argv = saved


def child_main(tool: str, argv_json: str) -> None:
    """Run ``tool`` once with ``argv`` and print its measurements on the last line of stdout."""
    sampler = _AnonSampler()
    sampler.start()
    started = time.perf_counter()
    entry = _import_tool(tool)
    imported = time.perf_counter()
    rss_after_imports_kb = _status_kb("VmRSS")
    _run_tool(tool, entry, json.loads(argv_json))
    finished = time.perf_counter()
    peak_anon_kb = sampler.stop()
    hwm_kb = _status_kb("VmHWM")
    result = {
        "tool": tool,
        "import_s": imported - started,
        "work_s": finished - imported,
        "peak_rss_kb": hwm_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_source": "VmHWM" if hwm_kb else "ru_maxrss",
        "peak_anon_kb": peak_anon_kb or None,
        "rss_after_imports_kb": rss_after_imports_kb,
    }
    sys.stdout.flush()
    print("\n" + RESULT_TAG + json.dumps(result), flush=True)


# -- parent side: environment, models, runs, verification, report --------------------------
def mergekit_python(env: Path) -> Path:
    """The mergekit venv's Python, or SystemExit with the setup instructions."""
    python = env / "bin" / "python"
    probe = [str(python), "-c", "import mergekit, torch; print(torch.__version__)"]
    try:
        ok = subprocess.run(probe, capture_output=True, text=True, check=False)
    except OSError:
        ok = None
    if ok is None or ok.returncode != 0:
        raise SystemExit(SETUP_HELP.format(env=env, python=python))
    return python


def mergekit_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers')}))"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    heads = args.heads or max(1, args.hidden // 64)
    intermediate = args.intermediate or -(-args.hidden * 8 // 3 // 64) * 64  # 768 -> 2048
    return {
        "arch": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "layers": args.layers,
        "heads": heads,
        "intermediate_size": intermediate,
        "seed": 0,
        "perturb_scale": PERTURB_SCALE,
        "perturb_seed": PERTURB_SEED,
        "max_shard_size": SHARD_SIZE,
    }


def prepare_models(workdir: Path, spec: dict[str, Any], log: Any) -> tuple[Path, Path, bool]:
    """Write (or reuse) ``sft`` and ``rlhf`` for ``spec`` under ``workdir``; returns paths."""
    folder = workdir / "merge-llama-v{vocab_size}-h{hidden_size}-l{layers}".format(**spec)
    sft, rlhf, marker = folder / "sft", folder / "rlhf", folder / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return sft, rlhf, True
    import torch
    from transformers import AutoModelForCausalLM

    from omotool.tiny_models import build_model, perturbed, save_model

    shutil.rmtree(folder, ignore_errors=True)
    config = {k: spec[k] for k in ("vocab_size", "hidden_size", "layers", "heads")}
    log(f"building models in {folder} ...")
    build_model(
        sft, spec["arch"], spec["seed"], torch.float32, spec["max_shard_size"],
        with_tokenizer=True, intermediate_size=spec["intermediate_size"], **config,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    model = perturbed(model, scale=spec["perturb_scale"], seed=spec["perturb_seed"])
    save_model(model, rlhf, spec["max_shard_size"])
    del model
    marker.write_text(json.dumps(spec))
    return sft, rlhf, False


def largest_tensor_bytes(folder: Path) -> int:
    from omotool.io import ModelReader

    with ModelReader(folder) as reader:
        return max(
            reader.dtype(name).itemsize * _numel(reader.shape(name)) for name in reader.names
        )


def _numel(shape: Any) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def write_mergekit_config(path: Path, sft: Path, rlhf: Path, alpha: float) -> Path:
    """A ``merge_method: linear`` config: SFT weight 1 - alpha, RLHF weight alpha, float32."""
    text = (
        "merge_method: linear\n"
        "dtype: float32\n"
        "out_dtype: float32\n"
        "models:\n"
        f"  - model: {sft}\n"
        "    parameters:\n"
        f"      weight: {1.0 - alpha:.12g}\n"
        f"  - model: {rlhf}\n"
        "    parameters:\n"
        f"      weight: {alpha:.12g}\n"
    )
    path.write_text(text)
    return path


def run_child(python: Path, tool: str, argv: list[str], out: Path) -> dict[str, Any]:
    """One run of ``tool`` in a fresh interpreter; its wall time and its own report."""
    shutil.rmtree(out, ignore_errors=True)  # same starting point for both tools
    cmd = [str(python), str(Path(__file__).resolve()), "--child", tool, json.dumps(argv)]
    env = {**os.environ, **CHILD_ENV}
    env.pop("VIRTUAL_ENV", None)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"{tool} run failed (exit {proc.returncode}): {cmd}\n{tail}")
    report = json.loads(lines[-1].removeprefix(RESULT_TAG))
    report["wall_s"] = wall
    return report


def run_case(
    case: str, tool: str, ctx: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One repeat of ``case`` by ``tool``: the combined report and the child reports."""
    sft, rlhf, work = ctx["sft"], ctx["rlhf"], ctx["workdir"]
    out = work / f"out-{case}-{tool}"
    if tool == "omotool":
        alphas = [SINGLE_ALPHA] if case == "single" else list(SWEEP_ALPHAS)
        argv = ["merge-offline", "--sft", str(sft), "--rlhf", str(rlhf)]
        argv += ["--alpha", ",".join(f"{a:g}" for a in alphas), "-o", str(out), "--overwrite"]
        children = [run_child(Path(sys.executable), tool, argv, out)]
    else:
        children = []
        targets = [(SINGLE_ALPHA, out)] if case == "single" else [
            (a, out / f"alpha-{a:g}") for a in SWEEP_ALPHAS
        ]  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
        for alpha, target in targets:
            config = write_mergekit_config(work / f"mergekit-{alpha:g}.yaml", sft, rlhf, alpha)
            argv = [str(config), str(target), *MERGEKIT_FLAGS]
            children.append(run_child(ctx["mergekit_python"], tool, argv, target))
    combined = {
        "tool": tool,
        "case": case,
        "wall_s": sum(c["wall_s"] for c in children),
        "work_s": sum(c["work_s"] for c in children),
        "import_s": sum(c["import_s"] for c in children),
        "peak_rss_kb": max(c["peak_rss_kb"] for c in children),
        "peak_anon_kb": max((c["peak_anon_kb"] or 0) for c in children) or None,
        "rss_after_imports_kb": max((c["rss_after_imports_kb"] or 0) for c in children),
        "peak_rss_source": children[0]["peak_rss_source"],
        "processes": len(children),
    }
    return combined, children


def _tensor_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no safetensors files in {folder}")
    return files


def compare_folders(ours: Path, theirs: Path) -> dict[str, Any]:
    """Every tensor of two model folders: names, shapes, dtypes, allclose at ``ATOL``."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        where = {}
        for file in _tensor_files(folder):
            with safe_open(str(file), framework="pt") as handle:
                where.update({name: file for name in handle.keys()})  # noqa: SIM118
        return where

    a_index, b_index = index(ours), index(theirs)
    common = sorted(set(a_index) & set(b_index))
    mismatched, max_abs = [], 0.0
    for name in common:
        with safe_open(str(a_index[name]), framework="pt") as fa:
            a = fa.get_tensor(name)
        with safe_open(str(b_index[name]), framework="pt") as fb:
            b = fb.get_tensor(name)
        if a.shape != b.shape or a.dtype != b.dtype:
            mismatched.append(f"{name} {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}")
            continue
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        max_abs = max(max_abs, diff)
        if not torch.allclose(a, b, rtol=0.0, atol=ATOL):
            mismatched.append(f"{name} max |diff| {diff:.3g}")
    only_ours = sorted(set(a_index) - set(b_index))
    only_theirs = sorted(set(b_index) - set(a_index))
    return {
        "close": not (only_ours or only_theirs or mismatched),
        "tensors_compared": len(common),
        "only_omotool": only_ours,
        "only_mergekit": only_theirs,
        "mismatched": mismatched,
        "max_abs_difference": max_abs,
    }


def verify(case: str, workdir: Path) -> dict[str, Any]:
    """omotool's output(s) of ``case`` against mergekit's, every tensor, once."""
    ours, theirs = workdir / f"out-{case}-omotool", workdir / f"out-{case}-mergekit"
    if case == "single":
        pairs = [(SINGLE_ALPHA, ours, theirs)]
    else:
        pairs = [(a, ours / f"alpha-{a:g}", theirs / f"alpha-{a:g}") for a in SWEEP_ALPHAS]
    per_alpha = {f"{a:g}": compare_folders(o, t) for a, o, t in pairs}
    return {
        "close": all(r["close"] for r in per_alpha.values()),
        "tensors_compared": sum(r["tensors_compared"] for r in per_alpha.values()),
        "max_abs_difference": max(r["max_abs_difference"] for r in per_alpha.values()),
        "atol": ATOL,
        "per_alpha": per_alpha,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for case in CASES:
        summary[case] = {}
        for tool in TOOLS:
            mine = [r for r in runs if r["case"] == case and r["tool"] == tool]
            summary[case][tool] = {
                "runs": len(mine),
                "processes_per_run": mine[0]["processes"],
                "median_wall_s": statistics.median(r["wall_s"] for r in mine),
                "median_work_s": statistics.median(r["work_s"] for r in mine),
                "median_import_s": statistics.median(r["import_s"] for r in mine),
                "peak_rss_mb": max(r["peak_rss_kb"] for r in mine) / 1024,
                "peak_anon_mb": max((r["peak_anon_kb"] or 0) for r in mine) / 1024 or None,
                "rss_after_imports_mb": max(r["rss_after_imports_kb"] for r in mine) / 1024,
                "peak_growth_mb": max(r["peak_rss_kb"] - r["rss_after_imports_kb"] for r in mine)
                / 1024,
                "wall_s": [r["wall_s"] for r in mine],
                "peak_rss_source": mine[0]["peak_rss_source"],
            }
    return summary


def goals_for(
    tools: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float]], model_mb: float,
    largest_mb: float,
) -> list[dict[str, Any]]:  # fmt: skip
    single, sweep = tools["single"], tools["sweep"]
    s_ours, s_mk = single["omotool"], single["mergekit"]
    w_ours, w_mk = sweep["omotool"], sweep["mergekit"]
    few_mb = FEW_TENSORS * largest_mb
    growth_single, growth_sweep = s_ours["peak_growth_mb"], w_ours["peak_growth_mb"]
    return [
        {
            "goal": "single merge: omotool median wall time no worse than mergekit",
            "met": ratios["single"]["wall"] >= 1.0,
            "actual": f"{s_ours['median_wall_s']:.2f} s vs {s_mk['median_wall_s']:.2f} s",
        },
        {
            "goal": "single merge: omotool peak RSS no more than mergekit",
            "met": ratios["single"]["peak_rss"] >= 1.0,
            "actual": f"{s_ours['peak_rss_mb']:.0f} MB vs {s_mk['peak_rss_mb']:.0f} MB",
        },
        {
            "goal": f"sweep: omotool under 1/{SWEEP_TIME_GOAL:g} the time of "
            f"{len(SWEEP_ALPHAS)} mergekit runs",
            "met": ratios["sweep"]["wall"] > SWEEP_TIME_GOAL,
            "actual": f"{w_ours['median_wall_s']:.2f} s vs {w_mk['median_wall_s']:.2f} s, "
            f"{ratios['sweep']['wall']:.2f}x",
        },
        {
            "goal": f"single merge: omotool peak RSS - RSS after imports <= {FEW_TENSORS} "
            f"largest tensors ({few_mb:.0f} MB) and < model size ({model_mb:.0f} MB)",
            "met": growth_single <= few_mb and growth_single < model_mb,
            "actual": f"{growth_single:.0f} MB = {growth_single / largest_mb:.1f} largest "
            f"tensors = {growth_single / model_mb:.2f} x model",
        },
        {
            "goal": f"sweep: omotool peak RSS - RSS after imports < model size ({model_mb:.0f} MB)",
            "met": growth_sweep < model_mb,
            "actual": f"{growth_sweep:.0f} MB = {growth_sweep / largest_mb:.1f} largest "
            f"tensors = {growth_sweep / model_mb:.2f} x model",
        },
    ]


def render(result: dict[str, Any]) -> str:
    model, tools, ratios = result["model"], result["tools"], result["ratios"]
    versions = result["mergekit_env"]
    lines = [
        "omotool merge-offline vs mergekit (mergekit-yaml, merge_method: linear)",
        f"model: llama, {model['parameters']:,} parameters, "
        f"{model['bytes_on_disk'] / 1e6:,.1f} MB on disk per model "
        f"({model['shards']} shard(s) of <= {SHARD_SIZE}, float32), largest tensor "
        f"{model['largest_tensor_bytes'] / 1e6:,.1f} MB; "
        f"{'reused' if result['reused_models'] else 'built'} in {result['models_dir']}",
        f"mergekit {versions['mergekit']} (torch {versions['torch']}, transformers "
        f"{versions['transformers']}) from {result['mergekit_python']}; flags "
        f"{' '.join(MERGEKIT_FLAGS)}",
        f"runs: {result['repeats']} per tool and case, alternating; {os.cpu_count()} CPUs; "
        f"peak RSS from {tools['single']['omotool']['peak_rss_source']} (largest over runs)",
        f"single: alpha {SINGLE_ALPHA:g}; sweep: alphas "
        f"{','.join(f'{a:g}' for a in SWEEP_ALPHAS)} (omotool 1 run, mergekit "
        f"{len(SWEEP_ALPHAS)} runs: wall summed, peak RSS max)",
        "",
        f"{'case':<8}{'tool':<10}{'median wall s':>14}{'peak RSS MB':>13}{'peak anon MB':>14}"
        f"{'after imports MB':>18}{'median work s':>15}  wall s per run",
    ]
    for case in CASES:
        for tool in TOOLS:
            m = tools[case][tool]
            anon = f"{m['peak_anon_mb']:.0f}" if m["peak_anon_mb"] else "n/a"
            per_run = ", ".join(f"{w:.2f}" for w in m["wall_s"])
            lines.append(
                f"{case:<8}{tool:<10}{m['median_wall_s']:>14.2f}{m['peak_rss_mb']:>13.0f}"
                f"{anon:>14}{m['rss_after_imports_mb']:>18.0f}{m['median_work_s']:>15.2f}"
                f"  {per_run}"
            )
    lines += ["", "ratios mergekit/omotool:"]
    for case in CASES:
        rss, wall = ratios[case]["peak_rss"], ratios[case]["wall"]
        lines.append(
            f"  {case:<7} wall time {wall:.2f} (omotool {_ratio_text(wall, 'faster', 'slower')})"
            f", peak RSS {rss:.2f} (omotool {_ratio_text(rss, 'below', 'above')})"
        )
    growth = {case: tools[case]["omotool"]["peak_growth_mb"] for case in CASES}
    model_mb = model["bytes_on_disk"] / 2**20
    lines += [
        "",
        f"omotool peak RSS - RSS after imports: single {growth['single']:.0f} MB, sweep "
        f"{growth['sweep']:.0f} MB; one model on disk {model_mb:.0f} MB",
        "",
        "goals:",
    ]
    for goal in result["goals"]:
        lines.append(f"  [{'PASS' if goal['met'] else 'MISS'}] {goal['goal']} ({goal['actual']})")
    lines.append("")
    for case in CASES:
        check = result["correctness"][case]
        if check["close"]:
            verdict = f"CLOSE ({check['tensors_compared']} tensors, allclose atol {ATOL:g})"
        else:
            bad = {a: r for a, r in check["per_alpha"].items() if not r["close"]}
            first = next(iter(bad.values()))
            verdict = (
                f"DIFFERENT at alpha {', '.join(bad)}: {len(first['mismatched'])} mismatched, "
                f"only in omotool {first['only_omotool'][:5]}, only in mergekit "
                f"{first['only_mergekit'][:5]}, e.g. {first['mismatched'][:3]}"
            )
        lines.append(
            f"correctness {case} (omotool vs mergekit): {verdict}; "
            f"max |diff| {check['max_abs_difference']:.3g}"
        )
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, workdir: Path, log: Any) -> dict[str, Any]:
    python = mergekit_python(args.mergekit_env)
    versions = mergekit_versions(python)
    spec = model_spec(args)
    sft, rlhf, reused = prepare_models(workdir, spec, log)
    size = model_size(sft)
    size["largest_tensor_bytes"] = largest_tensor_bytes(sft)
    if args.enforce_size and size["parameters"] < MIN_PARAMS:
        raise SystemExit(f"default model has {size['parameters']:,} < {MIN_PARAMS:,} parameters")
    ctx = {"sft": sft, "rlhf": rlhf, "workdir": workdir, "mergekit_python": python}
    runs, children = [], []
    for repeat in range(1, args.repeats + 1):
        order = TOOLS if repeat % 2 else TOOLS[::-1]
        for case in CASES:
            for tool in order:
                report, kids = run_case(case, tool, ctx)
                log(
                    f"run {repeat}/{args.repeats} {case:<6} {tool:<8} "
                    f"wall {report['wall_s']:7.2f} s  peak RSS {report['peak_rss_kb'] / 1024:6.0f}"
                    f" MB ({report['processes']} process{'es' if len(kids) > 1 else ''})"
                )
                runs.append({**report, "repeat": repeat})
                children += [{**kid, "case": case, "repeat": repeat} for kid in kids]
    log("checking correctness ...")
    correctness = {case: verify(case, workdir) for case in CASES}
    tools = summarise(runs)
    ratios = {}
    for case in CASES:
        ours, theirs = tools[case]["omotool"], tools[case]["mergekit"]
        ratios[case] = {
            "wall": theirs["median_wall_s"] / ours["median_wall_s"],
            "peak_rss": theirs["peak_rss_mb"] / ours["peak_rss_mb"],
        }
    goals = goals_for(
        tools, ratios, size["bytes_on_disk"] / 2**20, size["largest_tensor_bytes"] / 2**20
    )
    return {
        "model": {**spec, **size},
        "models_dir": str(sft.parent),
        "reused_models": reused,
        "mergekit_python": str(python),
        "mergekit_env": versions,
        "mergekit_flags": MERGEKIT_FLAGS,
        "repeats": args.repeats,
        "tools": tools,
        "ratios": ratios,
        "goals": goals,
        "correctness": correctness,
        "runs": runs,
        "processes": children,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `omotool merge-offline` against mergekit-yaml on the same merges."
    )
    add_model_options(parser, "runs per tool and case")
    parser.add_argument(
        "--mergekit-env", type=Path, default=DEFAULT_ENV, help=f"mergekit venv [{DEFAULT_ENV}]"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    run_benchmark(args, benchmark, render, "bench-merge-")


if __name__ == "__main__":
    main()
