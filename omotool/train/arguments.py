"""The checks of ``omotool train``'s options (``check_config``) and TRL's config built from
them (``trl_arguments``), all derived from their declaration (``omotool.train.options``).

Every option either reaches TRL's trainer or the optimizer, or is refused before anything is
loaded: an option the algorithm does not read (``check_algorithm_options``), a merge option
the chosen ``--merge`` does not read (``check_merge_options``), rewards an online algorithm
cannot use (``check_rewards``), a value out of range or not among its choices
(``omotool.config.check_declared``), a ``--trl`` field that is not the algorithm's or is
omotool's to set (``omotool.train.trl_passthrough``), and a setting the installed TRL has no
field for.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omotool.config import check_declared, default_of, flag
from omotool.errors import OmoError, UsageError
from omotool.train.algorithms import ALGORITHMS
from omotool.train.deepspeed import check_deepspeed, deepspeed_config
from omotool.train.lora import check_lora
from omotool.train.options import (
    LOSS_TYPES,
    LR_SCHEDULERS,
    MERGES,
    REPORTERS,
    SCALE_REWARDS,
    TrainOptions,
    train_options,
    trl_default,
)
from omotool.train.trl_passthrough import trl_passthrough

__all__ = [
    "LOSS_TYPES", "LR_SCHEDULERS", "MERGES", "REPORTERS", "SCALE_REWARDS", "TrainConfig",
    "check_config", "trl_arguments",
]  # fmt: skip

# transformers (5.x) reads `activation_checkpointing`; `gradient_checkpointing` is its deprecated
# alias, copied into it only when it is unset, and TRL's configs default that alias to True (so
# checkpointing is on unless turned off). Both are set, to the same value, on classes that have
# them; a class with neither is refused.
CHECKPOINTING = ("activation_checkpointing", "gradient_checkpointing")


@dataclass
class TrainConfig(TrainOptions):
    """The options of ``omotool train`` (declared in ``omotool.train.options``) with their
    checks: what recipes, the command line and library callers build."""

    def validate(self) -> None:
        """Every check of ``check_config``, before anything loads."""
        check_config(self)


def _adapter(config: TrainConfig) -> bool:
    """``--model`` is an SFT adapter folder: ``τ`` comes from its factors (``train.lora``)."""
    from omotool.io.adapters import is_adapter

    return is_adapter(config.model)


def check_config(config: TrainConfig) -> None:
    """Refuse what cannot run, before any model or data is read; an unset ``beta`` becomes
    the algorithm's TRL default (so that the saved config says which was used)."""
    for name in ("model", "dataset", "out"):
        if not getattr(config, name):
            raise UsageError(f"{flag(name)} is required.")
    algorithm = ALGORITHMS.get(config.algo)
    if config.beta is not None and config.beta <= 0 and not algorithm.online:
        raise UsageError("--beta must be > 0.")  # (online: 0 drops the KL term)
    check_declared(config)
    check_lora(config)
    check_merge_options(config)
    if config.merge != "none" and not (config.base or config.task_vector or _adapter(config)):
        raise UsageError(
            f"--merge {config.merge} merges with the SFT task vector: give --base BASE "
            "(computed at start) or --task-vector DIR (from `omotool delta`)."
        )
    if config.base and config.task_vector:
        raise UsageError("give --base or --task-vector, not both.")
    check_optimizer_backend(config)
    check_deepspeed(config)
    if config.fsdp and not _has_accelerator():
        raise UsageError(
            "--fsdp shards across GPUs: accelerate runs FSDP only on GPU (and XPU) "
            "processes, not on CPU ones. On CPUs, run under torchrun without --fsdp (DDP)."
        )
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise UsageError(
            f"--report-to {config.report_to} needs the {config.report_to} package: "
            f"pip install {config.report_to}"
        )
    if config.beta is None and "beta" in algorithm.options:
        config.beta = float(trl_default(config.algo, "beta"))
    check_algorithm_options(config)
    config.trl = trl_passthrough(config.algo, config.trl)  # (typed as saved with the run)
    _check_combinations(config)
    check_rewards(config)
    if config.batch_size < algorithm.min_batch_size:
        raise UsageError(
            f"--algo {config.algo} needs --batch-size {algorithm.min_batch_size} or more "
            "(examples per device: TRL's KL estimate compares each example with the others in "
            "its batch)."
        )


