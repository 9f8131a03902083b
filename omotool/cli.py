"""The ``omotool`` command line: parse options, build a config, call the library, render.

No logic lives here. Errors the library can explain (``OmoError``) become a one-paragraph
message and their exit code in ``handled``; ``--debug`` shows the traceback instead. Heavy
imports (torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from omotool import __version__
from omotool.errors import OmoError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="omotool",
    help="Online merging optimizers for RLHF: raise reward, pay less alignment tax.\n\n"
    "Data path: delta (SFT task vector) -> train (online merging) -> merge-offline -> eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)  # messages stay one line when piped

DEBUG_HELP = "Show the full traceback on errors."
DebugOption = typer.Option(False, "--debug", help=DEBUG_HELP)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"omotool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = DebugOption,
) -> None:
    ctx.obj = {"debug": debug}


def handled(command: F) -> F:
    """Turn library errors into a message and an exit code; ``--debug`` re-raises them."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx")
        root_obj = (ctx.find_root().obj if ctx is not None else None) or {}
        debug = (
            kwargs.get("debug") or root_obj.get("debug") or os.environ.get("OMOTOOL_DEBUG") == "1"
        )
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except OmoError as exc:
            if debug:
                raise
            _error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _error("interrupted; no output was left behind.")
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug:
                raise
            _error(
                f"internal error: {type(exc).__name__}: {exc}. This is a bug in omotool; "
                "run again with --debug for the traceback and report it."
            )
            raise typer.Exit(1) from None

    return run  # type: ignore[return-value]


def _error(message: str) -> None:
    stderr.print(Text("error: ", style="bold red") + Text(message))


