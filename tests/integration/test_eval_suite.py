"""A whole suite on tiny models: every task, averages, differences, report.json, bad suites."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import LlamaForSequenceClassification

from omotool.errors import InputError, UsageError
from omotool.eval.runner import report_markdown, run_suite, write_report
from omotool.eval.suite import load_suite
from omotool.tiny_models import build_tokenizer, model_config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def suite_folder(tmp_path_factory, llama_pair):
    folder = tmp_path_factory.mktemp("suite")
    base, sft = llama_pair
    write_jsonl(folder / "prefs.jsonl", [
        {"prompt": f"what is {i} + 1 ?", "chosen": f"{i + 1}", "rejected": f"{i + 2} !"}
        for i in range(6)
    ])  # fmt: skip
    write_jsonl(
        folder / "sums.jsonl", [{"prompt": f"{i} + 1 =", "reference": f"{i + 1}"} for i in range(4)]
    )
    write_jsonl(folder / "facts.jsonl", [
        {"question": f"what is {i} + 1 ?", "choices": [str(i + 1), str(i + 3)], "answer": 0}
        for i in range(5)
    ])  # fmt: skip
    (folder / "prose.txt").write_text("the user asks a question\n\nthe assistant answers it\n")
    config = model_config("llama")
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder / "rm"))
    build_tokenizer(folder / "rm")
    tasks = [
        dict(name="prefs", task="preference", data="prefs.jsonl", category="reward", beta=0.1),
        dict(name="helpful", task="reward_model", data="sums.jsonl", category="reward",
             reward_model="rm"),
        dict(name="sums", task="generate", data="sums.jsonl", category="capability",
             extract="last_number"),
        dict(name="facts", task="choice", data="facts.jsonl", category="capability"),
        dict(name="prose", task="perplexity", data="prose.txt", category="capability"),
    ]  # fmt: skip
    suite = dict(baseline=str(base), reference=str(base), batch_size=4, tasks=tasks,
                 generation=dict(max_new_tokens=4))  # fmt: skip
    (folder / "suite.yaml").write_text(yaml.safe_dump(suite))
    return folder


def test_suite_report_has_every_number(suite_folder, llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    suite = load_suite(suite_folder / "suite.yaml")
    report = run_suite([str(sft)], suite)
    paths = [m["path"] for m in report["models"]]
    assert paths == [str(base), str(sft)]  # the baseline first, then the models
    sft_report, base_report = report["models"][1], report["models"][0]
    assert set(sft_report["tasks"]) == {"prefs", "helpful", "sums", "facts", "prose"}
    assert sft_report["tasks"]["prose"]["scores"]["perplexity"]["value"] > 1
    assert sft_report["tasks"]["helpful"]["scores"]["win_rate"]["n"] == 4
    # the baseline against itself: zero preference margin, a win rate of one half
    assert base_report["tasks"]["prefs"]["scores"]["reward_margin"]["value"] == 0.0
    assert "win_rate" not in base_report["tasks"]["helpful"]["scores"]
    capability = [sft_report["tasks"][n]["scores"]["accuracy"]["value"] for n in ("sums", "facts")]
    assert sft_report["averages"]["capability"] == pytest.approx(sum(capability) / 2)
    reward = [sft_report["tasks"]["prefs"]["scores"]["reward_accuracy"]["value"],
              sft_report["tasks"]["helpful"]["scores"]["win_rate"]["value"]]  # fmt: skip
    assert sft_report["averages"]["overall"] == pytest.approx(sum(capability + reward) / 4)
    assert [t["name"] for t in report["tasks"]] == ["prefs", "helpful", "sums", "facts", "prose"]
    assert report["tasks"][0]["examples"] == 6 and report["generation"]["max_new_tokens"] == 4
    assert sft_report["differences"]["facts"] == pytest.approx(
        sft_report["tasks"]["facts"]["scores"]["accuracy"]["value"]
        - base_report["tasks"]["facts"]["scores"]["accuracy"]["value"]
    )
    assert sft_report["fingerprint"] and report["versions"]["torch"]
    written = json.loads(write_report(report, tmp_path / "report").read_text())
    assert written == json.loads(json.dumps(report))


def test_bad_suites_are_named(suite_folder, tmp_path) -> None:
    def suite(**task):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"tasks": [task]}))
        return path

    facts, prefs = str(suite_folder / "facts.jsonl"), str(suite_folder / "prefs.jsonl")
    with pytest.raises(UsageError, match="unknown task 'choise'; valid tasks: .* 'choice'"):
        load_suite(suite(task="choise", data=facts, category="capability"))
    with pytest.raises(InputError, match="category must be one of reward, capability"):
        load_suite(suite(task="choice", data=facts, category="tax"))
    with pytest.raises(InputError, match="needs 'reference'"):
        load_suite(suite(task="preference", data=prefs, category="reward"))
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"question": "q", "choices": ["a", "b"], "answer": 0},
                      {"question": "q", "choices": ["a"], "answer": 0}])  # fmt: skip
    with pytest.raises(InputError, match=r"bad.jsonl:2: 'choices' must be a list of at least 2"):
        load_suite(suite(task="choice", data=str(bad), category="capability"))
    empty = tmp_path / "empty.yaml"
    empty.write_text("baseline: x\n")
    with pytest.raises(InputError, match="needs a non-empty 'tasks' list"):
        load_suite(empty)


# -- the command line ------------------------------------------------------------------------
def test_eval_command_with_a_suite_writes_the_reports(cli, suite_folder, llama_pair, tmp_path):
    _, sft = llama_pair
    out = tmp_path / "report"
    from omotool.cli import app

    args = ["eval", str(sft), "--suite", str(suite_folder / "suite.yaml"), "-o", str(out)]
    result = cli.runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "reward average" in result.output and "capability average" in result.output
    assert "overall average" in result.output
    assert "Δ vs baseline" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [m["path"] for m in report["models"]][1] == str(sft)
    markdown = (out / "report.md").read_text()
    assert "| facts | capability | accuracy" in markdown and "**reward average**" in markdown


def test_eval_command_single_task(cli, suite_folder, llama_pair) -> None:
    base, sft = llama_pair
    result = cli(
        "eval", sft, "--task", "preference", "--data", suite_folder / "prefs.jsonl",
        "--ref-model", base, "--json",
    )  # fmt: skip
    report = json.loads(result.output)
    scores = report["models"][0]["tasks"]["preference"]["scores"]
    assert set(scores) == {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"}


def test_eval_command_bad_input(cli, suite_folder, llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    facts = suite_folder / "facts.jsonl"
    assert "at least one model" in cli("eval", "--task", "choice", "--data", facts, expect=2).output
    both = cli("eval", sft, "--suite", suite_folder / "suite.yaml", "--task", "choice", expect=2)
    assert "not both" in both.output
    unknown = cli("eval", sft, "--task", "mmlu", "--data", facts, expect=2).output
    assert "valid tasks: preference, reward_model, perplexity, generate, choice" in " ".join(
        unknown.split()
    )
    not_rm = cli("eval", sft, "--task", "reward_model", "--data", suite_folder / "sums.jsonl",
                 "--reward-model", sft, expect=1).output  # fmt: skip
    assert "not a sequence classifier" in not_rm
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": \n')
    assert (
        "bad.jsonl:2: not valid JSON"
        in cli("eval", sft, "--task", "choice", "--data", bad, expect=1).output
    )
    missing = cli(
        "eval", tmp_path / "nothing", "--task", "choice", "--data", facts, expect=1
    ).output
    assert "does not load" in missing and "Traceback" not in missing


def test_plot_has_a_point_per_model_and_a_sweep_line(cli, suite_folder, llama_pair, tmp_path):
    import shutil

    from omotool.eval.plot import plot_tradeoff

    base, sft = llama_pair
    sweep = tmp_path / "sweep"
    for alpha in ("0.3", "0.7"):
        shutil.copytree(sft, sweep / f"alpha-{alpha}")
    models = [str(sft), str(sweep / "alpha-0.3"), str(sweep / "alpha-0.7")]
    report = run_suite(models, load_suite(suite_folder / "suite.yaml"))
    assert plot_tradeoff(report, tmp_path / "t.png") == 4  # the baseline and three models
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cli"
    cli("eval", sft, "--suite", suite_folder / "suite.yaml", "-o", out, "--plot")
    assert (out / "tradeoff.png").stat().st_size > 1000
    assert (
        "give -o OUT"
        in cli("eval", sft, "--suite", suite_folder / "suite.yaml", "--plot", expect=2).output
    )


def test_plot_without_matplotlib_says_how_to_install(monkeypatch) -> None:
    import builtins

    from omotool.eval.plot import require_matplotlib

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError, match=r"pip install 'omotool\[plot\]'"):
        require_matplotlib()


def test_progress_follows_every_task_to_its_end(suite_folder, llama_pair) -> None:
    _, sft = llama_pair
    calls = []
    run_suite(
        [str(sft)], load_suite(suite_folder / "suite.yaml"), progress=lambda *c: calls.append(c)
    )
    finished = {what for what, done, total in calls if done == total}
    for task in ("prefs", "helpful", "sums", "facts", "prose"):
        assert f"sft: {task}" in finished and f"base: {task}" in finished
    assert all(0 < done <= total for _, done, total in calls)


# -- several models: memory held and reference log-probabilities -----------------------------
@pytest.fixture(scope="module")
def three_models(suite_folder, llama_pair, tmp_path_factory):
    """Three policies (sft perturbed); the second's tokenizer ends completions differently, and
    a suite of two preference tasks and a reward-model task (reference base, baseline sft)."""
    from transformers import AutoModelForCausalLM

    from omotool.tiny_models import perturbed, save_model

    base, sft = llama_pair
    folder = tmp_path_factory.mktemp("three")
    paths = []
    for seed, name in ((2, "one"), (3, "other-tokenizer"), (4, "three")):
        model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
        paths.append(str(save_model(perturbed(model, 0.05, seed), folder / name)))
    config = folder / "other-tokenizer" / "tokenizer_config.json"
    config.write_text(
        config.read_text().replace('"eos_token": "<|im_end|>"', '"eos_token": "</s>"')
    )
    few = folder / "few.jsonl"
    few.write_text("".join((suite_folder / "prefs.jsonl").read_text().splitlines(True)[:3]))
    tasks = [
        dict(name="prefs", task="preference", data=str(suite_folder / "prefs.jsonl"),
             category="reward", beta=0.1),
        dict(name="few", task="preference", data=str(few), category="reward", beta=0.5),
        dict(name="helpful", task="reward_model", data=str(suite_folder / "sums.jsonl"),
             category="reward", reward_model=str(suite_folder / "rm")),
    ]  # fmt: skip
    suite = dict(baseline=str(sft), reference=str(base), batch_size=4, tasks=tasks,
                 generation=dict(max_new_tokens=3))  # fmt: skip
    (folder / "suite.yaml").write_text(yaml.safe_dump(suite))
    return paths, folder / "suite.yaml"


def test_only_the_model_under_evaluation_and_shared_ones_are_held(
    three_models, llama_pair, monkeypatch
) -> None:
    import gc
    import weakref
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from omotool.eval import reward_model, runner

    base, sft = llama_pair
    paths, suite_path = three_models
    load, load_rm = AutoModelForCausalLM.from_pretrained, reward_model.load_reward_model
    created, rm_loads, seen = [], [], []

    def counting_load(path, *args, **kwargs):
        model = load(path, *args, **kwargs)
        created.append((str(Path(path).resolve()), weakref.ref(model)))
        return model

    def counting_load_rm(path, *args):
        rm_loads.append(path)
        return load_rm(path, *args)

    real_run_task = runner.run_task

    def watched_run_task(spec, model_path, suite, models, *args):
        gc.collect()
        live = [path for path, ref in created if ref() is not None]
        seen.append((str(Path(model_path).resolve()), live, len(models.loaded)))
        return real_run_task(spec, model_path, suite, models, *args)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_load)
    monkeypatch.setattr(reward_model, "load_reward_model", counting_load_rm)
    monkeypatch.setattr(runner, "run_task", watched_run_task)
    # the reference spelt differently and evaluated too: the same object, loaded once
    report = run_suite([*paths, str(base) + "/"], load_suite(suite_path))
    assert [m["path"] for m in report["models"]] == [str(sft), *paths, str(base) + "/"]
    reference = str(base.resolve())
    assert len(seen) == 5 * 3
    for current, live, held in seen:
        assert len(live) == len(set(live)) <= 2, live  # no model twice, nothing left over
        assert set(live) <= {current, reference}, (current, live)
        assert held <= 3  # the model, the reference, the reward model
    assert [path for path, _ in created].count(reference) == 1
    assert len(rm_loads) == 1
    assert len(created) == 5  # sft, three models, the reference (once)


def test_the_reference_is_scored_once_per_task_and_tokenizer(
    three_models, llama_pair, monkeypatch
) -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omotool.eval import preference, scoring

    base, sft = llama_pair
    paths, suite_path = three_models
    suite = load_suite(suite_path)
    separately = {p: run_suite([p], suite)["models"][1] for p in paths}
    real_token_logprobs, reference_calls = scoring.token_logprobs, []

    def counting(model, *args, **kwargs):
        if Path(model.name_or_path).resolve() == base.resolve():
            reference_calls.append(len(args[1]))
        return real_token_logprobs(model, *args, **kwargs)

    monkeypatch.setattr(scoring, "token_logprobs", counting)  # what completion_logprobs runs
    monkeypatch.setattr(preference, "token_logprobs", counting, raising=False)
    together = run_suite(paths, suite)
    # chosen and rejected of 2 tasks, for the 2 tokenizers (sft's, other-tokenizer's) only
    assert sorted(reference_calls) == [3, 3, 3, 3, 6, 6, 6, 6]
    monkeypatch.undo()
    for result in together["models"][1:]:
        assert result == separately[result["path"]]
    reference = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    for result in together["models"]:  # as computed before the reference was reused
        policy = AutoModelForCausalLM.from_pretrained(result["path"], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(result["path"])
        for spec in suite.tasks[:2]:
            beta = spec.options["beta"]
            direct = preference.preference_scores(
                policy, reference, tokenizer, spec.examples, beta, suite.batch_size
            )
            scores = {k: v.as_dict() for k, v in direct.scores.items()}
            assert result["tasks"][spec.name]["scores"] == scores
    other = together["models"][2]["tasks"]["prefs"]["scores"]["logps_chosen"]["value"]
    assert other != together["models"][1]["tasks"]["prefs"]["scores"]["logps_chosen"]["value"]


# -- generation settings: stop sequences and the chat template -------------------------------
def first_stop(answer: str) -> tuple[str, str]:
    """A printable character of ``answer`` after its first, not seen before it; and the text
    before it (the tiny model writes on past it, as a base model writes on past its answer)."""
    for at in range(1, len(answer)):
        char = answer[at]
        if char.isascii() and char.isprintable() and char not in " \\" + answer[:at]:
            return char, answer[:at]
    raise AssertionError(f"no stop candidate in {answer!r}")


def test_until_per_task_and_suite_wide_is_used_and_reported(suite_folder, llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omotool.eval.generation import GenerationSettings, generate_answers

    _, sft = llama_pair
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    prompts = ["what is 1 + 2 ?", "2 + 2"]
    whole = generate_answers(model, tokenizer, prompts, GenerationSettings(8, chat=False))
    cut = [first_stop(a) for a in whole]
    write_jsonl(tmp_path / "base.jsonl", [
        {"prompt": p, "reference": before} for p, (_, before) in zip(prompts, cut, strict=True)
    ])  # fmt: skip
    tasks = [
        dict(name="plain", task="generate", data="base.jsonl", category="capability"),
        dict(name="stopped", task="generate", data="base.jsonl", category="capability",
             until=[stop for stop, _ in cut]),
        dict(name="facts", task="choice", data=str(suite_folder / "facts.jsonl"),
             category="capability", chat=True),
    ]  # fmt: skip
    suite = dict(generation=dict(max_new_tokens=8, chat=False, until="never written"), tasks=tasks)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    report = run_suite([str(sft)], load_suite(tmp_path / "suite.yaml"))
    result = report["models"][0]["tasks"]
    assert result["plain"]["answers"] == whole  # no stop written: whole answers, all wrong
    assert result["plain"]["scores"]["accuracy"]["value"] == 0.0
    assert result["stopped"]["answers"] == [before for _, before in cut]
    assert result["stopped"]["scores"]["accuracy"]["value"] == 1.0
    assert report["generation"]["until"] == ["never written"]
    described = {t["name"]: t.get("generation") for t in report["tasks"]}
    assert described["plain"]["until"] == ["never written"] and not described["plain"]["chat"]
    assert described["stopped"]["until"] == [stop for stop, _ in cut]
    assert described["facts"] == {"chat": True}  # a choice task: only the template matters


def test_bad_generation_settings_are_named(suite_folder, tmp_path) -> None:
    sums, facts = str(suite_folder / "sums.jsonl"), str(suite_folder / "facts.jsonl")
    prefs = str(suite_folder / "prefs.jsonl")

    def suite(task, **top):
        path = tmp_path / f"s{len(list(tmp_path.glob('s*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump({"tasks": [task], **top}))
        return path

    generate = dict(task="generate", data=sums, category="capability")
    cases = [
        (suite({**generate, "until": ["\n", ""]}), r"task 0: until: a stop sequence cannot be"),
        (suite(generate, generation={"until": ""}), r"generation: until: a stop sequence cannot"),
        (suite(generate, generation={"max_tokens": 5}), r"unknown generation key\(s\) max_tokens"),
        (suite({**generate, "max_new_tokens": 0}), "task 0: max_new_tokens must be at least 1"),
        (suite(dict(task="choice", data=facts, category="capability", until="\n")),
         "until has no effect on a choice task"),
        (suite({**generate, "extract": "regex", "pattern": "(("}), "is not a regular expression"),
        (suite({**generate, "extract": "regex"}), "extract 'regex' needs a pattern"),
        (suite({**generate, "extract": "fuzzy"}), "unknown extract 'fuzzy'"),
        (suite(generate, batch_size=0), "batch_size must be a whole number >= 1"),
        (suite(dict(task="preference", data=prefs, category="reward", beta="big"),
               reference="x"), "beta must be a number > 0"),
        (suite({**generate, "data": 3}), "'data' must be a file path"),
    ]  # fmt: skip
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            load_suite(path)
    numbers = tmp_path / "numbers.jsonl"
    write_jsonl(numbers, [{"prompt": "1 + 1", "reference": 2}, {"prompt": 3, "reference": "3"}])
    with pytest.raises(InputError, match=r"numbers.jsonl:2: 'prompt' must be text"):
        load_suite(suite({**generate, "data": str(numbers)}))
    write_jsonl(numbers, [{"prompt": "1 + 1", "reference": 2}])
    assert load_suite(suite({**generate, "data": str(numbers)})).tasks[0].examples == [
        {"prompt": "1 + 1", "reference": "2"}  # a number as reference is read as its text
    ]


def test_eval_command_until_and_no_chat(cli, llama_pair, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omotool.eval.generation import GenerationSettings, generate_answers

    _, sft = llama_pair
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    prompts = ["what is 1 + 2 ?", "2 + 2"]
    raw = generate_answers(model, tokenizer, prompts, GenerationSettings(8, chat=False))
    templated = generate_answers(model, tokenizer, prompts, GenerationSettings(8))
    assert raw != templated and tokenizer.chat_template
    cut = [first_stop(a) for a in raw]
    data = tmp_path / "base.jsonl"
    write_jsonl(data, [
        {"prompt": p, "reference": before} for p, (_, before) in zip(prompts, cut, strict=True)
    ])  # fmt: skip
    stops = [f"--until={stop}" for stop, _ in cut]

    def run(*args):
        # max_new_tokens is the default 64: the stops end generation well before it
        report = json.loads(cli("eval", sft, "--task", "generate", "--data", data, "--json",
                                *args).output)  # fmt: skip
        return report["generation"], report["models"][0]["tasks"]["generate"]

    settings, task = run("--no-chat", *stops, "--until", r"\n")  # a shell's backslash-n
    assert settings["chat"] is False and settings["until"] == [s for s, _ in cut] + ["\n"]
    assert task["answers"] == [before for _, before in cut]
    assert task["scores"]["accuracy"]["value"] == 1.0
    settings, task = run("--no-chat")  # the same model without stops: the tail makes it wrong
    assert settings["until"] == [] and task["scores"]["accuracy"]["value"] == 0.0
    assert all(a.startswith(before) for a, (_, before) in zip(task["answers"], cut, strict=True))
    plain = task["answers"]
    settings, task = run()  # the default: the model's chat template, a different prompt
    assert settings["chat"] is None and task["answers"] != plain


# -- device and dtype --------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")


def scores_of(report):
    """Every model's task scores and failures (what the device and dtype may change)."""
    return [
        {name: (task["failed"], task["scores"]) for name, task in model["tasks"].items()}
        for model in report["models"]
    ]


