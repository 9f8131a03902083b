"""Benchmark the wall time of a training step with online merging against plain AdamW.

What it measures
----------------
A small Llama (default hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024, vocab 320:
4.1M float32 parameters in 39 tensors, built offline with ``omotool.tiny_models.build_pair``),
its task vector ``τ = θ_sft − θ_base`` (``omotool.delta.compute_delta``) and the arithmetic
preferences of ``recipes/data/tiny-prefs.jsonl``. Every method trains DPO on the same model,
data, seed and settings through omotool's real training path,
``omotool.train.runner.run_training`` (TRL's ``DPOTrainer`` with a reference model,
``TrainConfig`` defaults otherwise). With ``--algo grpo`` it trains GRPO instead (TRL's
``GRPOTrainer``, beta 0: no reference model) on the arithmetic prompts of
``recipes/data/tiny-prompts.jsonl`` with the ``last_number`` reward, ``--num-generations``
completions per prompt of up to ``--max-completion-length`` tokens; the sampling
(``GRPOTrainer._generate``) is timed too, and reported as its share of the step:

- ``none``: ``--merge none`` (``OnlineMergingAdamW(method="none")``, plain AdamW): the
  baseline, ratio 1.0;
- ``dare``, ``ties``: ``--merge dare`` / ``--merge ties`` (OnDARE / OnTIES);
- ``transcription-dare``, ``transcription-ties``: the same run with the trainer's optimizer
  replaced by ``TranscribedOnlineMerging`` from ``bench/bench_optim.py``, the dense transcription
  of the paper's Algorithm 1 that costs what the released optimizers cost. It is handed to the
  same trainer class (omotool's ``online_merging_trainer``, whose ``create_optimizer`` is
  overridden here), with the same lr, betas, eps, ``reserve_p`` and ``alpha``;
- ``trl-adamw``: TRL's own optimizer, i.e. the trainer without
  omotool's ``create_optimizer`` (transformers' default ``adamw_torch_fused``).

A step is timed by a transformers ``TrainerCallback``, from ``on_step_begin`` to
``on_step_end``: forward and backward of policy and reference, gradient clipping, the optimizer
step, the scheduler step and ``zero_grad`` (the batch is fetched before ``on_step_begin``;
logging comes after ``on_step_end``). The optimizer's own time is ``on_pre_optimizer_step`` to
``on_optimizer_step``. Each method's ``run_training`` runs in its own thread, and the threads
take steps in turn (``Turns``): one step of every method per round, back to back on the same
batch (same seed), only one thread working at any time, the order rotating by one place each
round. Drift on a shared machine thus hits all methods alike within seconds. The set-ups run
one at a time before the first step. Each run trains ``--warmup`` untimed steps (state
allocation, numba kernels loaded), ``--steps`` timed ones, and one closing untimed step (it may
overlap another run saving its final model). The report gives per method the median ms per
step and its quartiles, the ratio to ``none`` (of the medians, and the median of the per-round
ratios), the optimizer's median ms, its share of the step and what it adds to ``none``'s step,
the issue's goals with PASS/MISS (online merging adds at most 5% (DARE) and 15% (TIES) to a
step, judged on the paired ratio: see ``paired_ratio``) and how much slower a step is with the
transcription than with omotool's optimizer (paired too).

How to run
----------
    python bench/bench_train.py                          # default size (~2.5 minutes)
    python bench/bench_train.py --quick                  # smoke run (well under a minute)
    python bench/bench_train.py --hidden 512 --layers 8 --steps 10   # a bigger model
    python bench/bench_train.py --methods none,dare,ties,trl-adamw
    python bench/bench_train.py --workdir /tmp/bt        # keep models, τ and runs there
    python bench/bench_train.py --json                   # results as JSON
    python bench/bench_train.py --algo grpo --methods none,dare,ties   # online RL steps

Run it with this checkout first on ``PYTHONPATH`` (``export PYTHONPATH=$PWD``) so that the
omotool being measured is this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):  # fmt: skip
    os.environ.setdefault(_key, _value)  # nothing is downloaded
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_optim, next to this file

from bench_optim import TranscribedOnlineMerging  # noqa: E402

from omotool.train import runner as train_runner  # noqa: E402
from omotool.train.runner import TrainConfig, run_training  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = {
    "dpo": REPO / "recipes" / "data" / "tiny-prefs.jsonl",
    "grpo": REPO / "recipes" / "data" / "tiny-prompts.jsonl",
}
ALGOS = tuple(DEFAULT_DATA)
BASELINE = "none"
METHODS: dict[str, str] = {
    "none": "--merge none (OnlineMergingAdamW, plain AdamW)",
    "dare": "--merge dare (OnDARE)",
    "ties": "--merge ties (OnTIES)",
    "transcription-dare": "Algorithm 1 transcription, DARE",
    "transcription-ties": "Algorithm 1 transcription, TIES",
    "trl-adamw": "TRL's own optimizer (adamw_torch_fused)",
}
DEFAULT_METHODS = tuple(METHODS)
# The goals: online merging adds at most this fraction to a step.
GOALS = (("dare", 0.05), ("ties", 0.15))
PAIRS = (("dare", "transcription-dare"), ("ties", "transcription-ties"))


# -- lock-step turns and timing --------------------------------------------------------------
class Turns:
    """Lets the training threads take steps one at a time, in rounds of one step each.

    A thread waits for its turn at the start of each step and hands the turn on at the start
    of its next one, so what the trainer does between two steps (logging, fetching the next
    batch) stays inside its own turn. No thread starts its first step before every thread has
    arrived there. The set-ups (``run_training`` up to the first step) run one at a time too
    (``begin_setup``): besides sharing the CPUs, they are not thread-safe (``datasets``
    fingerprints functions with dill, which swaps ``sys.stdout`` while disassembling them).
    A thread that ends or fails drops out of the cycle; a failure stops the others too.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.condition = threading.Condition()
        self.arrived: set[int] = set()
        self.done: set[int] = set()
        self.order = list(range(count))
        self.position = 0
        self.turn = 0
        self.holder: int | None = None
        self.failure: str | None = None
        self.setup = threading.Lock()
        self.setting_up: int | None = None

    def begin_setup(self, index: int) -> None:
        self.setup.acquire()
        self.setting_up = index

    def _end_setup(self, index: int) -> None:
        if self.setting_up == index:
            self.setting_up = None
            self.setup.release()

    def _advance(self) -> None:
        """The turn to the next thread still training; each round starts one place later
        in the order than the previous one, so that no method keeps one position."""
        if len(self.done) >= self.count:
            return
        while True:
            self.position += 1
            if self.position == self.count:
                self.position = 0
                self.order = self.order[1:] + self.order[:1]
            if self.order[self.position] not in self.done:
                self.turn = self.order[self.position]
                return

    def acquire(self, index: int) -> None:
        with self.condition:
            self._end_setup(index)
            self.arrived.add(index)
            if self.holder == index:  # hand the turn on, then wait for it to come back
                self.holder = None
                self._advance()
            self.condition.notify_all()
            while not (
                self.failure or (len(self.arrived | self.done) == self.count and self.turn == index)
            ):
                self.condition.wait()
            if self.failure:
                raise RuntimeError(f"stopped: {self.failure}")
            self.holder = index

    def finish(self, index: int, failure: str | None = None) -> None:
        with self.condition:
            self._end_setup(index)
            self.done.add(index)
            if failure and not self.failure:
                self.failure = failure
            if self.holder == index:
                self.holder = None
            if self.turn == index:
                self._advance()
            self.condition.notify_all()


