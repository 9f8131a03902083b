"""The lm-evaluation-harness bridge on a local task definition with local data (offline)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omotool.errors import InputError, UsageError
from omotool.eval.harness import lm_eval_scores

pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": f"what is {i} + 1 ?", "choices": [str(i + 1), str(i + 3)], "answer": i % 2}
    for i in range(6)
]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness")
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "tiny_arith.yaml").write_text(
        "task: tiny_arith\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    return folder


def direct_accuracy(model_path) -> float:
    """The harness's multiple-choice rule written out: argmax of log p(" " + choice | question)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    correct = 0
    for q in QUESTIONS:
        scores = []
        for choice in q["choices"]:
            context = tokenizer(q["question"], add_special_tokens=False)["input_ids"]
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = context + continuation
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            scores.append(sum(
                float(torch.log_softmax(logits[t - 1], -1)[ids[t]])
                for t in range(len(context), len(ids))
            ))  # fmt: skip
        correct += scores.index(max(scores)) == q["answer"]
    return correct / len(QUESTIONS)


def test_harness_accuracy_equals_the_direct_computation(llama_pair, task_folder) -> None:
    _, sft = llama_pair
    result = lm_eval_scores(str(sft), ["tiny_arith"], str(task_folder), batch_size=4)
    estimate = result.scores["tiny_arith/acc"]
    assert estimate.value == pytest.approx(direct_accuracy(sft)) and estimate.n == 6
    assert 0.0 <= estimate.low <= estimate.value <= estimate.high <= 1.0


def test_harness_through_the_command_line_and_bad_names(cli, llama_pair, task_folder) -> None:
    _, sft = llama_pair
    result = cli(
        "eval", sft, "--task", "lm_eval", "--lm-tasks", "tiny_arith", "--include-path",
        task_folder, "--json",
    )  # fmt: skip
    tasks = json.loads(result.stdout)["models"][0]["tasks"]  # the harness's bars go to stderr
    assert "tiny_arith/acc" in tasks["lm_eval"]["scores"]
    with pytest.raises(InputError, match="no task 'no_such_task'"):
        lm_eval_scores(str(sft), ["no_such_task"], str(task_folder))
    assert "--lm-tasks" in cli("eval", sft, "--task", "lm_eval", expect=2).output


def test_harness_missing_says_how_to_install(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_harness(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_harness)
    with pytest.raises(UsageError, match=r"pip install 'omotool\[lm-eval\]'"):
        lm_eval_scores("model", ["task"])
