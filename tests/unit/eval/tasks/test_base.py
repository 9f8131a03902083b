"""The task registry: a task registered in one place runs through suites, runner and CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from omotool.errors import InputError, UsageError
from omotool.eval.preference import TaskScores
from omotool.eval.runner import run_suite
from omotool.eval.stats import proportion_interval
from omotool.eval.suite import load_suite, single_task_suite
from omotool.eval.tasks import TASKS, EvalTask, TaskRun, headline_name, readers


def _fits(run: TaskRun) -> tuple[TaskScores, None]:
    """The fraction of prompts of at most ``max_tokens`` tokens (the model's tokenizer)."""
    _, tokenizer = run.model()
    limit = run.spec.options.get("max_tokens", 8)
    lengths = [len(tokenizer(e["prompt"])["input_ids"]) for e in run.spec.examples]
    if run.progress is not None:
        run.progress(len(lengths))
    return TaskScores(scores={"fits": proportion_interval(sum(n <= limit for n in lengths),
                                                          len(lengths))}), None  # fmt: skip


def _check_fits(options: dict[str, Any], folder: Path | None) -> None:
    if not isinstance(options.get("max_tokens", 8), int):
        raise UsageError(f"max_tokens must be a whole number, not {options['max_tokens']!r}.")


@pytest.fixture
def fits_task(monkeypatch) -> str:
    """A test-only task ``fits``, registered for one test (the registry is restored after)."""
    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))
    monkeypatch.setattr(TASKS, "_help", dict(TASKS._help))
    TASKS.register("fits", help="Prompts that fit in max_tokens tokens.")(
        EvalTask(
            category="capability",
            headline="fits",
            run=_fits,
            fields=("prompt",),
            text_fields=("prompt",),
            options=("max_tokens",),
            check=_check_fits,
        )
    )
    return "fits"


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "one two"}, {"prompt": " ".join(["word"] * 40)}, {"prompt": "three"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _suite(tmp_path: Path, *tasks: dict[str, Any]) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"tasks": list(tasks)}))
    return path


def test_a_task_registered_in_one_place_runs_through_the_suite(
    fits_task, prompts, tmp_path, llama_pair, cli
) -> None:
    _, sft = llama_pair
    perplexity = tmp_path / "prose.txt"
    perplexity.write_text("The cat sat on the mat.\n\nA second small document here.\n")
    suite = load_suite(_suite(
        tmp_path,
        {"name": "short", "task": "fits", "data": prompts.name, "category": "capability",
         "max_tokens": 10},
        {"name": "prose", "task": "perplexity", "data": perplexity.name, "category": "capability"},
    ))  # fmt: skip
    assert len(suite.tasks[0].examples) == 3 and suite.tasks[0].options == {"max_tokens": 10}
    seen = []
    report = run_suite([str(sft)], suite, progress=lambda *args: seen.append(args))
    task = report["models"][0]["tasks"]["short"]
    assert task["task"] == "fits" and task["failed"] is None and task["answers"] is None
    assert task["scores"]["fits"]["value"] == pytest.approx(2 / 3)
    assert report["models"][0]["averages"]["capability"] == pytest.approx(2 / 3)  # its headline
    assert (f"{sft.name}: short", 3, 3) in seen
    assert report["tasks"][0]["options"] == {"max_tokens": 10}
    assert "generation" not in report["tasks"][0]  # it reads no generation setting
    single = single_task_suite("fits", prompts)
    assert single.tasks[0].category == "capability" and len(single.tasks[0].examples) == 3
    command = json.loads(cli("eval", sft, "--task", "fits", "--data", prompts, "--json").output)
    assert command["models"][0]["tasks"]["fits"]["scores"]["fits"] == task["scores"]["fits"]
    typo = cli("eval", sft, "--task", "fist", "--data", prompts, expect=2).output
    assert "Did you mean 'fits'?" in " ".join(typo.split())


def test_the_registered_task_is_checked_as_declared(fits_task, prompts, tmp_path) -> None:
    def entry(**keys: Any) -> Path:
        return _suite(tmp_path, {"task": "fits", "data": prompts.name,
                                 "category": "capability", **keys})  # fmt: skip

    with pytest.raises(InputError, match=r"task 0: max_tokens must be a whole number, not 'x'"):
        load_suite(entry(max_tokens="x"))
    with pytest.raises(InputError, match=r"unknown key\(s\) beta for a fits task \(valid: .*"):
        load_suite(entry(beta=0.1))
    with pytest.raises(InputError, match="until has no effect on a fits task"):
        load_suite(entry(until="\n"))
    with pytest.raises(UsageError, match="--chat/--no-chat has no effect on --task fits"):
        single_task_suite("fits", prompts, generation={"chat": True})
    with pytest.raises(UsageError, match="--task fits needs --data FILE"):
        single_task_suite("fits", None)
    empty = tmp_path / "missing.jsonl"
    empty.write_text('{"text": "no prompt"}\n')
    with pytest.raises(InputError, match=r"missing.jsonl:1: missing field 'prompt' \(the fits"):
        load_suite(entry(data=empty.name))
    with pytest.raises(UsageError, match=r"unknown task 'fist'; valid tasks: .* Did you mean"):
        load_suite(entry(task="fist"))
    assert "fits" in TASKS and headline_name("fits") == "fits"
    assert readers(["chat"]) == ["generate", "reward_model", "choice"]  # not fits


def test_the_built_in_tasks_and_their_declarations() -> None:
    assert list(TASKS)[:6] == [
        "preference", "reward_model", "perplexity", "generate", "choice", "lm_eval"
    ]  # fmt: skip
    assert "fits" not in TASKS  # the test-only task is gone with its test
    assert [headline_name(name) for name in ("preference", "reward_model", "perplexity")] == [
        "reward_accuracy", "win_rate", None
    ]  # fmt: skip
    assert readers(["until"]) == ["generate", "reward_model"]
    assert [n for n in TASKS if TASKS.get(n).needs_reference] == ["preference"]
    assert [n for n in TASKS if not TASKS.get(n).reads_data] == ["lm_eval"]
    with pytest.raises(UsageError, match="Unknown task 'choise'.*Did you mean 'choice'"):
        TASKS.get("choise")
