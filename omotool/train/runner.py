"""``run_training``: one RLHF run on a TRL trainer with the online-merging optimizer.

Thin glue: the data are checked (``train.data``), the task vector found and matched to the
model, the TRL config built from ``TrainConfig``, and TRL's trainer handed an
``OnlineMergingAdamW``. Every logged step goes to ``OUT/metrics.jsonl`` with the optimizer's
merge statistics; the final model lands in ``OUT/`` as a complete model folder.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omotool.errors import InputError, OutputError, UsageError
from omotool.train.algorithms import ALGORITHMS

MERGES = ("none", "dare", "ties")
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Every option of ``omotool train``; recipe keys and command-line names are these."""

    model: str = ""  # the SFT model (policy start and reference)
    dataset: str = ""
    output: str = ""
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
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    precompute_ref: bool = False
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = None
    logging_steps: int = 1
    eval_dataset: str | None = None
    eval_steps: int | None = None
    report_to: str = "none"
    overwrite: bool = False

    def validate(self) -> None:
        for name in ("model", "dataset", "output"):
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
    )
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
    if config.max_prompt_length is not None and "max_prompt_length" in known:
        values["max_prompt_length"] = config.max_prompt_length
    return config_class(**{k: v for k, v in values.items() if k in known})


def _dataset(path: str, kind: str) -> Any:
    from datasets import Dataset

    from omotool.train.data import load_examples

    return Dataset.from_list(load_examples(path, kind))


def prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputError(
                f"{output} exists and is not empty; pass --overwrite to replace it "
                "(or --resume to continue the run in it)."
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train per ``config``; returns the final logged metrics and where the model went."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omotool.optim import OnlineMergingAdamW

    config.validate()
    algorithm = ALGORITHMS.get(config.algo)
    output = Path(config.output)
    train_data = _dataset(config.dataset, algorithm.kind)
    eval_data = _dataset(config.eval_dataset, algorithm.kind) if config.eval_dataset else None
    tau = load_task_vector(config) if config.merge != "none" else None
    prepare_output(output, config.overwrite)

    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    optimizer = OnlineMergingAdamW(
        model.named_parameters(),
        tau,
        method=config.merge,
        reserve_p=config.reserve_p,
        alpha=config.alpha,
        online_step=config.online_step,
        rescale=config.rescale,
        election=config.election,
        seed=config.seed,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    metrics = metrics_callback(output / METRICS_FILE, optimizer)
    trainer = algorithm.trainer_class()(
        model=model,
        args=trl_arguments(config, output),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[metrics],
    )
    trainer.train()
    trainer.save_model(str(output))
    tokenizer.save_pretrained(str(output))
    (output / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return {"output": str(output), "steps": trainer.state.global_step, **metrics.last}


def metrics_callback(path: Path, optimizer: Any) -> Any:
    """A transformers callback writing each log line plus ``optimizer.stats()`` to ``path``."""
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        last: dict[str, Any] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, **logs, **optimizer.stats()}
            record = {
                k: v for k, v in record.items() if not isinstance(v, float) or math.isfinite(v)
            }
            self.last = record
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return MetricsLog()