def close_scores(report, other, logps=0.2, perplexity=0.05):
    """Every task of ``report`` scored as in ``other``: preference log-probabilities within
    ``logps`` (nats, summed over a completion), perplexity within a relative ``perplexity``."""
    for mine, theirs in zip(report["models"], other["models"], strict=True):
        for name, task in mine["tasks"].items():
            assert not task["failed"], (name, task["failed"])
            expected = theirs["tasks"][name]["scores"]
            assert set(task["scores"]) == set(expected)
            if name == "prefs":
                for key in ("logps_chosen", "logps_rejected"):
                    value = task["scores"][key]["value"]
                    assert value == pytest.approx(expected[key]["value"], abs=logps), key
            if name == "prose":
                value = task["scores"]["perplexity"]["value"]
                assert value == pytest.approx(expected["perplexity"]["value"], rel=perplexity)


@without_cuda
def test_the_default_is_the_cpu_in_float32_with_the_same_scores(suite_folder, llama_pair):
    _, sft = llama_pair
    suite = load_suite(suite_folder / "suite.yaml")
    default = run_suite([str(sft)], suite)
    assert (default["device"], default["dtype"]) == ("cpu", "float32")
    assert "device_name" not in default
    explicit = run_suite([str(sft)], suite, device="cpu", dtype="float32")
    assert scores_of(explicit) == scores_of(default)  # bit for bit
    assert "Device: `cpu`, weights in `float32`." in report_markdown(default)


