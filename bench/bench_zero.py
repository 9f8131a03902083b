"""What online merging costs on DeepSpeed ZeRO-2/3 partitions, against what it costs unsharded.

What it measures
----------------
A tiny Llama built from a config (random weights; default hidden 256, 4 layers, 4 heads / 2 KV
heads, MLP 512, vocab 2048, untied embeddings: 3.4M float32 parameters in 37 tensors) and a
task vector ``τ = 1e-3·N(0, 1)`` of the same shapes. Three optimizers, all
``OnlineMergingAdamW`` with lr 1e-6, no weight decay, ``reserve_p`` 0.01 and ``α`` 1e-7:

- ``none``: ``method="none"`` (plain AdamW), the baseline (ratio 1.0);
- ``dare``: OnDARE (``method="dare"``);
- ``ties``: OnTIES (``method="ties"``).

**Sharded**: 2 CPU processes under torchrun (gloo, ``DS_ACCELERATOR=cpu``), one
``deepspeed.initialize`` per optimizer with the ZeRO section of the shipped ``--deepspeed
zero2`` or ``zero3`` config in ``omotool/train/deepspeed_configs/`` (its ``"auto"`` values left
to DeepSpeed's defaults), fp32, no gradient clipping, and ``attach_zero_runs`` for every
optimizer (``none`` included: the same partitions, the same per-run step). **Unsharded**: the
same three optimizers on the whole model in one process. Every process uses one thread
(``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``, ``NUMBA_NUM_THREADS=1``), so a rank steps
half the elements with what the unsharded process steps all of them with.

Each round runs one step of every optimizer on the same batch (random token ids, batch 2 per
process, length 32; forward and backward not timed), after ``--warmup`` untimed rounds. The
time of a step is the client optimizer's ``step()`` (wrapped; under ZeRO-3 the sum of its calls,
one per sub-group), and under DeepSpeed the slowest rank's. ``engine.step()`` as a whole
(reductions, copies, all-gathers included) is reported too. The report gives, per stage, the
median ms per step, the ratios merge/none sharded and unsharded and their difference (the goal:
sharding adds at most 0.2 to the ratio), and ``memory_report()`` of every optimizer: extra bytes
(beyond AdamW's moments and step counts) per parameter, sharded per element a rank holds and
summed over the ranks per model parameter, against unsharded.

How to run
----------
    python bench/bench_zero.py                      # about 40 s on 2 cores
    python bench/bench_zero.py --rounds 4 --hidden 128 --layers 2   # smoke run
    python bench/bench_zero.py --out results.json   # also write the results as JSON

Nothing is asserted on time: the machine this runs on may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# One thread per process (set before torch and numba load): see the docstring.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import socket  # noqa: E402

import torch  # noqa: E402

from omotool.optim import OnlineMergingAdamW  # noqa: E402
from omotool.train.deepspeed import DEEPSPEED_CONFIGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "dare", "ties")
BASELINE = "none"
GOAL = 0.2  # sharding adds at most this much to the ratio merge/none
SETTINGS = dict(lr=1e-6, weight_decay=0.0, reserve_p=0.01, alpha=1e-7)
TAU_SCALE, BATCH, LENGTH = 1e-3, 2, 32


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=args.vocab, max_position_embeddings=LENGTH, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def task_vector(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: torch.randn(param.shape, generator=generator) * TAU_SCALE
        for name, param in model.named_parameters()
    }


def batch(args: argparse.Namespace, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, args.vocab, (BATCH, LENGTH), generator=generator)


def timed_step(optimizer: torch.optim.Optimizer, seconds: list[float]) -> None:
    """Add each ``optimizer.step()``'s wall time to ``seconds[-1]`` (DeepSpeed's ZeRO-3 calls
    it once per sub-group in one engine step)."""
    inner = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[-1] += time.perf_counter() - start

    optimizer.step = step  # type: ignore[method-assign]


def extra_bytes(optimizer: OnlineMergingAdamW) -> float:
    return optimizer.memory_report()["extra_bytes"]


# -- unsharded: one process ------------------------------------------------------------------
def unsharded(args: argparse.Namespace) -> dict[str, Any]:
    """The three optimizers on the whole model, in turn each round."""
    models, optimizers, times = {}, {}, {}
    for method in METHODS:
        model = build_model(args)
        models[method] = model
        optimizers[method] = OnlineMergingAdamW(
            list(model.named_parameters()), task_vector(model), method=method, **SETTINGS
        )
        times[method] = []
        timed_step(optimizers[method], times[method])
    for step in range(args.warmup + args.rounds):
        ids = batch(args, step)
        for method in METHODS:
            models[method](ids, labels=ids).loss.backward()
            times[method].append(0.0)
            optimizers[method].step()
            optimizers[method].zero_grad()
    numel = sum(p.numel() for p in models[BASELINE].parameters())
    return {
        "parameters": numel,
        "methods": {
            method: {
                "ms": [1e3 * s for s in times[method][args.warmup :]],
                "extra_bytes_per_parameter": extra_bytes(optimizers[method]) / numel,
            }
            for method in METHODS
        },
    }


# -- sharded: a torchrun worker --------------------------------------------------------------
def zero_config(stage: int) -> dict[str, Any]:
    """The ZeRO section of the shipped ``--deepspeed zero<stage>`` config, ``"auto"`` values
    left to DeepSpeed's defaults, for one fp32 micro-batch per step without clipping."""
    shipped = json.loads((DEEPSPEED_CONFIGS / f"zero{stage}.json").read_text())
    zero = {k: v for k, v in shipped["zero_optimization"].items() if v != "auto"}
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def sharded_stage(args: argparse.Namespace, stage: int) -> dict[str, Any]:
    """One rank's measurements of the three optimizers under ZeRO-``stage``, gathered."""
    import deepspeed
    import torch.distributed as dist

    from omotool.optim.zero_runs import zero_runs

    engines, optimizers, times, engine_times, held, numel = {}, {}, {}, {}, {}, 0
    for method in METHODS:
        model = build_model(args)
        optimizer = OnlineMergingAdamW(
            list(model.named_parameters()), task_vector(model), method=method, **SETTINGS
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=zero_config(stage)
        )
        runs = zero_runs(engine, engine.module.named_parameters())
        optimizer.attach_zero_runs(runs)
        engines[method], optimizers[method] = engine, optimizer
        held[method] = sum(flat.numel() for flat in runs.flats)
        numel = sum(layout.numel for layout in runs.params.values())
        times[method], engine_times[method] = [], []
        timed_step(optimizer, times[method])
    for step in range(args.warmup + args.rounds):
        ids = batch(args, step)
        for method in METHODS:
            engine = engines[method]
            engine.backward(engine(ids, labels=ids).loss)
            times[method].append(0.0)
            start = time.perf_counter()
            engine.step()
            engine_times[method].append(time.perf_counter() - start)
    mine = {
        method: {
            "ms": [1e3 * s for s in times[method][args.warmup :]],
            "engine_ms": [1e3 * s for s in engine_times[method][args.warmup :]],
            "held": held[method],
            "extra_bytes": extra_bytes(optimizers[method]),
        }
        for method in METHODS
    }
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    for engine in engines.values():
        engine.destroy()

    def slowest(key: str, method: str) -> list[float]:
        return [max(step) for step in zip(*(rank[method][key] for rank in ranks), strict=True)]

    return {
        "parameters": numel,
        "methods": {
            method: {
                "ms": slowest("ms", method),
                "engine_ms": slowest("engine_ms", method),
                "extra_bytes_per_held_element": statistics.mean(
                    rank[method]["extra_bytes"] / rank[method]["held"] for rank in ranks
                ),
                "extra_bytes_per_parameter": sum(rank[method]["extra_bytes"] for rank in ranks)
                / numel,
            }
            for method in METHODS
        },
    }


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"zero{stage}": sharded_stage(args, stage) for stage in args.stages}
    if dist.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sharded(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run this script's worker under torchrun and read what rank 0 wrote."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "sharded.json"
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]]),
        }  # fmt: skip
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(args.processes), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), __file__, *argv, "--worker-out", str(out),
        ]  # fmt: skip
        process = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if process.returncode != 0:
            sys.exit(f"the torchrun workers exited {process.returncode}:\n{process.stdout[-6000:]}")
        return json.loads(out.read_text())