def _check_combinations(config: TrainConfig) -> None:
    """What one option's range cannot say."""
    if config.lr_scheduler == "constant" and config.warmup_steps:
        raise UsageError(
            "--lr-scheduler constant has no warm-up, so --warmup-steps would be ignored: use "
            "--lr-scheduler constant_with_warmup, or drop --warmup-steps."
        )
    if config.max_steps == 0 or config.max_steps < -1:
        raise UsageError("--max-steps must be -1 (train for --epochs) or at least 1.")
    for option in ("eval_steps", "eval_batch_size", "num_generations_eval"):
        if getattr(config, option) != default_of(TrainConfig, option) and not config.eval_dataset:
            raise UsageError(f"{flag(option)} needs --eval-dataset.")


def check_optimizer_backend(config: TrainConfig) -> None:
    """Refuse ``--optimizer-backend triton`` where it cannot run this config (no Triton, no
    CUDA and no interpreter, step-K, the l1 rescale)."""
    from omotool.optim.backends import triton as triton_backend
    from omotool.optim.functional import MergeOptions

    if config.optimizer_backend != "triton":
        return
    import torch

    options = MergeOptions(
        method=config.merge, online_step=config.online_step, rescale=config.rescale
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where it will run
    reason = triton_backend.why_not(options, device)
    if reason is not None:
        raise UsageError(f"--optimizer-backend triton {reason}; use auto.")


def check_rewards(config: TrainConfig) -> None:
    """The rewards of an online algorithm, checked before anything loads: at least one, each
    understood (``rewards.parse_rewards``), their options used, one weight each, vLLM present
    when asked for, and a batch TRL can cut into groups of ``--num-generations`` completions.
    Offline algorithms take no rewards."""
    from omotool.train.rewards import parse_rewards

    algorithm = ALGORITHMS.get(config.algo)
    defaults = TrainConfig()
    given = [
        f"{flag(name)} {', '.join(map(str, value)) if isinstance(value, list) else value}"
        for name, declared in train_options().items()
        if declared.online and (value := getattr(config, name)) != getattr(defaults, name)
    ]
    online = [name for name in ALGORITHMS if ALGORITHMS.get(name).online]
    if not algorithm.online:
        if given:
            raise UsageError(
                f"{given[0]} has no effect with --algo {config.algo} (it learns from fixed "
                f"examples, not from rewards): drop it, or use --algo {' or '.join(online)}."
            )
        return
    specs = parse_rewards(config.reward, config.reward_model)
    if not specs:
        raise UsageError(
            f"--algo {config.algo} learns from rewards: give --reward (exact, regex, last_number, "
            "contains, or path/to/file.py:function) or --reward-model DIR, several if you like."
        )
    verifiers = [spec.source for spec in specs if spec.kind == "verifier"]
    if "regex" in verifiers and not config.reward_pattern:
        raise UsageError("--reward regex needs --reward-pattern (a regular expression).")
    if config.reward_pattern is not None:
        if "regex" not in verifiers:
            raise UsageError("--reward-pattern is read by --reward regex only: add it, or drop it.")
        from omotool.eval.generation import check_extract

        check_extract("regex", config.reward_pattern)
    if config.reference_field != defaults.reference_field and not verifiers:
        raise UsageError(
            f"--reference-field {config.reference_field} is read by the verifiers only "
            "(--reward exact, regex, last_number, contains): add one, or drop it."
        )
    if config.reward_weights is not None and len(config.reward_weights) != len(specs):
        raise UsageError(
            f"--reward-weights gives {len(config.reward_weights)} weights for {len(specs)} "
            f"rewards ({', '.join(spec.option for spec in specs)}): give one per reward, in that "
            "order (the --reward ones first, then the --reward-model ones)."
        )
    for spec, weight in zip(specs, config.reward_weights or (), strict=False):
        if not math.isfinite(weight):
            raise UsageError(
                f"--reward-weights gives {spec.option} the weight {weight}: weights must be "
                "finite numbers (NaN or an infinite weight makes the rewards NaN)."
            )
    if config.max_length != defaults.max_length:
        raise UsageError(
            f"--max-length has no effect with --algo {config.algo} (it samples the completions): "
            "use --max-completion-length."
        )
    if config.use_vllm and importlib.util.find_spec("vllm") is None:
        raise UsageError(
            "--use-vllm needs the vllm package, which runs on GPU machines (pip install vllm); "
            "without it, completions are sampled with transformers (drop --use-vllm)."
        )
    generations = config.num_generations or trl_default(config.algo, "num_generations")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    held, completions = generation_batch(config, processes)
    if completions % generations:
        raise UsageError(
            f"--algo {config.algo} samples --num-generations {generations} completions per "
            f"prompt, but a generation holds {held} = {completions} completions, not a "
            f"multiple of {generations}: make the product a multiple (e.g. --batch-size "
            f"{generations}), or change --num-generations."
        )
    evaluated = config.num_generations_eval or generations
    if config.eval_dataset and (config.eval_batch_size * processes) % evaluated:
        given = "--num-generations-eval" if config.num_generations_eval else "--num-generations"
        raise UsageError(
            f"--algo {config.algo} evaluates {given} {evaluated} completions per prompt, but an "
            f"evaluation batch holds --eval-batch-size {config.eval_batch_size} × {processes} "
            f"process(es) = {config.eval_batch_size * processes} completions, not a multiple "
            f"of {evaluated}: set --eval-batch-size {evaluated} (or a multiple), or "
            "--num-generations-eval to a divisor."
        )


def generation_batch(config: TrainConfig, processes: int) -> tuple[str, int]:
    """TRL's generation batch: the completions sampled together, which must hold whole groups
    of ``num_generations``. It is ``--trl generation_batch_size`` if given, else
    ``--batch-size × processes × steps_per_generation``, where ``steps_per_generation``
    (``--trl``) defaults to ``--grad-accum`` (GRPOConfig/RLOOConfig ``__post_init__``).
    Returns how it is made (for messages) and its size."""
    trl = trl_passthrough(config.algo, config.trl)
    if trl.get("generation_batch_size") is not None:
        size = trl["generation_batch_size"]
        return f"--trl generation_batch_size {size}", size
    steps = trl.get("steps_per_generation")
    factor = (
        f"--grad-accum {config.grad_accum}"
        if steps is None
        else f"--trl steps_per_generation {steps}"
    )
    steps = config.grad_accum if steps is None else steps
    made = f"--batch-size {config.batch_size} × {processes} process(es) × {factor}"
    return made, config.batch_size * processes * steps


def check_algorithm_options(config: TrainConfig) -> None:
    """Refuse an option only some algorithms take (declared with ``lacks``) set away from its
    default for an algorithm whose TRL config does not read it: it would never reach the
    trainer."""
    for option, declared in train_options().items():
        value = getattr(config, option)
        if not declared.lacks or option in ALGORITHMS.get(config.algo).options:
            continue
        if value == default_of(TrainConfig, option):
            continue
        takers = [name for name in ALGORITHMS if option in ALGORITHMS.get(name).options]
        if isinstance(value, list):
            value = ",".join(f"{v:g}" for v in value)
        given = flag(option) if isinstance(value, bool) else f"{flag(option)} {value}"
        raise UsageError(
            f"{given} has no effect with --algo {config.algo} ({declared.lacks}): drop it, or "
            f"use --algo {', '.join(takers)}."
        )


def check_merge_options(config: TrainConfig) -> None:
    """Refuse a merge option (declared with ``merges``) set away from its default with a
    ``--merge`` that does not read it: AdamW (``none``) merges nothing, OnDARE elects no signs,
    OnTIES clamps nothing. ``--seed`` is never refused: it also seeds training."""
    for option, declared in train_options().items():
        value = getattr(config, option)
        takers = declared.merges
        if not takers or config.merge in takers or value == default_of(TrainConfig, option):
            continue
        does = declared.does
        why = f"AdamW does not merge; it {does}" if config.merge == "none" else f"it {does}"
        raise UsageError(
            f"{flag(option)} {'none' if value is None else value} has no effect with --merge "
            f"{config.merge} ({why}): drop it, or use --merge {' or '.join(takers)}."
        )


def optimizer_options(config: TrainConfig) -> dict[str, Any]:
    """The arguments of ``OnlineMergingAdamW`` set by options (declared with ``optim``)."""
    return {
        declared.optim: getattr(config, option)
        for option, declared in train_options().items()
        if declared.optim
    }


# The options whose TRL fields do not simply take their value: option → those fields' values.
TRL_VALUES: dict[str, Callable[[TrainConfig], dict[str, Any]]] = {
    "save_steps": lambda c: {
        "save_strategy": "steps" if c.save_steps > 0 else "no", "save_steps": c.save_steps or 500
    },
    "report_to": lambda c: {"report_to": [] if c.report_to == "none" else [c.report_to]},
    "fsdp": lambda c: {"fsdp": True, "fsdp_config": {"fsdp_version": 2,
                       "reshard_after_forward": True}} if c.fsdp else {},
    "deepspeed": lambda c: {"deepspeed": deepspeed_config(c)} if c.deepspeed else {},
    "eval_steps": lambda c: {"eval_strategy": "steps", "eval_steps": c.eval_steps
                             or c.logging_steps} if c.eval_dataset else {},
}  # fmt: skip
# Settings omotool always passes.
TRL_FIXED = {
    "disable_tqdm": True,
    "dataloader_pin_memory": False,  # pinning only helps (and only works) with an accelerator
}


def trl_arguments(config: TrainConfig, output: Path) -> Any:
    """The TRL config object for ``config.algo``: each option's value in the TRL fields it
    declares (``TrainOption.trl``, converted by ``TRL_VALUES``), then the algorithm's fixed
    settings, then the ``--trl`` fields (none of which omotool sets: ``trl_passthrough``).

    Every value reaches a field of the TRL config class: an option the algorithm does not read
    is refused (``check_algorithm_options``), an unset one (``None``) is left to TRL's default,
    and a field missing from the installed TRL is an error, never silently dropped.
    """
    check_algorithm_options(config)
    algorithm = ALGORITHMS.get(config.algo)
    config_class = algorithm.config_class()
    fields = set(config_class.__dataclass_fields__)
    values: dict[str, Any] = {
        "output_dir": str(output),
        **TRL_FIXED,
        # accelerate treats several CPU processes (torchrun, gloo) as one run only when told
        "use_cpu": not _has_accelerator(),
    }
    for option, declared in train_options().items():
        value = getattr(config, option)
        if declared.lacks and (option not in algorithm.options or value is None):
            continue  # not read by this algorithm, or unset: TRL's default
        if option in TRL_VALUES:
            values.update(TRL_VALUES[option](config))
        else:
            values.update(dict.fromkeys(declared.trl, value))
    checkpointing = [name for name in CHECKPOINTING if name in fields] or list(CHECKPOINTING)
    for name in set(CHECKPOINTING) - set(checkpointing):
        values.pop(name)
    if algorithm.online:  # completions are cut at --max-completion-length instead
        values.pop("max_length")
    values.update(algorithm.settings)
    values.update(trl_passthrough(config.algo, config.trl))
    missing = sorted(set(values) - fields)
    if missing:
        import trl

        raise OmoError(
            f"--algo {config.algo}: TRL {trl.__version__}'s {config_class.__name__} has no "
            f"field {', '.join(missing)}, so these settings cannot reach the trainer; install "
            "the TRL omotool is tested with (pip install 'trl>=1.16,<2')."
        )
    try:
        arguments = config_class(**values)
    except ValueError as exc:  # transformers' own checks of a combination of settings
        raise UsageError(f"--algo {config.algo}: TRL refuses these settings: {exc}") from None
    for name in checkpointing:
        if getattr(arguments, name) != config.gradient_checkpointing:
            raise OmoError(
                f"TRL's {config_class.__name__} resolved {name} to {getattr(arguments, name)} "
                f"although --gradient-checkpointing is {config.gradient_checkpointing}; this "
                "TRL/transformers pair is not supported (pip install 'trl>=1.16,<2')."
            )
    return arguments


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )  # fmt: skip