def step_timer(turns: Turns, index: int) -> Any:
    """A callback taking turns (``Turns``) and recording, per step, the step's and the
    optimizer's wall time in seconds."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.optimizer: list[float] = []
            self.generation: list[float] = []  # GRPO: sampling, once per step
            self._step = self._opt = 0.0

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            turns.finish(index)  # saving the final model overlaps the others' last steps

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            turns.acquire(index)
            self._step = time.perf_counter()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._opt = time.perf_counter()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.optimizer.append(time.perf_counter() - self._opt)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps.append(time.perf_counter() - self._step)

    return StepTimer()


# -- the optimizer swapped into the trainer ---------------------------------------------------
_current = threading.local()  # .method: the method the calling thread trains


def install_factory(tau: Any, args: argparse.Namespace) -> Callable[[], None]:
    """Replace ``run_training``'s trainer factory by one that looks at the calling thread's
    method: ``transcription-*`` gets omotool's trainer class with ``create_optimizer`` handing
    the trainer a ``TranscribedOnlineMerging``; ``trl-adamw`` the TRL trainer class itself;
    the other methods omotool's factory unchanged. Returns the function undoing this."""
    real = train_runner.online_merging_trainer

    def factory(trainer_class: type, task_vector: Any = None, **options: Any) -> type:
        method = getattr(_current, "method", None)
        if method == "trl-adamw":
            return timed_sampling(trainer_class)
        base = timed_sampling(real(trainer_class, task_vector, **options))
        if method is None or not method.startswith("transcription-"):
            return base
        merge = method.removeprefix("transcription-")

        class TranscriptionTrainer(base):  # type: ignore[misc, valid-type]
            def create_optimizer(self, model: Any = None) -> Any:
                if self.optimizer is None:
                    source = self.model if model is None else model
                    named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
                    self.optimizer = TranscribedOnlineMerging(
                        named,
                        tau,
                        merge,
                        reserve_p=args.p,
                        alpha=args.alpha,
                        lr=self.args.learning_rate,
                        betas=(self.args.adam_beta1, self.args.adam_beta2),
                        eps=self.args.adam_epsilon,
                    )
                return self.optimizer

        return TranscriptionTrainer

    train_runner.online_merging_trainer = factory

    def restore() -> None:
        train_runner.online_merging_trainer = real

    return restore