# -- report ----------------------------------------------------------------------------------
def summarise(sharded_runs: dict[str, Any], whole: dict[str, Any]) -> dict[str, Any]:
    def medians(run: dict[str, Any], key: str = "ms") -> dict[str, float]:
        return {m: statistics.median(run["methods"][m][key]) for m in METHODS}

    base = medians(whole)
    stages = {}
    for stage, run in sharded_runs.items():
        ms, engine_ms = medians(run), medians(run, "engine_ms")
        rows = {}
        for method in METHODS:
            ratio, unsharded_ratio = ms[method] / ms[BASELINE], base[method] / base[BASELINE]
            rows[method] = {
                "sharded_ms": ms[method],
                "sharded_engine_ms": engine_ms[method],
                "unsharded_ms": base[method],
                "sharded_ratio": ratio,
                "engine_ratio": engine_ms[method] / engine_ms[BASELINE],
                "unsharded_ratio": unsharded_ratio,
                "difference": ratio - unsharded_ratio,
                "goal": "" if method == BASELINE else
                ("PASS" if ratio - unsharded_ratio <= GOAL else "MISS"),
                "extra_bytes_per_held_element": run["methods"][method][
                    "extra_bytes_per_held_element"
                ],
                "sharded_extra_bytes_per_parameter": run["methods"][method][
                    "extra_bytes_per_parameter"
                ],
                "unsharded_extra_bytes_per_parameter": whole["methods"][method][
                    "extra_bytes_per_parameter"
                ],
            }  # fmt: skip
        stages[stage] = rows
    return stages