def test_bfloat16_on_the_cpu_loads_bf16_models_and_still_scores(suite_folder, llama_pair):
    from omotool.eval.device import resolve_placement
    from omotool.eval.reward_model import load_reward_model
    from omotool.eval.runner import _Models

    _, sft = llama_pair
    placement = resolve_placement("cpu", "bfloat16")
    model, _ = _Models(placement).get(str(sft))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device == torch.device("cpu") and not model.training
    rm, _ = load_reward_model(str(suite_folder / "rm"), placement)
    assert {p.dtype for p in rm.parameters()} == {torch.bfloat16} and not rm.training
    suite = load_suite(suite_folder / "suite.yaml")
    bf16 = run_suite([str(sft)], suite, device="cpu", dtype="bfloat16")
    assert (bf16["device"], bf16["dtype"]) == ("cpu", "bfloat16")
    close_scores(bf16, run_suite([str(sft)], suite, device="cpu", dtype="float32"))


def test_a_suite_sets_device_and_dtype_and_the_options_override_it(suite_folder, llama_pair):
    from omotool.eval.runner import suite_placement

    _, sft = llama_pair
    raw = yaml.safe_load((suite_folder / "suite.yaml").read_text())
    raw["tasks"] = [t for t in raw["tasks"] if t["name"] == "prose"]
    path = suite_folder / "placed.yaml"
    path.write_text(yaml.safe_dump({**raw, "device": "cpu", "dtype": "bfloat16"}))
    suite = load_suite(path)
    assert (suite.device, suite.dtype) == ("cpu", "bfloat16")
    assert run_suite([str(sft)], suite)["dtype"] == "bfloat16"
    assert run_suite([str(sft)], suite, dtype="float32")["dtype"] == "float32"
    assert suite_placement(suite, dtype="float16").dtype == torch.float16
    bad = [("device", "gpu", "device must be auto, cpu, cuda or cuda:N"),
           ("dtype", "fp8", "dtype must be one of auto, float32")]  # fmt: skip
    for key, value, message in bad:
        path.write_text(yaml.safe_dump({**raw, key: value}))
        with pytest.raises(InputError, match=f"suite {path}: {message}"):
            load_suite(path)