def timed_sampling(trainer_class: type) -> type:
    """``trainer_class`` with its sampling (TRL's online trainers' ``_generate``) timed into
    the calling thread's ``StepTimer.generation``; other trainers unchanged."""
    if not hasattr(trainer_class, "_generate"):
        return trainer_class

    class TimedSampling(trainer_class):  # type: ignore[misc, valid-type]
        def _generate(self, prompts: list) -> Any:
            start = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                _current.timer.generation.append(time.perf_counter() - start)

    TimedSampling.__name__ = trainer_class.__name__
    return TimedSampling


def train_config(method: str, run_dir: Path, paths: dict[str, Path], args: argparse.Namespace):
    merge = {"none": "none", "trl-adamw": "none"}.get(method, method.split("-")[-1])
    # AdamW takes no merge options (`omotool train` refuses them)
    merging = {} if merge == "none" else {"task_vector": str(paths["tau"]),
                                          "reserve_p": args.p, "alpha": args.alpha}  # fmt: skip
    if args.algo == "grpo":  # completions sampled and scored; no reference model (beta 0)
        algorithm = dict(
            reward=["last_number"], num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
        )  # fmt: skip
    else:
        algorithm = dict(max_length=args.max_length)
    return TrainConfig(
        model=str(paths["sft"]),
        dataset=str(paths["data"]),
        out=str(run_dir),
        algo=args.algo,
        merge=merge,
        **merging,
        **algorithm,
        lr=args.lr,
        seed=args.seed,
        max_steps=args.warmup + args.steps + 1,  # the last step overlaps others' saving
        batch_size=args.batch_size,
        logging_steps=1,
        overwrite=True,
    )


