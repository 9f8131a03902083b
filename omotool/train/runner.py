"""``run_training``: one RLHF run on a TRL trainer with the online-merging optimizer.

Thin glue: the data are checked (``omotool.data``), the task vector found and matched to the
model, the TRL config built from ``TrainConfig``, and TRL's trainer handed an
``OnlineMergingAdamW``. Every logged step goes to ``OUT/metrics.jsonl`` with the optimizer's
merge statistics; the final model lands in ``OUT/`` as a complete model folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from omotool.errors import InputError, OutputError, UsageError
from omotool.io.adapters import adapter_base, is_adapter, tokenizer_folder
from omotool.io.formats import fsync_path, write_text_atomic
from omotool.train.algorithms import ALGORITHMS
from omotool.train.arguments import MERGES, TrainConfig, optimizer_options, trl_arguments
from omotool.train.checkpoints import (
    CHECKPOINT,
    STAGING,
    Interrupt,
    checkpoints,
)
from omotool.train.deepspeed import (
    DEEPSPEED_FILE,
    check_deepspeed_resume,
    deepspeed_record,
    init_deepspeed_comm,
)
from omotool.train.lora import check_targets as check_lora_targets
from omotool.train.lora import (
    keep_sft_reference,
    load_policy,
    lora_merging_trainer,
    lora_on,
    peft_config,
)
from omotool.train.progress import is_main_process
from omotool.train.rewards import load_reward, name_uniquely, parse_rewards, required_columns
from omotool.train.trainer import completions_callback, metrics_callback, online_merging_trainer

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"  # online RL: what the policy wrote, step by step
# MERGES lives in omotool.train.options, TrainConfig and trl_arguments in omotool.train.arguments;
# imported from here too.
__all__ = ["MERGES", "TrainConfig", "TrainResult", "run_training", "trl_arguments"]


def load_task_vector(config: TrainConfig) -> Any:
    """The SFT task vector of ``config.model``; a given ``--task-vector`` must match it. For
    an SFT adapter folder, ``τ = s·B·A`` from its factors (``--base`` may be given only if it
    is the adapter's base)."""
    from omotool.io.adapters import open_model
    from omotool.io.reader import fingerprint
    from omotool.optim import TaskVector
    from omotool.optim.references import adapter_task_vector
    from omotool.train.lora import check_adapter_base

    if config.task_vector is None and is_adapter(config.model):
        check_adapter_base(config)
        return adapter_task_vector(config.model)
    if config.task_vector is None:
        return TaskVector.from_models(config.base, config.model)
    tau = TaskVector.load(config.task_vector)
    expected = tau.sft_fingerprint
    if expected is not None:
        with open_model(config.model) as reader:
            actual = fingerprint(reader)
        if actual != expected:
            raise InputError(
                f"task vector {config.task_vector} was computed for another SFT model than "
                f"{config.model} (fingerprint {expected[:12]} vs {actual[:12]}); recompute it "
                f"with `omotool delta BASE {config.model}` or give --base."
            )
    return tau


def _dataset(path: str, kind: str, split: str, columns: dict[str, str] | None = None) -> Any:
    from datasets import Dataset

    from omotool.data import load_examples

    return Dataset.from_list(load_examples(path, kind, split, columns))


def _verifier_settings(config: TrainConfig) -> tuple[str, str | None]:
    return config.reference_field, config.reward_pattern


def _reward_model_placement(config: TrainConfig) -> Any:
    """Reward models run where this process trains (its GPU under torchrun), in the policy's
    dtype."""
    import torch

    from omotool.eval.device import Placement

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return Placement(device, torch.bfloat16 if config.bf16 else torch.float32)


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
# (Not ``trl``: which of TRL's many fields leave the trajectory alone is not known here, so a
# changed --trl is refused like any other option.)
RESUMABLE = {"resume", "overwrite", "report_to", "logging_steps", "save_total_limit", "save_steps",
             "log_completions", "print_completions"}  # fmt: skip


def resume_point(config: TrainConfig, output: Path) -> Path:
    """The newest complete checkpoint of the run in ``output``, whose config must match."""
    saved_path = output / CONFIG_FILE
    if not saved_path.exists():
        raise InputError(f"nothing to resume in {output}: no {CONFIG_FILE} of an earlier run.")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = asdict(config)
    defaults = asdict(TrainConfig())  # an option added since the run was saved: its default
    changed = sorted(
        key
        for key in current
        if key not in RESUMABLE and saved.get(key, defaults[key]) != current[key]
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


def generation_buffer_steps(arguments: Any) -> int:
    """Optimizer steps one batch of sampled completions lasts: 1 but for GRPO/RLOO.

    TRL's online trainers sample every ``G = steps_per_generation × num_iterations`` micro-batches
    and keep the completions in memory, which a checkpoint does not hold; optimizer step N ends
    at micro-batch N × grad_accum, so the buffer is full again at N a multiple of
    G / gcd(G, grad_accum)."""
    if getattr(arguments, "steps_per_generation", None) is None:
        return 1  # the DPO family samples nothing
    sampled_every = arguments.steps_per_generation * (arguments.num_iterations or 1)
    return sampled_every // math.gcd(sampled_every, arguments.gradient_accumulation_steps)


def check_generation_boundary(start: Path, output: Path, arguments: Any) -> None:
    """Refuse to resume from a checkpoint saved while completions were buffered: TRL would
    sample new ones where the run never stopped would have reused them, and end elsewhere."""
    steps = generation_buffer_steps(arguments)
    step = int(CHECKPOINT.match(start.name).group(1))
    if step % steps == 0:
        return
    earlier = [
        p for p in checkpoints(output) if int(CHECKPOINT.match(p.name).group(1)) % steps == 0
    ]
    instead = (
        f"resume from {earlier[-1].name} (move the newer checkpoints out of {output})"
        if earlier
        else "start again"
    )
    raise UsageError(
        f"{start.name} lies inside a generation buffer of {steps} steps (num_iterations × "
        f"steps_per_generation / grad_accum): resuming there would sample new completions and "
        f"not continue the run. {instead[0].upper() + instead[1:]}, or save at multiples of "
        f"{steps} with --save-steps."
    )


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
    optimizer_backend: str | None = None  # the backend OnlineMergingAdamW ran (auto resolved)


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
    from transformers import AutoConfig, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    config.validate()
    algorithm = ALGORITHMS.get(config.algo)
    output = Path(config.out)
    start = resume_point(config, output) if config.resume else None
    if start is not None:
        check_deepspeed_resume(config, start)
    arguments = trl_arguments(config, output)  # TRL's own checks, before any data or model
    if start is not None:
        check_generation_boundary(start, output, arguments)
    if config.deepspeed:
        init_deepspeed_comm()
    continuing = is_adapter(config.model)  # an SFT adapter trained further (train.lora)
    with _loading(config.model):  # its config.json: a wrong --model fails before anything runs
        model_config = AutoConfig.from_pretrained(
            adapter_base(config.model) if continuing else config.model
        )
    check_lora_targets(config, model_config)
    specs = parse_rewards(config.reward, config.reward_model) if algorithm.online else []
    # Verifiers and Python functions first (an import error before any data or model is read),
    # reward models once the data are checked; all before the policy loads.
    rewards = [
        None if s.kind == "model" else load_reward(s, *_verifier_settings(config)) for s in specs
    ]
    columns = required_columns([r for r in rewards if r is not None])
    train_data = _dataset(config.dataset, algorithm.kind, config.split, columns)
    eval_data = (
        _dataset(config.eval_dataset, algorithm.kind, config.eval_split, columns)
        if config.eval_dataset
        else None
    )
    placement = _reward_model_placement(config)
    rewards = [
        reward or load_reward(spec, *_verifier_settings(config), placement)
        for reward, spec in zip(rewards, specs, strict=True)
    ]
    name_uniquely(rewards)
    tau = load_task_vector(config) if config.merge != "none" else None
    metrics_path = output / METRICS_FILE
    if is_main_process():  # under torchrun/accelerate the other ranks only train
        if start is None:
            prepare_output(output, config.overwrite)
        write_text_atomic(output / CONFIG_FILE, yaml.safe_dump(asdict(config), sort_keys=False))
        if start is None and config.deepspeed:  # what a resumption must match
            record = json.dumps(deepspeed_record(config), indent=2)
            write_text_atomic(output / DEEPSPEED_FILE, record)
        if start is not None:
            step = int(CHECKPOINT.match(start.name).group(1))
            for logged in (metrics_path, output / COMPLETIONS_FILE):
                _truncate_metrics(logged, step)

    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    with _loading(config.model):
        model = load_policy(config, dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(config.model))
    metrics = metrics_callback(metrics_path)
    interrupt = Interrupt(every=generation_buffer_steps(arguments))  # a resumable checkpoint
    merging = (
        lora_merging_trainer if lora_on(config) and tau is not None else online_merging_trainer
    )
    trainer_class = merging(algorithm.trainer_class(), tau, **optimizer_options(config))
    extra = {"reward_funcs": rewards} if algorithm.online else {}
    if lora_on(config) and not continuing:  # TRL wraps the model in the adapter (train.lora)
        extra["peft_config"] = peft_config(config)
    try:
        trainer = trainer_class(
            model=model,
            args=arguments,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            callbacks=[metrics, interrupt.callback(), *callbacks],
            **extra,
        )
    except ValueError as exc:  # TRL's checks of the model, tokenizer and settings together
        name = algorithm.trainer.rpartition(":")[2]
        raise UsageError(f"TRL's {name} refuses this run: {exc}") from exc
    if continuing:
        keep_sft_reference(trainer.model)
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    if algorithm.online and (config.log_completions or config.print_completions):
        trainer.add_callback(_completions_log(trainer, config, output / COMPLETIONS_FILE))
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
        truncated=0
        if algorithm.online
        else count_truncated(trainer.train_dataset, config.max_length),
        optimizer_backend=_resolved_backend(trainer.optimizer),
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


def _resolved_backend(optimizer: Any) -> str | None:
    """``OnlineMergingAdamW.resolved_backend`` under accelerate's wrapper and DeepSpeed's ZeRO
    optimizer (None: no step)."""
    while optimizer is not None and not hasattr(optimizer, "resolved_backend"):
        optimizer = getattr(optimizer, "optimizer", None)
    return None if optimizer is None else optimizer.resolved_backend


def _metadata(config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers
    import trl

    from omotool import __version__
    from omotool.io.adapters import open_model
    from omotool.io.reader import fingerprint

    def described(path: str | None) -> dict[str, Any] | None:
        if path is None:
            return None
        with open_model(path) as reader:  # an SFT adapter: the fingerprint of its model
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
        "optimizer_backend": result.optimizer_backend,
        "deepspeed": deepspeed_record(config),
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


def _completions_log(trainer: Any, config: TrainConfig, path: Path) -> Any:
    """The callback writing ``--log-completions`` rows a logging step to ``path`` and showing
    ``--print-completions`` of them in a table on stderr."""
    from rich.console import Console

    from omotool.train.progress import completions_table

    console = Console(stderr=True)
    return completions_callback(
        trainer,
        path,
        config.log_completions,
        show=lambda step, rows: console.print(completions_table(step, rows)),
        shown=config.print_completions,
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (the resumed run logs those steps again), and a
    line cut short by a killed run; ``path`` is removed when no line is left."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if (record := _json_line(line)) is not None and record.get("step", 0) <= step
    ]
    if kept:
        write_text_atomic(path, "\n".join(kept))
    else:
        path.unlink()


def _json_line(line: str) -> dict[str, Any] | None:
    """The JSON object on ``line``; None for a blank or unreadable one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