def render(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [
        f"bench_zero: tiny Llama, {result['parameters']:,} float32 parameters (hidden "
        f"{config['hidden']}, {config['layers']} layers, vocab {config['vocab']}); "
        f"{config['processes']} processes (gloo, 1 thread each) vs 1 process (1 thread); "
        f"{config['rounds']} timed rounds after {config['warmup']} warm-up; torch "
        f"{result['torch']}, deepspeed {result['deepspeed']}",
        "ms: median of the client optimizer's step() (sharded: the slowest rank's); "
        "engine: DeepSpeed's whole engine.step()",
        f"goal: sharded ratio - unsharded ratio <= {GOAL}",
        "extra B/param: memory_report() extra_bytes (beyond AdamW's moments and steps); "
        "sharded per element a rank holds | summed over ranks per model parameter",
    ]
    for stage, rows in result["stages"].items():
        lines += [
            "",
            f"ZeRO-{stage[-1]}",
            f"{'method':<6} {'sharded ms':>10} {'ratio':>6} {'engine ms':>9} {'ratio':>6} "
            f"{'unsharded ms':>12} {'ratio':>6} {'diff':>6} {'goal':>4}  "
            f"{'extra B/param: held | sum | unsharded':>38}",
        ]
        for method, r in rows.items():
            lines.append(
                f"{method:<6} {r['sharded_ms']:>10.2f} {r['sharded_ratio']:>6.2f} "
                f"{r['sharded_engine_ms']:>9.2f} {r['engine_ratio']:>6.2f} "
                f"{r['unsharded_ms']:>12.2f} {r['unsharded_ratio']:>6.2f} "
                f"{r['difference']:>+6.2f} {r['goal']:>4}  "
                f"{r['extra_bytes_per_held_element']:>12.3f} | "
                f"{r['sharded_extra_bytes_per_parameter']:>6.3f} | "
                f"{r['unsharded_extra_bytes_per_parameter']:>9.3f}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes")
    parser.add_argument(
        "--stages", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3],
        help="ZeRO stages, comma-separated (2,3)",
    )  # fmt: skip
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # set for the torchrun workers
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_out:
        worker(args)
        return
    import deepspeed

    torch.set_num_threads(1)
    forwarded = [a for i, a in enumerate(argv) if a != "--out" and argv[i - 1 : i] != ["--out"]]
    print("sharded runs (torchrun) ...", file=sys.stderr, flush=True)
    sharded_runs = sharded(args, forwarded)
    print("unsharded runs ...", file=sys.stderr, flush=True)
    whole = unsharded(args)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker_out")}
    result = {
        "config": config,
        "parameters": whole["parameters"],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "stages": summarise(sharded_runs, whole),
        "raw": {"sharded": sharded_runs, "unsharded": whole},
    }
    print(render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
