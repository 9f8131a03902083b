"""The ``reward_model`` task: answers generated for ``prompt`` rows, scored by a local reward
model (``eval/reward_model.py``); option ``reward_model`` (a classifier folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omotool.errors import UsageError
from omotool.eval.tasks.base import TASKS, Answers, EvalTask, TaskRun, TaskSpec, resolve


def _check(options: dict[str, Any], folder: Path | None) -> None:
    if folder is None:  # the command line
        if not options.get("reward_model"):
            raise UsageError("--task reward_model needs --reward-model (a classifier folder).")
        return
    if not isinstance(options.get("reward_model"), str):
        raise UsageError("the reward_model task needs 'reward_model' (a folder).")
    options["reward_model"] = resolve(options["reward_model"], folder)


def _run(run: TaskRun) -> tuple[Any, Answers]:
    from omotool.eval import generation, reward_model

    model, tokenizer = run.model()
    batch, tick = run.batch_size, run.progress
    prompts = [e["prompt"] for e in run.spec.examples]
    answers = generation.generate_answers(model, tokenizer, prompts, run.settings, batch, tick)
    rm, rm_tokenizer = run.models.reward_model(run.spec.options["reward_model"])
    rewards = reward_model.rewards(rm, rm_tokenizer, prompts, answers, batch, tick)
    baseline = None
    if run.baseline_answers is not None:
        baseline = reward_model.rewards(rm, rm_tokenizer, prompts, run.baseline_answers, batch)
    return reward_model.reward_model_scores(rewards, baseline), answers


def _shared(spec: TaskSpec, models: Any, reference: str | None) -> set[str]:
    return {models.reward_model_key(spec.options["reward_model"])}


TASKS.register("reward_model", help="Generated answers scored by a reward model; win rate.")(
    EvalTask(
        category="reward",
        headline="win_rate",
        run=_run,
        fields=("prompt",),
        text_fields=("prompt",),
        options=("reward_model",),
        check=_check,
        generates=True,
        shared=_shared,
    )
)
