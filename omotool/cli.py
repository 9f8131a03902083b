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


def _resolve(ctx: typer.Context, config_cls: type, recipe_path: Path | None) -> Any:
    """The config: dataclass defaults < recipe keys < options given on the command line.

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
    return build_config(config_cls, recipe, given)


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
            self._task = self._bar.add_task("tensors", total=total)
        self._bar.update(self._task, completed=done, description=name[-40:])

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


# -- commands of later issues --------------------------------------------------------------
_PLANNED = {
    "train": "RLHF training (DPO, IPO, KTO, ...) with the online-merging optimizer",
    "eval": "reward and alignment-tax evaluation",
}


def _planned(name: str, what: str) -> None:
    @app.command(
        name=name,
        help=f"{what[0].upper()}{what[1:]}. [not built yet]",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=True,
    )
    def command(ctx: typer.Context) -> None:
        _error(f"`omotool {name}` ({what}) is not built yet in omotool {__version__}.")
        raise typer.Exit(1)


for _name, _what in _PLANNED.items():
    _planned(_name, _what)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="omotool")