def _field_names(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def _resolve(
    ctx: typer.Context,
    config_cls: type,
    recipe_path: Path | None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The config: dataclass defaults < recipe keys < ``--set`` overrides < options given on
    the command line.

    The defaults shown in ``--help`` are the dataclass's (a test keeps them equal).
    """
    from omotool.config import build_config, load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else {}
    given = {
        name: value
        for name, value in ctx.params.items()
        if name in _field_names(config_cls)
        and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }
    return build_config(config_cls, {**recipe, **(overrides or {})}, given)


# -- delta ---------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
@handled
def delta(
    ctx: typer.Context,
    base: str | None = typer.Argument(None, help="Base (pre-trained) model: folder or Hub id."),
    sft: str | None = typer.Argument(None, help="SFT model fine-tuned from BASE."),
    out: str | None = typer.Option(None, "-o", "--out", help="Output folder for the task vector."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML recipe; its keys are these option names, flags override."
    ),
    dtype: str | None = typer.Option(
        None, help="Output dtype: float32, bfloat16 or float16. [default: the SFT model's]"
    ),
    sparsify: str = typer.Option("none", help="Sparsifier: none, dare or magnitude."),
    density: float = typer.Option(1.0, help="Fraction of entries kept by --sparsify."),
    rescale: str | None = typer.Option(
        None,
        help="Rescale kept entries: none, inverse (1/density) or l1. "
        "[default: inverse for dare, none for magnitude]",
    ),
    seed: int = typer.Option(0, help="Seed of the DARE masks (keyed by tensor name)."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 2GB or 500MB."),
    vocab_mismatch: str = typer.Option(
        "error", help="When SFT adds vocabulary rows: error, or truncate to the shared rows."
    ),
    allow_pickle: bool = typer.Option(
        False, help="Read pickle checkpoints (*.bin/*.pt) with torch.load(weights_only=True)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    debug: bool = DebugOption,
) -> None:
    """Compute the SFT task vector tau = SFT - BASE, streaming, tensor by tensor."""
    from omotool.delta import DeltaConfig, compute_delta

    cfg = _resolve(ctx, DeltaConfig, config)
    with _progress(enabled=not json_output) as advance:
        summary = compute_delta(cfg, progress=advance)
    if json_output:
        stdout.print_json(json.dumps(summary.to_dict()))
    else:
        _render_delta(summary)


def _render_delta(summary: Any) -> None:
    table = Table(title=f"task vector → {summary.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("tensors", f"{summary.tensors:,}")
    table.add_row("parameters", f"{summary.parameters:,}")
    table.add_row("dtype", summary.dtype)
    table.add_row("‖τ‖", f"{summary.tau_norm:.6g}")
    if summary.kept_fraction < 1.0:
        table.add_row("‖τ‖ before sparsifying", f"{summary.dense_tau_norm:.6g}")
        table.add_row("kept fraction", f"{summary.kept_fraction:.4%}")
    table.add_row("‖τ‖ / ‖θ_base‖", f"{summary.relative_norm:.6g}")
    if summary.skipped:
        table.add_row("skipped (non-float, equal)", ", ".join(summary.skipped))
    if summary.truncated:
        table.add_row("truncated rows", ", ".join(summary.truncated))
    stdout.print(table)
    top = Table(title="largest relative changes")
    for column in ("tensor", "numel", "‖τ‖", "‖τ‖/‖θ_base‖"):
        top.add_column(column, justify="left" if column == "tensor" else "right")
    for change in summary.top_changes(10):
        top.add_row(
            change.name, f"{change.numel:,}", f"{change.tau_norm:.4g}", f"{change.relative:.4g}"
        )
    stdout.print(top)


class _progress:
    """A transient progress bar on stderr; yields ``advance(name, done, total)``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and stderr.is_terminal
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[str, int, int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self._bar = Progress(console=stderr, transient=True)
        self._bar.start()
        return self._advance

    def _advance(self, name: str, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task(name, total=total)
        self._bar.update(self._task, completed=done, total=total, description=name[-40:])

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# -- merge-offline -------------------------------------------------------------------------
@app.command("merge-offline", no_args_is_help=True)
@handled
def merge_offline(
    ctx: typer.Context,
    sft: str | None = typer.Option(None, "--sft", help="SFT model (the alpha = 0 end)."),
    rlhf: str | None = typer.Option(None, "--rlhf", help="RLHF model (the alpha = 1 end)."),
    out: str | None = typer.Option(
        None, "-o", "--out", help="Output model folder (a sweep: a folder of alpha-<a>/ models)."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="YAML recipe; its keys are these option names, flags override."
    ),
    alpha: str = typer.Option(
        "0.5", help="Share of the RLHF update kept; a comma list is a sweep (>1 extrapolates)."
    ),
    method: str = typer.Option(
        "linear", help="linear, task_arithmetic, ties, dare_linear or dare_ties."
    ),
    layer_alpha: str | None = typer.Option(
        None,
        help="Per-block alphas, e.g. 0-9:0.2,10-:0.8,embed:0.1,head:0.9, or a YAML file of "
        "that map; other tensors take --alpha.",
    ),
    base: str | None = typer.Option(None, help="Base model, for the task-vector methods."),
    density: float = typer.Option(1.0, help="Fraction kept by the TIES/DARE sparsifier."),
    seed: int = typer.Option(0, help="Seed of the DARE masks."),
    normalize: bool | None = typer.Option(
        None,
        "--normalize/--no-normalize",
        help="Divide by the summed weights. [default: per method]",
    ),
    rescale: str | None = typer.Option(
        None, help="none, inverse (1/density) or l1. [default: inverse for DARE, none for TIES]"
    ),
    dtype: str | None = typer.Option(
        None, help="Output dtype: float32, bfloat16 or float16. [default: the SFT model's]"
    ),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 2GB or 500MB."),
    allow_pickle: bool = typer.Option(
        False, help="Read pickle checkpoints (*.bin/*.pt) with torch.load(weights_only=True)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    debug: bool = DebugOption,
) -> None:
    """Offline baselines: interpolate (or TIES/DARE-merge) the RLHF model with the SFT model."""
    from omotool.merge_offline import MergeConfig, run_merge

    cfg = _resolve(ctx, MergeConfig, config)
    with _progress(enabled=True) as advance:
        summary = run_merge(cfg, progress=advance)
    table = Table(title=f"{cfg.method} merge → {summary.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("tensors", f"{summary.tensors:,}")
    for alpha, path in zip(summary.alphas, summary.outputs, strict=True):
        note = "  (extrapolates: ExPO)" if alpha > 1 else ""
        table.add_row(f"alpha {alpha:g}", f"{path}{note}")
    if summary.unmatched:
        table.add_row("global alpha (no layer key)", ", ".join(summary.unmatched))
    stdout.print(table)


# -- train ---------------------------------------------------------------------------------
from omotool.config import command_options, declared_help  # noqa: E402
from omotool.train.arguments import TrainConfig  # noqa: E402


@app.command(no_args_is_help=True, cls=declared_help(typer.core.TyperCommand, TrainConfig))
@handled
@command_options(TrainConfig)  # one option per TrainConfig field, with its help and panel
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", help="YAML recipe; its keys are these option names, flags override."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe key: --set lr=5e-7 (repeatable)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    debug: bool = DebugOption,
    **options: Any,
) -> None:
    """RLHF training (DPO, IPO, KTO, ..., GRPO, RLOO) on TRL with the online-merging optimizer."""
    from omotool.config import parse_overrides
    from omotool.train.algorithms import ALGORITHMS
    from omotool.train.progress import is_main_process, progress_callback
    from omotool.train.runner import run_training

    cfg = _resolve(ctx, TrainConfig, config, parse_overrides(set_))
    _quiet_libraries()
    shown = [] if json_output or not stderr.is_terminal else [progress_callback(stderr)]
    result = run_training(cfg, callbacks=shown)
    main = is_main_process()  # under torchrun every rank returns the result: one prints it
    _release_process_group()
    if json_output:
        if main:
            stdout.print_json(json.dumps(dataclasses.asdict(result)))
        return
    if main:
        stdout.print(_train_table(cfg, result, online=ALGORITHMS.get(cfg.algo).online))
    if result.interrupted:
        if main:
            _error(f"interrupted at step {result.steps}; a checkpoint was saved. Continue "
                   "with the same command and --resume.")  # fmt: skip
        raise typer.Exit(130)


def _release_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the process group down, so that no rank
    aborts at interpreter exit in a communication thread still alive (seen with DeepSpeed on
    gloo: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _train_table(cfg: Any, result: Any, online: bool) -> Table:
    """The end-of-run summary of ``omotool train``; a metric that is None, NaN or missing is
    shown as such (``metric_text``), never refused."""
    from omotool.train.progress import metric_text
    from omotool.train.trainer import ZERO_SPREAD_KEY

    table = Table(title=f"{cfg.algo} with {cfg.merge} → {result.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", str(result.steps))
    if online:
        table.add_row("prompts", f"{result.examples:,}")
    else:
        table.add_row(
            "examples",
            f"{result.examples:,} ({result.truncated:,} truncated to --max-length, "
            f"{result.dropped:,} dropped: prompt alone too long)",
        )
    if result.resumed_from:
        table.add_row("resumed from", result.resumed_from)
    for key in (
        "loss", "rewards/accuracies", "rewards/margins", "reward", "reward_std",
        "frac_reward_zero_std", "merge/kept_fraction",
        "merge/sign_conflict_fraction", "merge/skipped_steps", "train_loss",
    ):  # fmt: skip
        if key in result.metrics:
            table.add_row(key, metric_text(result.metrics[key]))
    flat = result.metrics.get(ZERO_SPREAD_KEY)
    if flat:
        table.add_row(
            Text("no reward spread", style="bold red"),
            Text(f"{flat} logged step(s) where every group's completions got equal rewards: "
                 "no advantage, nothing learned in them", style="red"),
        )  # fmt: skip
    return table


def _quiet_libraries() -> None:
    """Our progress bar and summary replace the libraries' bars and per-step prints."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


# -- eval ----------------------------------------------------------------------------------
def _eval_task_names() -> str:
    from omotool.eval.tasks import TASKS  # light: the task modules import their work lazily

    return ", ".join(TASKS)


@app.command("eval", no_args_is_help=True)
@handled
def eval_(
    models: list[str] = typer.Argument(None, help="Model folders (or Hub ids) to evaluate."),
    suite: Path | None = typer.Option(None, "--suite", help="Suite YAML: tasks, data, baseline."),
    task: str | None = typer.Option(None, help=f"Or one task: {_eval_task_names()}."),
    data: str | None = typer.Option(None, help="Data of --task (.jsonl, .json, .csv, .txt)."),
    ref_model: str | None = typer.Option(None, help="Reference model of --task preference."),
    reward_model: str | None = typer.Option(None, help="Classifier of --task reward_model."),
    extract: str = typer.Option(
        "exact", help="--task generate: exact, regex, last_number or contains."
    ),
    pattern: str | None = typer.Option(None, help="--task generate --extract regex: pattern."),
    lm_tasks: str | None = typer.Option(
        None, help="--task lm_eval: harness task names, comma-separated (e.g. gsm8k,mmlu)."
    ),
    include_path: str | None = typer.Option(
        None, help="--task lm_eval: a folder of extra task YAMLs (local data)."
    ),
    until: list[str] | None = typer.Option(
        None,
        "--until",
        help="--task generate/reward_model: a stop sequence (repeatable); an answer ends before "
        "the first one. \\n, \\t read as newline, tab.",
    ),
    chat: bool | None = typer.Option(
        None,
        "--chat/--no-chat",
        help="--task generate/reward_model/choice: render prompts with the model's chat "
        "template or not (default: when the model has one).",
        show_default=False,
    ),
    batch_size: int = typer.Option(8, help="Examples per forward pass."),
    device: str | None = typer.Option(
        None,
        "--device",
        help="Where the models run: auto (CUDA when there is one, else the CPU), cpu, cuda or "
        "cuda:N. Overrides a suite's 'device'.",
        show_default="auto",
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="The models' weights: auto (float32 on the CPU; bfloat16 on a GPU that supports "
        "it, else float32), float32, bfloat16 or float16. Log-probabilities are summed in "
        "float32 either way. Overrides a suite's 'dtype'.",
        show_default="auto",
    ),
    out: str | None = typer.Option(None, "-o", "--out", help="Folder for report.json/.md."),
    plot: bool = typer.Option(
        False, help="Also draw OUT/tradeoff.png: reward against capability (needs matplotlib)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    debug: bool = DebugOption,
) -> None:
    """Reward and alignment tax side by side: scores with 95% intervals, deltas, report."""
    from omotool.errors import UsageError
    from omotool.eval.runner import run_suite, suite_placement, write_report
    from omotool.eval.suite import load_suite, single_task_suite

    if not models:
        raise UsageError("give at least one model to evaluate.")
    if plot and out is None:
        raise UsageError("--plot writes OUT/tradeoff.png: give -o OUT.")
    if (suite is None) == (task is None):
        raise UsageError("give --suite FILE, or --task NAME with --data FILE (not both).")
    if suite is not None:
        if until or chat is not None:
            raise UsageError(
                "--until and --chat/--no-chat go with --task; a suite sets 'until' and 'chat' "
                "under 'generation' or per task."
            )
        plan = load_suite(suite)
    else:
        plan = single_task_suite(
            task, data, reference=ref_model, batch_size=batch_size, reward_model=reward_model,
            extract=extract, pattern=pattern, tasks=lm_tasks, include_path=include_path,
            generation={"until": until, "chat": chat},
        )  # fmt: skip
    placement = suite_placement(plan, device, dtype)  # before the long part
    _quiet_libraries()
    if plot:
        from omotool.eval.plot import require_matplotlib

        require_matplotlib()  # before the long part
    with _progress(enabled=not json_output) as advance:
        report = run_suite(
            list(models), plan, progress=advance, device=placement.device, dtype=placement.dtype
        )
    if out is not None:
        write_report(report, Path(out))
    if plot:
        from omotool.eval.plot import plot_tradeoff

        plot_tradeoff(report, Path(out) / "tradeoff.png")
    if json_output:
        stdout.print_json(json.dumps(report))
        return
    for model in report["models"]:
        stdout.print(_eval_table(model, report.get("baseline")))


def _eval_table(model: dict[str, Any], baseline: str | None) -> Table:
    from omotool.eval.runner import headline_key

    table = Table(title=model["path"])
    for column in (
        "task",
        "category",
        "score",
        "95% interval",
        "Δ vs baseline" if baseline else "",
    ):
        if column:
            table.add_column(column, justify="left" if column in ("task", "category") else "right")
    differences = model.get("differences") or {}

    def delta(name: str) -> Text:
        value = differences.get(name)
        if value is None:
            return Text("")
        return Text(f"{value:+.4f}", style="green" if value > 0 else "red" if value < 0 else "")

    for name, task in model["tasks"].items():
        key = headline_key(task)
        if task["failed"] or key is None:
            row = [name, task["category"], Text(f"failed: {task['failed']}", style="red"), ""]
        else:
            score = task["scores"][key]
            row = [name, task["category"], f"{key} {score['value']:.4f}",
                   f"[{score['low']:.4f}, {score['high']:.4f}]"]  # fmt: skip
        table.add_row(*row, *([delta(name)] if baseline else []))
    for category, value in model["averages"].items():
        if category == "failed" or value is None:
            continue
        row = [Text(f"{category} average", style="bold"), "", f"{value:.4f}", ""]
        table.add_row(*row, *([delta(category)] if baseline else []))
    return table


# -- demo ----------------------------------------------------------------------------------
@app.command("demo")
@handled
def demo(
    workdir: Path = typer.Option(
        Path("runs/demo"), "--workdir", help="Where stages are built and cached."
    ),
    seeds: int | None = typer.Option(
        None,
        min=1,
        help="Whole-pipeline replicates (world, base, SFT, DPO). [default: 4, or 1 with --fast]",
    ),
    fast: bool = typer.Option(
        False, "--fast", help="One seed, smaller grids, shorter pre-training (about 2 minutes)."
    ),
    track: str = typer.Option(
        "dpo",
        help="dpo (the paper's setting), grpo (online RL from the SFT model with a rule "
        "reward, in worlds of its own whose SFT answers are polite more often), lora (the "
        "dpo track with LoRA adapters against full AdamW, sharing its stages) or real (DPO on "
        "SmolLM2-135M-Instruct from `make real-model`, one seed); report in WORKDIR/<track>.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="--track real: the base model folder. [default: $OMOTOOL_SMOLLM2_DIR or "
        "models/smollm2-135m-instruct]",
    ),
    threads: int | None = typer.Option(
        None,
        min=1,
        help="CPU threads. [default: 1 for the miniature (its matrices are too small for more "
        "to pay), torch's default for --track real]",
    ),
    results_file: Path | None = typer.Option(
        None,
        "--results",
        help="Also write the results file here (e.g. docs/results/demo.json, which "
        "scripts/render_docs.py renders into the README).",
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="Where the evaluation stages run: cpu, cuda, cuda:N or auto (as omotool eval's). "
        "The committed results are from the CPU in float32; another device or dtype "
        "re-runs the evaluation stages (it is part of their key).",
    ),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="Weights of the evaluated models: float32, bfloat16, float16 or auto (as omotool "
        "eval's). Only the evaluation stages use it.",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    debug: bool = DebugOption,
) -> None:
    """Show the paper in miniature: per seed a world, pre-training, SFT, DPO with AdamW /
    OnDARE / OnTIES / ChildTuning over their grids (or, --track lora, LoRA-AdamW / LoRA-OnDARE /
    LoRA-OnTIES against full AdamW; or, --track grpo, GRPO with AdamW / OnDARE
    / OnTIES), offline merges, evaluation on validation and test splits; then the report,
    verdicts and plot.

    Everything is made here (data, tokenizer, models); nothing is downloaded (--track real
    reads the model `make real-model` wrote). Stages are cached in --workdir: run it again to
    resume or to re-draw the report.
    """
    from omotool.demo.markdown import summary_markdown
    from omotool.demo.pipeline import run_demo
    from omotool.demo.report import write_results
    from omotool.demo.settings import settings_for
    from omotool.errors import UsageError
    from omotool.eval.device import resolve_placement

    placement = resolve_placement(device, dtype)
    _quiet_libraries()
    settings = settings_for(fast, seeds, track)
    if model is not None and track != "real":
        raise UsageError("--model names the real track's base model: give --track real too.")
    if threads is None and track != "real":
        threads = 1

    def show(stage: str, message: str) -> None:
        if not json_output:
            stderr.print(f"[bold]{stage:>13}[/bold] {message}", highlight=False)

    command = " ".join(["omotool", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else None
    result = run_demo(
        workdir, settings, progress=show, threads=threads, command=command, placement=placement,
        model=model,
    )  # fmt: skip
    if results_file is not None:
        write_results(result.results, results_file)
    if json_output:
        stdout.print_json(json.dumps(result.results))
        return
    # soft_wrap: lines as the README shows them (the terminal may fold them, rich does not)
    stdout.print(summary_markdown(result.results), highlight=False, markup=False, soft_wrap=True)
    stdout.print(
        f"Report: {result.report}"
        + (f"\nPlot:   {result.plot}" if result.plot else "")
        + (f"\nResults: {results_file}" if results_file else "")
        + f"\n{len(result.ran)} stage(s) ran, {len(result.cached)} cached, "
        f"{result.seconds:.0f} s.",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app(prog_name="omotool")