def run_all(
    workdir: Path, paths: dict[str, Path], tau: Any, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Every method's ``run_training`` in its own thread, the threads stepping in turn."""
    turns = Turns(len(args.methods))
    timers = [step_timer(turns, i) for i in range(len(args.methods))]
    errors: dict[str, BaseException] = {}

    def train(index: int, method: str) -> None:
        _current.method = method
        _current.timer = timers[index]
        torch.set_num_threads(args.threads)  # per thread, as OpenMP's setting is
        try:
            turns.begin_setup(index)
            config = train_config(method, workdir / "runs" / method, paths, args)
            run_training(config, callbacks=[timers[index]])
        except BaseException as error:  # noqa: BLE001 - reported below, the others stopped
            errors[method] = error
            turns.finish(index, f"{method} failed: {error!r}")
        else:
            turns.finish(index)

    restore = install_factory(tau, args)
    try:
        threads = [
            threading.Thread(target=train, args=(i, m), name=f"bench-{m}", daemon=True)
            for i, m in enumerate(args.methods)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        restore()
    first = next((e for e in errors.values() if "stopped:" not in str(e)), None)
    if errors:
        raise RuntimeError(f"training failed: {errors}") from first
    samples = {}
    expected = args.warmup + args.steps + 1
    for method, timer in zip(args.methods, timers, strict=True):
        if len(timer.steps) != expected:
            raise RuntimeError(f"{method}: {len(timer.steps)} steps timed, expected {expected}")
        samples[method] = {
            "steps": timer.steps[args.warmup : expected - 1],
            "optimizer": timer.optimizer[args.warmup : expected - 1],
        }
        if timer.generation:  # one sampling per step (TRL's steps_per_generation = 1)
            if len(timer.generation) != expected:
                raise RuntimeError(f"{method}: {len(timer.generation)} samplings timed")
            samples[method]["generation"] = timer.generation[args.warmup : expected - 1]
    return samples


# -- set-up ----------------------------------------------------------------------------------
def prepare(workdir: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """The base/SFT pair and ``τ`` under ``workdir`` (reused when already there)."""
    from omotool.delta import DeltaConfig, compute_delta
    from omotool.tiny_models import build_pair

    spec = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=args.intermediate or 4 * args.hidden,
    )
    name = "llama-v{vocab_size}-h{hidden_size}-l{layers}-a{heads}-i{intermediate_size}"
    folder = workdir / name.format(**spec)
    base, sft, tau_dir = folder / "base", folder / "sft", folder / "tau"
    if not (tau_dir / "omotool.json").exists():
        log(f"building the model pair and task vector in {folder} ...")
        build_pair(folder, "llama", seed=0, scale=0.02, **spec)
        compute_delta(DeltaConfig(base=str(base), sft=str(sft), out=str(tau_dir), overwrite=True))
    from omotool.optim import TaskVector

    tv = TaskVector.load(tau_dir)
    with contextlib.closing(tv):
        names = list(_tau_names(sft))
        tau = {name: tv.get(name).float().clone() for name in names}
    return {
        "paths": {"base": base, "sft": sft, "tau": tau_dir, "data": Path(args.data)},
        "tau": tau,
        "parameters": sum(t.numel() for t in tau.values()),
        "tensors": len(tau),
        "spec": spec,
    }


def _tau_names(model_dir: Path) -> Iterator[str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name


# -- the report ------------------------------------------------------------------------------
def paired_ratio(steps: list[float], baseline: list[float]) -> float:
    """The median over rounds of ``steps[i] / baseline[i]`` (the same round: same batch, back
    to back). Robust where the ratio of medians is not: when the machine's load shifts for a
    few rounds, all methods' steps shift together, and the medians of such two-level samples
    can fall on either level."""
    return statistics.median(s / b for s, b in zip(steps, baseline, strict=True))


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    base = samples.get(BASELINE)
    base_ms = statistics.median(base["steps"]) * 1e3 if base else None
    base_opt_ms = statistics.median(base["optimizer"]) * 1e3 if base else None
    summary = {}
    for name, data in samples.items():
        steps_ms = [t * 1e3 for t in data["steps"]]
        step_ms = statistics.median(steps_ms)
        opt_ms = statistics.median(data["optimizer"]) * 1e3
        rest = [(s - o) * 1e3 for s, o in zip(data["steps"], data["optimizer"], strict=True)]
        quartiles = statistics.quantiles(steps_ms, n=4) if len(steps_ms) > 1 else [step_ms] * 3
        generation_ms = (
            statistics.median(data["generation"]) * 1e3 if "generation" in data else None
        )
        summary[name] = {
            "description": METHODS[name],
            "median_generation_ms": generation_ms,
            "generation_share": generation_ms / step_ms if generation_ms is not None else None,
            "median_step_ms": step_ms,
            "q1_step_ms": quartiles[0],
            "q3_step_ms": quartiles[2],
            "median_optimizer_ms": opt_ms,
            "optimizer_share": opt_ms / step_ms,
            "median_rest_ms": statistics.median(rest),
            "ratio_vs_none": step_ms / base_ms if base_ms else None,
            # Steps of the same round ran back to back on the same batch: their ratio.
            "paired_ratio_vs_none": paired_ratio(data["steps"], base["steps"]) if base else None,
            # What the optimizer alone adds to the baseline's step.
            "optimizer_overhead_vs_none": (opt_ms - base_opt_ms) / base_ms if base_ms else None,
            "step_ms": steps_ms,
            "timed_steps": len(steps_ms),
        }
    return summary


def evaluate_goals(summary: dict[str, dict[str, Any]]) -> tuple[dict[str, float], list[dict]]:
    """Per-step slowdown of each transcription over ours (paired) and the goals, judged on the
    paired ratio to ``none`` (``met`` is None when not measured)."""
    slowdowns = {
        f"{theirs}_over_{ours}": paired_ratio(summary[theirs]["step_ms"], summary[ours]["step_ms"])
        for ours, theirs in PAIRS
        if ours in summary and theirs in summary
    }
    goals = []
    for method, limit in GOALS:
        measured = summary.get(method) or {}
        ratio = measured.get("ratio_vs_none")
        paired = measured.get("paired_ratio_vs_none")
        overhead = measured.get("optimizer_overhead_vs_none")
        goals.append(
            {
                "goal": f"--merge {method} adds at most {limit:.0%} to a step vs --merge none",
                "met": None if paired is None else paired <= 1 + limit,
                "actual": "not measured"
                if paired is None
                else f"paired {(paired - 1) * 100:+.1f}%; ratio of medians "
                f"{(ratio - 1) * 100:+.1f}%, optimizer alone {overhead * 100:+.1f}%",
            }
        )
    return slowdowns, goals


def render(result: dict[str, Any]) -> str:
    config, summary = result["config"], result["methods"]
    lines = [
        f"training step time: {config['algo'].upper()} through omotool's run_training, --merge "
        "none vs dare vs ties",
        f"model: llama, hidden {config['hidden']}, {config['layers']} layers, {config['heads']} "
        f"heads, MLP {config['intermediate']}, vocab {config['vocab']}: "
        f"{config['parameters']:,} float32 parameters in {config['tensors']} tensors",
        f"data: {config['data']} ({config['examples']} examples), batch {config['batch_size']}, "
        + (
            f"{config['num_generations']} completions per prompt of up to "
            f"{config['max_completion_length']} tokens (reward last_number)"
            if config["algo"] == "grpo"
            else f"max_length {config['max_length']}"
        )
        + f", lr {config['lr']:g}, reserve_p {config['p']:g}, alpha {config['alpha']:g}",
        f"torch {config['torch']}, {config['threads']} thread(s), {os.cpu_count()} CPU(s)",
        "timing: one run_training per method, the runs taking steps in turn (one step each "
        "per round, the order rotating by one place a round);",
        f"{config['warmup']} warm-up, {config['steps']} timed and 1 closing step "
        "per run; medians over the timed steps",
        "",
        f"{'method':<20}{'ms/step':>9}{'q1-q3 ms':>15}{'vs none':>9}{'paired':>8}"
        f"{'optim ms':>10}{'optim %':>9}{'optim +%':>10}{'rest ms':>9}",
    ]

    def fmt(value: float | None, pattern: str) -> str:
        return "n/a" if value is None else pattern.format(value)

    for name, m in summary.items():
        spread = f"{m['q1_step_ms']:.1f}-{m['q3_step_ms']:.1f}"
        overhead = m["optimizer_overhead_vs_none"]
        overhead = None if overhead is None else overhead * 100
        lines.append(
            f"{name:<20}{m['median_step_ms']:>9.1f}{spread:>15}"
            f"{fmt(m['ratio_vs_none'], '{:.3f}x'):>9}"
            f"{fmt(m['paired_ratio_vs_none'], '{:.3f}x'):>8}"
            f"{m['median_optimizer_ms']:>10.1f}{m['optimizer_share'] * 100:>8.1f}%"
            f"{fmt(overhead, '{:+.1f}%'):>10}"
            f"{m['median_rest_ms']:>9.1f}"
        )
    lines += [
        "",
        "vs none: median step / none's median step; paired: median over rounds of step / none's",
        "step in the same round (same batch, back to back); optim %: the optimizer's share of",
        "the step; optim +%: (median optimizer ms - none's) / none's median step; rest: the",
        "step without the optimizer (forward, backward, clipping, ...).",
    ]
    sampled = {name: m for name, m in summary.items() if m["median_generation_ms"] is not None}
    if sampled:
        lines += ["", "sampling (GRPOTrainer._generate), inside each step:"]
        for name, m in sampled.items():
            lines.append(
                f"  {name:<18}{m['median_generation_ms']:>9.1f} ms/step, "
                f"{m['generation_share'] * 100:.1f}% of the step"
            )
    lines.append("")
    for ours, theirs in PAIRS:
        slowdown = result["slowdowns"].get(f"{theirs}_over_{ours}")
        if slowdown is not None:
            lines.append(f"step with {theirs} / step with {ours} (paired): {slowdown:.2f}x")
    lines += ["", "goals (the issue's; judged on the paired ratio):"]
    for goal in result["goals"]:
        mark = {True: "PASS", False: "MISS", None: "SKIP"}[goal["met"]]
        lines.append(f"  [{mark}] {goal['goal']} ({goal['actual']})")
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-")))
        else:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        setup = prepare(workdir, args, log)
        log(
            f"model: {setup['parameters']:,} parameters; threads {torch.get_num_threads()}; "
            f"{len(args.methods)} runs of {args.warmup} + {args.steps} + 1 steps, in turn"
        )
        started = time.perf_counter()
        samples = run_all(workdir, setup["paths"], setup["tau"], args)
        log(f"trained in {time.perf_counter() - started:.1f} s")
        from omotool.data import load_examples

        kind = "prompt" if args.algo == "grpo" else "preference"
        examples = len(load_examples(str(args.data), kind, "train"))
    summary = summarise(samples)
    slowdowns, goals = evaluate_goals(summary)
    spec = setup["spec"]
    return {
        "config": {
            "algo": args.algo,
            "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length,
            "hidden": spec["hidden_size"],
            "layers": spec["layers"],
            "heads": spec["heads"],
            "intermediate": spec["intermediate_size"],
            "vocab": spec["vocab_size"],
            "parameters": setup["parameters"],
            "tensors": setup["tensors"],
            "data": str(args.data),
            "examples": examples,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "lr": args.lr,
            "p": args.p,
            "alpha": args.alpha,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "steps": args.steps,
            "torch": torch.__version__,
        },
        "methods": summary,
        "slowdowns": slowdowns,
        "goals": goals,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time DPO (or GRPO) training steps with --merge none / dare / ties and a "
        "transcription."
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size [256]")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers [4]")
    parser.add_argument("--heads", type=int, default=4, help="attention heads [4]")
    parser.add_argument("--intermediate", type=int, help="MLP size [4 x hidden]")
    parser.add_argument("--vocab", type=int, default=320, help="vocabulary [320]")
    parser.add_argument("--algo", choices=ALGOS, default="dpo", help="what to train [dpo]")
    parser.add_argument(
        "--data", help="preference JSONL (dpo) or prompts (grpo) [tiny-prefs / tiny-prompts]"
    )
    parser.add_argument(
        "--num-generations", type=int, default=4, help="grpo: completions per prompt [4]"
    )
    parser.add_argument(
        "--max-completion-length", type=int, default=32, help="grpo: sampled tokens [32]"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="per-step batch [8]")
    parser.add_argument("--max-length", type=int, default=64, help="prompt + answer tokens [64]")
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate [1e-6]")
    parser.add_argument("--p", type=float, default=0.01, help="reserve rate p [0.01]")
    parser.add_argument("--alpha", type=float, default=1e-7, help="alpha [1e-7]")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run [0]")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method [30]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first [3]")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of: {', '.join(METHODS)} [{','.join(DEFAULT_METHODS)}]",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads [the CPUs this process may run on]"
    )
    parser.add_argument("--workdir", help="keep models, task vector and runs here [a temp dir]")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: hidden 64, 2 layers, 2 + 4 steps"
    )
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' progress bars")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate = 64, 2, None
        args.warmup, args.steps = 2, 4
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not args.methods:
        parser.error("--methods selects nothing")
    if min(args.hidden, args.layers, args.heads, args.vocab, args.steps) < 1:
        parser.error("--hidden, --layers, --heads, --vocab and --steps must be at least 1")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods names a method twice")
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    if args.vocab < 256:
        parser.error("--vocab must be at least 256 (the tiny tokenizer's size)")
    if args.warmup < 0 or args.batch_size < 1:
        parser.error("--warmup must be >= 0 and --batch-size >= 1")
    if not 0 < args.p <= 1:
        parser.error("--p must be in (0, 1]")
    args.data = args.data or str(DEFAULT_DATA[args.algo])
    if args.algo == "grpo" and args.batch_size % args.num_generations:
        parser.error("--batch-size must be a multiple of --num-generations (completions)")
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.threads is None:
        affinity = getattr(os, "sched_getaffinity", None)
        args.threads = len(affinity(0)) if affinity else os.cpu_count() or 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not args.verbose:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    stdout = sys.stdout
    result = benchmark(args, log)
    sys.stdout = stdout  # in case a library left it redirected (see Turns)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
