"""``run_training``: one RLHF run on a TRL trainer with the online-merging optimizer.

Thin glue: the data are checked (``train.data``), the task vector found and matched to the
model, the TRL config built from ``TrainConfig``, and TRL's trainer handed an
``OnlineMergingAdamW``. Every logged step goes to ``OUT/metrics.jsonl`` with the optimizer's
merge statistics; the final model lands in ``OUT/`` as a complete model folder.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from omotool.errors import InputError, OutputError, UsageError
from omotool.train.algorithms import ALGORITHMS

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


def trl_arguments(config: TrainConfig, output: Path) -> Any:
    """The TRL config object for ``config.algo``, with omotool's option names mapped."""
    algorithm = ALGORITHMS.get(config.algo)
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
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
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
    if config.fsdp:
        values.update(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    if config.eval_dataset:
        values.update(eval_strategy="steps", eval_steps=config.eval_steps or config.logging_steps)
    if algorithm.uses_beta:
        values["beta"] = config.beta
    if config.algo == "robust":
        values["label_smoothing"] = config.label_smoothing
    if config.precompute_ref and algorithm.uses_reference:
        values["precompute_ref_log_probs"] = True
    values.update(algorithm.settings)
    config_class = algorithm.config_class()
    known = set(config_class.__dataclass_fields__)
    return config_class(**{k: v for k, v in values.items() if k in known})


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

    from omotool.train.data import load_examples

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


# -- checkpoints -----------------------------------------------------------------------------
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"  # checkpoints are written here, then renamed into place when complete
CONFIG_FILE, METADATA_FILE = "config.yaml", "omotool.json"
# Options that may change between a run and its resumption without changing its trajectory.
RESUMABLE = {"resume", "overwrite", "report_to", "logging_steps", "save_total_limit", "save_steps"}


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints in ``output``, oldest first (staging folders are never listed)."""
    found = [
        (int(match.group(1)), path)
        for path in output.iterdir()
        if path.is_dir() and (match := CHECKPOINT.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def rotate_checkpoints(output: Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (the newest always stays)."""
    if not limit:
        return
    for old in checkpoints(output)[: -max(1, limit)]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def online_merging_trainer(
    trainer_class: type,
    task_vector: Any = None,
    *,
    atomic_checkpoints: bool = True,
    **options: Any,
) -> type:
    """``trainer_class`` (any transformers/TRL trainer) training with ``OnlineMergingAdamW``.

    The optimizer is built by the trainer itself, from its (possibly FSDP-sharded) model's
    named parameters, with the trainer's learning rate and weight decay (not on biases and
    norms, as transformers does); ``options`` go to ``OnlineMergingAdamW`` (``method``,
    ``reserve_p``, ``alpha``, ...). Usage::

        DPOWithOnDARE = online_merging_trainer(DPOTrainer, TaskVector.load("runs/tau"),
                                               method="dare", reserve_p=0.01, alpha=1e-7)
        DPOWithOnDARE(model=model, args=args, train_dataset=data, processing_class=tok).train()

    With ``atomic_checkpoints``, a checkpoint appears only when complete: transformers writes
    ``checkpoint-N`` in place and resumes from the highest number, so a run killed while
    saving would resume from a half-written folder; here it is written under ``.staging/``
    and renamed into place once every process has finished, and rotation keeps the newest.
    """
    from omotool.optim import OnlineMergingAdamW

    class OnlineMergingTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                source = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(source))
                named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
                groups = [
                    {"params": [(n, p) for n, p in named if n in decay],
                     "weight_decay": self.args.weight_decay},
                    {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
                ]  # fmt: skip
                self.optimizer = OnlineMergingAdamW(
                    [group for group in groups if group["params"]],
                    task_vector,
                    lr=self.args.learning_rate,
                    betas=(self.args.adam_beta1, self.args.adam_beta2),
                    eps=self.args.adam_epsilon,
                    **options,
                )
            return self.optimizer

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            if not atomic_checkpoints:
                super()._save_checkpoint(model, trial)
                return
            output = Path(self.args.output_dir)
            staging = output / STAGING
            if self.args.should_save and staging.exists():
                shutil.rmtree(staging)  # debris of a save that was interrupted
            self.accelerator.wait_for_everyone()
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(output)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                name = f"checkpoint-{self.state.global_step}"
                for path in (staging / name).rglob("*"):
                    if path.is_file():
                        with path.open("rb") as handle:
                            os.fsync(handle.fileno())
                if (output / name).exists():
                    shutil.rmtree(output / name)
                os.replace(staging / name, output / name)
                _fsync_dir(output)
                rotate_checkpoints(output, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

    OnlineMergingTrainer.__name__ = f"OnlineMerging{trainer_class.__name__}"
    return OnlineMergingTrainer


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


class Interrupt:
    """Ctrl-C ends the run at the next step boundary with a checkpoint; twice, at once."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def callback(self) -> Any:
        from transformers import TrainerCallback

        interrupt = self

        class StopAndSave(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                if interrupt.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return StopAndSave()


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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    config.validate()
    algorithm = ALGORITHMS.get(config.algo)
    output = Path(config.out)
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
        _write_atomic(output / CONFIG_FILE, yaml.safe_dump(asdict(config), sort_keys=False))
        if start is not None:
            _truncate_metrics(metrics_path, int(CHECKPOINT.match(start.name).group(1)))

    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
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
    trainer = trainer_class(
        model=model,
        args=trl_arguments(config, output),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[metrics, interrupt.callback(), *callbacks],
    )
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
            _write_atomic(output / METADATA_FILE, json.dumps(_metadata(config, result), indent=2))
    return result


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
        _fsync_dir(output)


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


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    os.replace(partial, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (the resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    _write_atomic(path, "\n".join(kept))


def metrics_callback(path: Path) -> Any:
    """A transformers callback writing each log line plus the optimizer's ``stats()`` (when it
    has them) to ``path``."""
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        last: dict[str, Any] = {}

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not logs or not state.is_world_process_zero:
                return
            optimizer = kwargs.get("optimizer")
            while optimizer is not None and not hasattr(optimizer, "stats"):
                optimizer = getattr(optimizer, "optimizer", None)  # accelerate's wrapper
            stats = optimizer.stats() if optimizer is not None else {}
            record = {"step": state.global_step, **logs, **stats}
            record = {
                k: v for k, v in record.items() if not isinstance(v, float) or math.isfinite(v)
            }
            self.last = {**self.last, **record}  # the end-of-run summary keeps the last loss
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return MetricsLog()
