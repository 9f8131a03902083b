"""``run_training``: one RLHF run on a TRL trainer with the online-merging optimizer.

Thin glue: the data are checked (``omotool.data``), the task vector found and matched to the
model, the TRL config built from ``TrainConfig``, and TRL's trainer handed an
``OnlineMergingAdamW``. Every logged step goes to ``OUT/metrics.jsonl`` with the optimizer's
merge statistics; the final model lands in ``OUT/`` as a complete model folder.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from omotool.errors import InputError, OmoError, OutputError, UsageError
from omotool.io.formats import fsync_path, write_text_atomic
from omotool.train.algorithms import ALGORITHMS, LOSS_OPTIONS
from omotool.train.checkpoints import (
    CHECKPOINT,
    STAGING,
    Interrupt,
    checkpoints,
)
from omotool.train.trainer import metrics_callback, online_merging_trainer

MERGES = ("none", "dare", "ties")
REPORTERS = ("none", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"


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
    beta: float = 0.1
    label_smoothing: float = 0.0
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
        if self.merge != "none" and not (self.base or self.task_vector):
            raise UsageError(
                f"--merge {self.merge} merges with the SFT task vector: give --base BASE "
                "(computed at start) or --task-vector DIR (from `omotool delta`)."
            )
        if self.base and self.task_vector:
            raise UsageError("give --base or --task-vector, not both.")
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
        check_loss_options(self)
        self._check_ranges()
        least = ALGORITHMS.get(self.algo).min_batch_size
        if self.batch_size < least:
            raise UsageError(
                f"--algo {self.algo} needs --batch-size {least} or more (examples per device: "
                "TRL's KL estimate compares each example with the others in its batch)."
            )

    def _check_ranges(self) -> None:
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
            ("--beta must be > 0", self.beta <= 0),
            ("--label-smoothing must be in [0, 0.5)", not 0 <= self.label_smoothing < 0.5),
        ]  # fmt: skip
        for message, wrong in problems:
            if wrong:
                raise UsageError(f"{message}.")


def load_task_vector(config: TrainConfig) -> Any:
    """The SFT task vector of ``config.model``; a given ``--task-vector`` must match it."""
    from omotool.io.reader import ModelReader, fingerprint
    from omotool.optim import TaskVector

    if config.task_vector is None:
        return TaskVector.from_models(config.base, config.model)
    tau = TaskVector.load(config.task_vector)
    expected = tau.sft_fingerprint
    if expected is not None:
        with ModelReader(config.model) as reader:
            actual = fingerprint(reader)
        if actual != expected:
            raise InputError(
                f"task vector {config.task_vector} was computed for another SFT model than "
                f"{config.model} (fingerprint {expected[:12]} vs {actual[:12]}); recompute it "
                f"with `omotool delta BASE {config.model}` or give --base."
            )
    return tau


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


def check_loss_options(config: TrainConfig) -> None:
    """Refuse a loss option (``LOSS_OPTIONS``) set away from its default for an algorithm whose
    TRL loss does not read it: it would never reach the trainer."""
    defaults = TrainConfig()
    for option, (_, reason) in LOSS_OPTIONS.items():
        value = getattr(config, option)
        if option in ALGORITHMS.get(config.algo).options or value == getattr(defaults, option):
            continue
        takers = [name for name in ALGORITHMS if option in ALGORITHMS.get(name).options]
        given = _flag(option) if isinstance(value, bool) else f"{_flag(option)} {value}"
        raise UsageError(
            f"{given} has no effect with --algo {config.algo} ({reason}): drop it, or use "
            f"--algo {', '.join(takers)}."
        )


def trl_arguments(config: TrainConfig, output: Path) -> Any:
    """The TRL config object for ``config.algo``, with omotool's option names mapped.

    Every value reaches a field of the TRL config class: an option the algorithm's loss does
    not read is refused (``check_loss_options``), and a field missing from the installed TRL
    is an error, never silently dropped.
    """
    check_loss_options(config)
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
    values.update({LOSS_OPTIONS[o][0]: getattr(config, o) for o in algorithm.options})
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


def _is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )  # fmt: skip


def _dataset(path: str, kind: str, split: str) -> Any:
    from datasets import Dataset

    from omotool.data import load_examples

    return Dataset.from_list(load_examples(path, kind, split))


def prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputError(
                f"{output} exists and is not empty; pass --overwrite to replace it "
                "(or --resume to continue the run in it)."
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


CONFIG_FILE, METADATA_FILE = "config.yaml", "omotool.json"
# Options that may change between a run and its resumption without changing its trajectory.
RESUMABLE = {"resume", "overwrite", "report_to", "logging_steps", "save_total_limit", "save_steps"}


def resume_point(config: TrainConfig, output: Path) -> Path:
    """The newest complete checkpoint of the run in ``output``, whose config must match."""
    saved_path = output / CONFIG_FILE
    if not saved_path.exists():
        raise InputError(f"nothing to resume in {output}: no {CONFIG_FILE} of an earlier run.")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = asdict(config)
    changed = sorted(
        key for key in current if key not in RESUMABLE and saved.get(key) != current[key]
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {current[k]!r}" for k in changed)
        raise UsageError(
            f"--resume continues the run in {output} with its own settings, but these differ: "
            f"{details}. Drop them, or start a new run in another folder."
        )
    found = checkpoints(output)
    if not found:
        raise InputError(
            f"nothing to resume in {output}: no complete checkpoint (use --save-steps N)."
        )
    return found[-1]


# -- the run ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: str
    steps: int
    interrupted: bool
    resumed_from: str | None
    metrics: dict[str, Any]
    examples: int = 0  # training examples read (after unpairing for KTO)
    dropped: int = 0  # removed by TRL: the prompt alone reaches max_length
    truncated: int = 0  # shortened to max_length by TRL


def count_truncated(dataset: Any, max_length: int | None) -> int:
    """Examples of a TRL-tokenized ``dataset`` longer than ``max_length`` tokens in total
    (prompt plus its longest answer), which TRL's collator truncates."""
    if max_length is None or dataset is None:
        return 0
    columns = dataset.column_names
    if "input_ids" in columns:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    else:
        answers = [c for c in columns if c.endswith("_ids") and c != "prompt_ids"]
        prompts = dataset["prompt_ids"] if "prompt_ids" in columns else [[]] * len(dataset)
        per_answer = [dataset[c] for c in answers]
        lengths = [
            len(prompt) + max((len(answer[i]) for answer in per_answer), default=0)
            for i, prompt in enumerate(prompts)
        ]
    return sum(length > max_length for length in lengths)


