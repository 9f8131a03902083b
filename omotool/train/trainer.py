"""Any transformers / TRL trainer with ``OnlineMergingAdamW``, atomic checkpoints and metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omotool.io.formats import fsync_path
from omotool.train.checkpoints import STAGING, rotate_checkpoints


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

    Before each optimizer step the trainer computes the gradients' total norm (to clip and
    log it); it is handed to the optimizer (``note_grad_norm``), whose NaN/inf check then
    reads no gradient.

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
                # DeepSpeed ZeRO steps the optimizer on flat partitions it swaps into each
                # group: without merging the parameters go unnamed; with merging the names
                # build T, and _prepare_for_training attaches the partitions' runs.
                unnamed = self.is_deepspeed_enabled and options.get("method", "dare") == "none"
                entry = (lambda n, p: p) if unnamed else (lambda n, p: (n, p))
                groups = [
                    {"params": [entry(n, p) for n, p in named if n in decay],
                     "weight_decay": self.args.weight_decay},
                    {"params": [entry(n, p) for n, p in named if n not in decay],
                     "weight_decay": 0.0},
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

        def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
            # After deepspeed.initialize (in here) and before a checkpoint is loaded: the
            # optimizer learns which runs of which parameters DeepSpeed's flat partitions hold.
            prepared = super()._prepare_for_training(*args, **kwargs)
            if self.is_deepspeed_enabled and options.get("method", "dare") != "none":
                attach_zero_runs(self.model_wrapped, self.model)
            return prepared

        def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
            # transformers computes the gradients' total norm right before every optimizer
            # step (to clip and log it); handed over, it spares the optimizer its own read
            # of every gradient for NaN/inf (OnlineMergingAdamW.note_grad_norm).
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            if self.is_deepspeed_enabled:  # DeepSpeed has stepped already, on its own norm
                return grad_norm
            optimizer = self.optimizer
            while optimizer is not None and not hasattr(optimizer, "note_grad_norm"):
                optimizer = getattr(optimizer, "optimizer", None)  # accelerate's wrapper
            if optimizer is not None and grad_norm is not None:
                optimizer.note_grad_norm(grad_norm)
            return grad_norm

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
                shutil.rmtree(staging)  # what else the trainer wrote there (TRL: a model card)
                fsync_path(output)
                rotate_checkpoints(output, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

    OnlineMergingTrainer.__name__ = f"OnlineMerging{trainer_class.__name__}"
    return OnlineMergingTrainer


def attach_zero_runs(engine: Any, model: Any) -> None:
    """Hand ``OnlineMergingAdamW`` under the DeepSpeed ``engine`` the runs of its ZeRO flat
    partitions (``optim.zero_runs``); nothing to do when DeepSpeed steps the optimizer on the
    parameters themselves (no ZeRO, no bf16 partitions)."""
    from omotool.optim.zero_runs import zero_runs

    inner = getattr(engine, "optimizer", None)  # DeepSpeed's ZeRO optimizer, or ours
    optimizer = inner
    while optimizer is not None and not hasattr(optimizer, "attach_zero_runs"):
        optimizer = getattr(optimizer, "optimizer", None)
    if optimizer is None or optimizer is inner:
        return
    optimizer.attach_zero_runs(zero_runs(engine, model.named_parameters()))


# TRL's share of the step's prompt groups whose completions all got the same reward (their
# advantages are 0: the step learns nothing from them).
ZERO_SPREAD = "frac_reward_zero_std"
ZERO_SPREAD_KEY = "no_reward_spread_steps"  # in the summary: logged steps where it was 1
ZERO_SPREAD_WARN_AFTER = 5  # logged steps at 1 from the start before the run is warned about


def json_record(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``record`` with each non-finite float (NaN, ±inf: JSON has none) replaced by None, and
    the names of those replaced."""
    replaced = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    return {k: None if k in replaced else v for k, v in record.items()}, replaced