@without_cuda
def test_a_suite_asking_for_cuda_without_it_is_refused_by_name(suite_folder, llama_pair):
    from omotool.eval.runner import suite_placement

    raw = yaml.safe_load((suite_folder / "suite.yaml").read_text())
    path = suite_folder / "cuda.yaml"
    path.write_text(yaml.safe_dump({**raw, "device": "cuda"}))
    suite = load_suite(path)
    with pytest.raises(UsageError, match=f"suite {path}: device cuda: CUDA is not available"):
        run_suite([str(llama_pair[1])], suite)
    assert suite_placement(suite, device="cpu").device == torch.device("cpu")  # the flag wins


@without_cuda
def test_eval_command_device_and_dtype(cli, suite_folder, llama_pair, tmp_path) -> None:
    _, sft = llama_pair
    prose = ["eval", sft, "--task", "perplexity", "--data", suite_folder / "prose.txt"]
    refused = cli(*prose, "--device", "cuda", expect=2).output
    assert "--device cuda: CUDA is not available here" in " ".join(refused.split())
    assert "Traceback" not in refused and len(refused.splitlines()) <= 3
    suite = ["eval", sft, "--suite", suite_folder / "suite.yaml"]
    assert "--device cuda:1: CUDA" in cli(*suite, "--device", "cuda:1", expect=2).output
    assert "--dtype must be one of" in cli(*prose, "--dtype", "fp16", expect=2).output
    assert "--device must be auto" in cli(*prose, "--device", "tpu", expect=2).output
    default = json.loads(cli(*prose, "--json").output)
    assert (default["device"], default["dtype"]) == ("cpu", "float32")
    auto = json.loads(cli(*prose, "--json", "--device", "auto", "--dtype", "auto").output)
    assert scores_of(auto) == scores_of(default)
    out = tmp_path / "bf16"
    cli(*prose, "--dtype", "bfloat16", "-o", out)
    bf16 = json.loads((out / "report.json").read_text())
    assert (bf16["device"], bf16["dtype"]) == ("cpu", "bfloat16")
    close_scores(bf16, default)
    assert "weights in `bfloat16`" in (out / "report.md").read_text()
    from omotool.cli import app

    help_text = cli.runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "250"}).output
    assert "--device" in help_text and "--dtype" in help_text and "[default: (auto)]" in help_text


