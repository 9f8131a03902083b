"""The options of ``omotool train`` (``TrainConfig``), their checks, and TRL's config built
from them (``trl_arguments``).

Every option either reaches TRL's trainer or the optimizer, or is refused before anything is
loaded: an option the algorithm does not read (``check_algorithm_options``), a merge option
the chosen ``--merge`` does not read (``check_merge_options``), rewards an online algorithm
cannot use (``check_rewards``), a value out of range, and a setting the installed TRL has no
field for.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omotool.errors import OmoError, UsageError
from omotool.train.algorithms import ALGORITHM_OPTIONS, ALGORITHMS

MERGES = ("none", "dare", "ties")
# TRL 1.16's GRPO losses and reward scalings (GRPOConfig's loss_type and scale_rewards).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
REPORTERS = ("none", "tensorboard", "wandb")
# The options only some --merge values read: option → (those values, what the option does).
MERGE_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "base": (("dare", "ties"), "computes the task vector to merge from this base model"),
    "task_vector": (("dare", "ties"), "gives the task vector to merge"),
    "reserve_p": (("dare", "ties"), "sets the fraction of each update and of τ a merge keeps"),
    "alpha": (("dare", "ties"), "weighs the task vector in each merge"),
    "online_step": (("dare", "ties"), "sets how many steps pass between merges"),
    "rescale": (("dare", "ties"), "sets how the entries a merge keeps are scaled"),
    "election": (("ties",), "chooses the sign election, which only OnTIES holds"),
}


# Schedulers that need nothing omotool does not pass (others need lr_scheduler_kwargs).
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
)  # fmt: skip
# transformers (5.x) reads `activation_checkpointing`; `gradient_checkpointing` is its deprecated
# alias, copied into it only when it is unset, and TRL's configs default that alias to True (so
# checkpointing is on unless turned off). Both are set, to the same value, on classes that have
# them; a class with neither is refused.
CHECKPOINTING = ("activation_checkpointing", "gradient_checkpointing")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


@dataclass
class TrainConfig:
    """Every option of ``omotool train``; recipe keys and command-line names are these."""

    model: str = ""  # the SFT model (policy start and reference)
    dataset: str = ""
    split: str = "train"  # of a Hub dataset
    out: str = ""
    algo: str = "dpo"
    merge: str = "dare"  # none (AdamW) | dare (OnDARE) | ties (OnTIES)
    base: str | None = None  # base model: the task vector is computed at start
    task_vector: str | None = None  # or an `omotool delta` output
    reserve_p: float = 0.01
    alpha: float = 1e-7
    online_step: int = 1
    rescale: str | None = None
    election: str = "unweighted"
    seed: int = 0
    lr: float = 5e-7
    beta: float | None = None  # None: TRL's default for the algorithm (resolved by validate)
    label_smoothing: float = 0.0
    # online RL (grpo, rloo): rewards, and TRL's sampling and loss settings (None: TRL's default)
    reward: list[str] = field(default_factory=list)  # verifiers and Python functions, in order
    reward_model: list[str] = field(default_factory=list)  # reward model folders, after them
    reward_weights: list[float] | None = None  # one per reward, in that order
    reward_pattern: str | None = None  # of the regex verifier
    reference_field: str = "reference"  # the column verifiers compare with
    num_generations: int | None = None
    max_completion_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    epsilon: float | None = None
    loss_type: str | None = None
    scale_rewards: str | None = None
    num_iterations: int | None = None
    use_vllm: bool = False
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int | None = 1024  # prompt + answer, in tokens (TRL truncates the end)
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) across processes
    optimizer_backend: str = "auto"  # how OnlineMergingAdamW computes a step (its `backend`)
    precompute_ref: bool = False
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = None
    logging_steps: int = 1
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_steps: int | None = None
    report_to: str = "none"
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        for name in ("model", "dataset", "out"):
            if not getattr(self, name):
                raise UsageError(f"--{name.replace('_', '-')} is required.")
        ALGORITHMS.get(self.algo)
        if self.merge not in MERGES:
            raise UsageError(f"--merge {self.merge!r}: choose one of {', '.join(MERGES)}.")
        check_merge_options(self)
        if self.merge != "none" and not (self.base or self.task_vector):
            raise UsageError(
                f"--merge {self.merge} merges with the SFT task vector: give --base BASE "
                "(computed at start) or --task-vector DIR (from `omotool delta`)."
            )
        if self.base and self.task_vector:
            raise UsageError("give --base or --task-vector, not both.")
        check_optimizer_backend(self)
        if self.fsdp and not _has_accelerator():
            raise UsageError(
                "--fsdp shards across GPUs: accelerate runs FSDP only on GPU (and XPU) "
                "processes, not on CPU ones. On CPUs, run under torchrun without --fsdp (DDP)."
            )
        if self.report_to not in REPORTERS:
            raise UsageError(
                f"--report-to {self.report_to!r}: choose one of {', '.join(REPORTERS)}."
            )
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise UsageError(
                f"--report-to {self.report_to} needs the {self.report_to} package: "
                f"pip install {self.report_to}"
            )
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise UsageError("--lr must be > 0, --batch-size and --grad-accum at least 1.")
        self._resolve_beta()
        check_algorithm_options(self)
        self._check_ranges()
        check_rewards(self)
        least = ALGORITHMS.get(self.algo).min_batch_size
        if self.batch_size < least:
            raise UsageError(
                f"--algo {self.algo} needs --batch-size {least} or more (examples per device: "
                "TRL's KL estimate compares each example with the others in its batch)."
            )

    def _resolve_beta(self) -> None:
        """An unset ``beta`` becomes the TRL default of the algorithm's config (DPO 0.1, GRPO
        0, RLOO 0.05), so that the saved config says which was used."""
        if self.beta is None and "beta" in ALGORITHMS.get(self.algo).options:
            self.beta = float(_trl_default(self.algo, "beta"))

    def _check_ranges(self) -> None:
        from omotool.merging import RESCALES
        from omotool.merging.consensus import ELECTIONS

        for option, value, choices in (
            ("rescale", self.rescale, RESCALES), ("election", self.election, ELECTIONS),
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
        ):  # fmt: skip
            if value is not None and value not in choices:
                raise UsageError(f"{_flag(option)} {value!r}: choose one of {', '.join(choices)}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UsageError(
                f"--lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}."
            )
        if self.lr_scheduler == "constant" and self.warmup_steps:
            raise UsageError(
                "--lr-scheduler constant has no warm-up, so --warmup-steps would be ignored: use "
                "--lr-scheduler constant_with_warmup, or drop --warmup-steps."
            )
        problems = [
            ("--epochs must be > 0", self.epochs <= 0),
            ("--max-steps must be -1 (train for --epochs) or at least 1",
             self.max_steps == 0 or self.max_steps < -1),
            ("--warmup-steps must be >= 0", self.warmup_steps < 0),
            ("--weight-decay must be >= 0", self.weight_decay < 0),
            ("--max-length must be at least 1", self.max_length is not None
             and self.max_length < 1),
            ("--save-steps must be >= 0", self.save_steps < 0),
            ("--save-total-limit must be at least 1", self.save_total_limit is not None
             and self.save_total_limit < 1),
            ("--logging-steps must be at least 1", self.logging_steps < 1),
            ("--eval-steps must be at least 1", (self.eval_steps or 1) < 1),
            ("--eval-steps needs --eval-dataset", self.eval_steps is not None
             and not self.eval_dataset),
            ("--reserve-p must be in (0, 1] (the fraction kept)",
             not 0 < self.reserve_p <= 1),
            ("--alpha must be in [0, 1]", not 0 <= self.alpha <= 1),
            ("--online-step must be at least 1", self.online_step < 1),
            ("--beta must be > 0", self.beta is not None and self.beta <= 0
             and not ALGORITHMS.get(self.algo).online),
            ("--beta must be >= 0 (0: no KL term, no reference model)",
             self.beta is not None and self.beta < 0),
            ("--num-generations must be at least 2 (advantages compare a prompt's completions)",
             self.num_generations is not None and self.num_generations < 2),
            ("--max-completion-length must be at least 1", self.max_completion_length is not None
             and self.max_completion_length < 1),
            ("--temperature must be > 0", self.temperature is not None and self.temperature <= 0),
            ("--top-p must be in (0, 1]", self.top_p is not None and not 0 < self.top_p <= 1),
            ("--epsilon must be > 0", self.epsilon is not None and self.epsilon <= 0),
            ("--num-iterations must be at least 1", self.num_iterations is not None
             and self.num_iterations < 1),
            ("--label-smoothing must be in [0, 0.5)", not 0 <= self.label_smoothing < 0.5),
        ]  # fmt: skip
        for message, wrong in problems:
            if wrong:
                raise UsageError(f"{message}.")


def check_optimizer_backend(config: TrainConfig) -> None:
    """Refuse an unknown ``--optimizer-backend``, and ``triton`` where it cannot run this
    config (no Triton, no CUDA and no interpreter, step-K, the l1 rescale)."""
    from omotool.optim.backends import triton as triton_backend
    from omotool.optim.functional import MergeOptions
    from omotool.optim.online_merging import BACKENDS

    backend = config.optimizer_backend
    if backend not in BACKENDS:
        raise UsageError(f"--optimizer-backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if backend != "triton":
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
        f"{_flag(name)} {', '.join(map(str, value)) if isinstance(value, list) else value}"
        for name in ("reward", "reward_model", "reward_pattern", "reference_field")
        if (value := getattr(config, name)) != getattr(defaults, name)
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
            "or path/to/file.py:function) or --reward-model DIR, several if you like."
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
            "(--reward exact, regex, last_number): add one, or drop it."
        )
    if config.reward_weights is not None and len(config.reward_weights) != len(specs):
        raise UsageError(
            f"--reward-weights gives {len(config.reward_weights)} weights for {len(specs)} "
            f"rewards ({', '.join(spec.option for spec in specs)}): give one per reward, in that "
            "order (the --reward ones first, then the --reward-model ones)."
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
    generations = config.num_generations or _trl_default(config.algo, "num_generations")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    completions = config.batch_size * processes * config.grad_accum
    if completions % generations:
        raise UsageError(
            f"--algo {config.algo} samples --num-generations {generations} completions per "
            f"prompt, but a step holds --batch-size {config.batch_size} × {processes} "
            f"process(es) × --grad-accum {config.grad_accum} = {completions} completions, not a "
            f"multiple of {generations}: make the product a multiple (e.g. --batch-size "
            f"{generations}), or change --num-generations."
        )


def _trl_default(algo: str, name: str) -> Any:
    """The default of ``name`` in the TRL config class of ``algo``."""
    return ALGORITHMS.get(algo).config_class().__dataclass_fields__[name].default


def check_algorithm_options(config: TrainConfig) -> None:
    """Refuse an option only some algorithms take (``ALGORITHM_OPTIONS``) set away from its
    default for an algorithm whose TRL config does not read it: it would never reach the
    trainer."""
    defaults = TrainConfig()
    for option, (_, reason) in ALGORITHM_OPTIONS.items():
        value = getattr(config, option)
        if option in ALGORITHMS.get(config.algo).options or value == getattr(defaults, option):
            continue
        takers = [name for name in ALGORITHMS if option in ALGORITHMS.get(name).options]
        if isinstance(value, list):
            value = ",".join(f"{v:g}" for v in value)
        given = _flag(option) if isinstance(value, bool) else f"{_flag(option)} {value}"
        raise UsageError(
            f"{given} has no effect with --algo {config.algo} ({reason}): drop it, or use "
            f"--algo {', '.join(takers)}."
        )


def check_merge_options(config: TrainConfig) -> None:
    """Refuse a merge option (``MERGE_OPTIONS``) set away from its default with a ``--merge``
    that does not read it: AdamW (``none``) merges nothing, OnDARE elects no signs. ``--seed``
    is never refused: it also seeds training."""
    defaults = TrainConfig()
    for option, (takers, does) in MERGE_OPTIONS.items():
        value = getattr(config, option)
        if config.merge in takers or value == getattr(defaults, option):
            continue
        why = f"AdamW does not merge; it {does}" if config.merge == "none" else f"it {does}"
        raise UsageError(
            f"{_flag(option)} {value} has no effect with --merge {config.merge} ({why}): drop "
            f"it, or use --merge {' or '.join(takers)}."
        )


def trl_arguments(config: TrainConfig, output: Path) -> Any:
    """The TRL config object for ``config.algo``, with omotool's option names mapped.

    Every value reaches a field of the TRL config class: an option the algorithm does not read
    is refused (``check_algorithm_options``), an unset one (``None``) is left to TRL's default,
    and a field missing from the installed TRL is an error, never silently dropped.
    """
    check_algorithm_options(config)
    algorithm = ALGORITHMS.get(config.algo)
    config_class = algorithm.config_class()
    fields = set(config_class.__dataclass_fields__)
    values: dict[str, Any] = dict(
        output_dir=str(output),
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        bf16=config.bf16,  # (TRL defaults it to True)
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to=[] if config.report_to == "none" else [config.report_to],
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        disable_tqdm=True,
        dataloader_pin_memory=False,  # pinning only helps (and only works) with an accelerator
        # accelerate treats several CPU processes (torchrun, gloo) as one run only when told
        use_cpu=not _has_accelerator(),
    )
    checkpointing = [name for name in CHECKPOINTING if name in fields] or list(CHECKPOINTING)
    values.update(dict.fromkeys(checkpointing, config.gradient_checkpointing))
    if config.fsdp:
        values.update(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    if config.eval_dataset:
        values.update(eval_strategy="steps", eval_steps=config.eval_steps or config.logging_steps)
    values.update(
        {
            ALGORITHM_OPTIONS[option][0]: getattr(config, option)
            for option in algorithm.options
            if getattr(config, option) is not None  # unset: TRL's default
        }
    )
    if algorithm.online:  # completions are cut at --max-completion-length instead
        values.pop("max_length")
    values.update(algorithm.settings)
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