def metrics_callback(path: Path) -> Any:
    """A transformers callback writing each log line plus the optimizer's ``stats()`` (when it
    has them) to ``path``, one JSON object a line.

    A non-finite value is written as null, with a warning the first time each metric is. A run
    whose every group of completions has had equal rewards (``frac_reward_zero_std`` 1) for its
    first ``ZERO_SPREAD_WARN_AFTER`` logged steps, or for all of a shorter run, is warned about
    once: it learns nothing. ``last`` holds the latest value of each metric (the summary's),
    and ``last[ZERO_SPREAD_KEY]`` the number of logged steps at 1 (when any).
    """
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        def __init__(self) -> None:
            self.last: dict[str, Any] = {}
            self.non_finite: set[str] = set()  # metrics already warned about
            self.logged = 0  # logged steps with a ZERO_SPREAD value
            self.flat = 0  # of which at 1
            self.warned_flat = False

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not logs or not state.is_world_process_zero:
                return
            optimizer = kwargs.get("optimizer")
            while optimizer is not None and not hasattr(optimizer, "stats"):
                optimizer = getattr(optimizer, "optimizer", None)  # accelerate's wrapper
            stats = optimizer.stats() if optimizer is not None else {}
            record, replaced = json_record({"step": state.global_step, **logs, **stats})
            for name in replaced:
                if name not in self.non_finite:
                    self.non_finite.add(name)
                    warnings.warn(
                        f"metric {name!r} is {logs.get(name, stats.get(name))} at step "
                        f"{state.global_step}; metrics.jsonl holds null where a value is not "
                        "finite.",
                        UserWarning,
                        stacklevel=2,
                    )
            self._count_flat(record.get(ZERO_SPREAD))
            self.last = {**self.last, **record}  # the end-of-run summary keeps the last loss
            if self.flat:
                self.last[ZERO_SPREAD_KEY] = self.flat
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.logged and self.flat == self.logged:
                self._warn_flat()

        def _count_flat(self, fraction: Any) -> None:
            if fraction is None:
                return
            self.logged += 1
            self.flat += fraction == 1
            if self.flat == self.logged == ZERO_SPREAD_WARN_AFTER:
                self._warn_flat()

        def _warn_flat(self) -> None:
            if self.warned_flat:
                return
            self.warned_flat = True
            warnings.warn(
                f"NO LEARNING SIGNAL: in each of the first {self.logged} logged steps, every "
                f"prompt's completions got equal rewards ({ZERO_SPREAD} = 1), so every "
                "advantage is 0 and the policy does not change. Make the rewards tell the "
                "completions apart (a finer reward, more --num-generations, a higher "
                "--temperature).",
                UserWarning,
                stacklevel=2,
            )

    return MetricsLog()


def completion_rows(logs: Mapping[str, Any], step: int, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` completions of TRL's GRPO/RLOO ``_logs`` (the latest batch of
    completions: ``prompt``, ``completion``, ``rewards`` {name: values}, ``advantages``), one
    dict each: ``step``, ``prompt``, ``completion``, ``rewards`` {name: value}, ``advantage``.
    A value that is None or not finite (TRL's NaN for a reward that did not apply) is None."""

    def number(values: list[Any], i: int) -> float | None:
        value = values[i] if i < len(values) else None
        return None if value is None or not math.isfinite(value) else float(value)

    prompts, completions = list(logs["prompt"])[:limit], list(logs["completion"])[:limit]
    rewards = {name: list(values)[:limit] for name, values in logs["rewards"].items()}
    advantages = list(logs["advantages"])[:limit]
    return [
        {
            "step": step,
            "prompt": prompt,
            "completion": completion,
            "rewards": {name: number(values, i) for name, values in rewards.items()},
            "advantage": number(advantages, i),
        }
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=False))
    ]


def completions_callback(
    trainer: Any, path: Path | None, logged: int, show: Any = None, shown: int = 0
) -> Any:
    """A transformers callback appending, at each logging step, the first ``logged``
    completions of ``trainer``'s latest batch (TRL's GRPO/RLOO ``_logs``) to ``path`` as
    ``completion_rows``, one JSON object a line, written and flushed at once (a killed run
    leaves whole lines), and handing the first ``shown`` to ``show(step, rows)``.

    A batch is written once: a logging step that sampled nothing new (``--num-iterations``
    above 1, the end-of-run log) writes nothing, nor does evaluation.
    """
    from transformers import TrainerCallback

    class CompletionsLog(TrainerCallback):
        def __init__(self) -> None:
            self.seen: Any = None  # the first advantage of the last batch handled

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            batch = getattr(trainer, "_logs", None)
            if not logs or not state.is_world_process_zero or not batch or not batch["advantages"]:
                return
            # Each batch TRL samples brings new float objects (tensor.tolist()), never cached,
            # and the one held here cannot be reused: the same object, the same batch.
            first = batch["advantages"][0]
            if first is self.seen:
                return
            self.seen = first
            if any(key.startswith("eval_") for key in logs):
                return  # evaluation's completions, which the next sampled batch replaces
            rows = completion_rows(batch, state.global_step, max(logged, shown))
            if path is not None and logged:
                text = "".join(json.dumps(row, default=str) + "\n" for row in rows[:logged])
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
            if show is not None and shown:
                show(state.global_step, rows[:shown])

    return CompletionsLog()