@pytest.mark.cuda
@needs_cuda
def test_a_suite_on_cuda_scores_as_on_the_cpu(suite_folder, llama_pair) -> None:
    from omotool.eval.device import resolve_placement
    from omotool.eval.runner import _Models

    _, sft = llama_pair
    model, _ = _Models(resolve_placement("cuda", "float32")).get(str(sft))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    suite = load_suite(suite_folder / "suite.yaml")
    cpu = run_suite([str(sft)], suite, device="cpu", dtype="float32")
    cuda = run_suite([str(sft)], suite, device="cuda", dtype="float32")
    assert cuda["device"].startswith("cuda:") and cuda["dtype"] == "float32"
    assert cuda["device_name"]
    close_scores(cuda, cpu, logps=1e-3, perplexity=1e-4)
    auto = run_suite([str(sft)], suite, device="cuda")  # bfloat16 where the GPU has it
    assert auto["dtype"] == (
        "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    )
    close_scores(auto, cpu)


@pytest.mark.cuda
@needs_cuda
def test_eval_command_on_cuda(cli, suite_folder, llama_pair) -> None:
    _, sft = llama_pair
    args = ["eval", sft, "--suite", suite_folder / "suite.yaml", "--json"]
    report = json.loads(cli(*args, "--device", "cuda", "--dtype", "bfloat16").output)
    assert report["device"].startswith("cuda:") and report["dtype"] == "bfloat16"
    assert not any(t["failed"] for m in report["models"] for t in m["tasks"].values())
    assert json.loads(cli(*args).output)["device"].startswith("cuda:")  # auto: the GPU