def run_training(config: TrainConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train per ``config`` (extra transformers ``callbacks``, e.g. a progress display)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    config.validate()
    algorithm = ALGORITHMS.get(config.algo)
    output = Path(config.out)
    arguments = trl_arguments(config, output)  # TRL's own checks, before any data or model
    with _loading(config.model):  # its config.json: a wrong --model fails before anything runs
        AutoConfig.from_pretrained(config.model)
    start = resume_point(config, output) if config.resume else None
    train_data = _dataset(config.dataset, algorithm.kind, config.split)
    eval_data = (
        _dataset(config.eval_dataset, algorithm.kind, config.eval_split)
        if config.eval_dataset
        else None
    )
    tau = load_task_vector(config) if config.merge != "none" else None
    metrics_path = output / METRICS_FILE
    if _is_main_process():  # under torchrun/accelerate the other ranks only train
        if start is None:
            prepare_output(output, config.overwrite)
        write_text_atomic(output / CONFIG_FILE, yaml.safe_dump(asdict(config), sort_keys=False))
        if start is not None:
            _truncate_metrics(metrics_path, int(CHECKPOINT.match(start.name).group(1)))

    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    with _loading(config.model):
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    metrics = metrics_callback(metrics_path)
    interrupt = Interrupt()
    trainer_class = online_merging_trainer(
        algorithm.trainer_class(),
        tau,
        method=config.merge,
        reserve_p=config.reserve_p,
        alpha=config.alpha,
        online_step=config.online_step,
        rescale=config.rescale,
        election=config.election,
        seed=config.seed,
    )
    try:
        trainer = trainer_class(
            model=model,
            args=arguments,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            callbacks=[metrics, interrupt.callback(), *callbacks],
        )
    except ValueError as exc:  # TRL's checks of the model, tokenizer and settings together
        name = algorithm.trainer.rpartition(":")[2]
        raise UsageError(f"TRL's {name} refuses this run: {exc}") from exc
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt.handler) if in_main_thread else None
    try:
        trainer.train(resume_from_checkpoint=str(start) if start else None)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    result = TrainResult(
        out=str(output),
        steps=trainer.state.global_step,
        interrupted=interrupt.requested,
        resumed_from=str(start) if start else None,
        metrics=metrics.last,
        examples=len(train_data),
        dropped=len(train_data) - len(trainer.train_dataset),
        truncated=count_truncated(trainer.train_dataset, config.max_length),
    )
    if not interrupt.requested:
        _save_final_model(trainer, tokenizer, output)
        if trainer.args.should_save:
            write_text_atomic(
                output / METADATA_FILE, json.dumps(_metadata(config, result), indent=2)
            )
    return result


@contextlib.contextmanager
def _loading(model: str) -> Iterator[None]:
    """transformers' errors for a ``--model`` it cannot load, as an ``InputError``."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise InputError(
            f"--model {model}: not a model transformers can load with its tokenizer ({exc})."
        ) from exc


def _save_final_model(trainer: Any, tokenizer: Any, output: Path) -> None:
    """The trained model and tokenizer into ``output`` itself, each file replaced atomically."""
    staging = output / STAGING
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(staging))
        for path in sorted(staging.iterdir()):
            if path.is_file():
                os.replace(path, output / path.name)
        shutil.rmtree(staging, ignore_errors=True)
        fsync_path(output)


def _metadata(config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers
    import trl

    from omotool import __version__
    from omotool.io.reader import ModelReader, fingerprint

    def described(path: str | None) -> dict[str, Any] | None:
        if path is None:
            return None
        with ModelReader(path) as reader:
            return {"path": str(Path(path).absolute()), "fingerprint": fingerprint(reader)}

    return {
        "kind": "rlhf_run",
        "omotool_version": __version__,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": described(config.model),
        "base": described(config.base),
        "task_vector": str(Path(config.task_vector).absolute()) if config.task_vector else None,
        "dataset": str(Path(config.dataset).absolute()),
        "seed": config.seed,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "examples": {
            "read": result.examples,
            "dropped": result.dropped,
            "truncated": result.truncated,
        },
        "final_metrics": result.metrics,
        "config": asdict(config),
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (the resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_text_atomic(path, "\n".join(kept))
