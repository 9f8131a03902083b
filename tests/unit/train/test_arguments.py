"""TrainConfig's checks and trl_arguments: every option of `omotool train` reaches the TRL
config or the optimizer, or is refused before anything is loaded."""

from __future__ import annotations

import dataclasses
import math

import pytest
from transformers import TrainingArguments

from omotool.errors import OmoError, UsageError
from omotool.train.algorithms import ALGORITHMS, Algorithm
from omotool.train.arguments import MERGES, TrainConfig, trl_arguments
from omotool.train.options import train_options

# The options only some algorithms read → the TRL field each sets; the merge options → the
# --merge values that read them.
ALGORITHM_OPTIONS = {name: o.trl[0] for name, o in train_options().items() if o.lacks}
MERGE_OPTIONS = {name: o.merges for name, o in train_options().items() if o.merges}

# The loss each --algo must end up with in its TRL config (orpo's config has no loss_type).
LOSSES = {
    "dpo": {"loss_type": ["sigmoid"]},
    "ipo": {"loss_type": ["ipo"]},
    "hinge": {"loss_type": ["hinge"]},
    "robust": {"loss_type": ["robust"]},
    "kto": {"loss_type": "kto"},
    "simpo": {"loss_type": "simpo", "cpo_alpha": 0.0},
    "orpo": {},
    "sft": {"loss_type": "nll"},
    "grpo": {},
    "rloo": {},
}
# Values away from every default, for the options only some algorithms take.
SET = {
    "beta": 0.3, "label_smoothing": 0.2, "precompute_ref": True, "num_generations": 2,
    "max_completion_length": 17, "temperature": 0.7, "top_p": 0.9, "use_vllm": True,
    "num_iterations": 2, "epsilon": 0.3, "loss_type": "grpo", "scale_rewards": "batch",
    "reward_weights": [0.5], "num_generations_eval": 2,
}  # fmt: skip


def train_config(tmp_path, **options) -> TrainConfig:
    settings = dict(model="m", dataset="d", out=str(tmp_path), merge="none", batch_size=2)
    if ALGORITHMS.get(options.get("algo", "dpo")).online:
        settings.update(reward=["exact"], batch_size=8)  # TRL's 8 generations per prompt
    return TrainConfig(**(settings | options))


def test_losses_cover_every_algorithm() -> None:
    assert set(LOSSES) == set(ALGORITHMS)


@pytest.mark.parametrize("on", [True, False], ids=["checkpointing-on", "checkpointing-off"])
@pytest.mark.parametrize("algo", list(LOSSES))
def test_every_option_reaches_the_trl_config(tmp_path, algo, on) -> None:
    algorithm = ALGORITHMS.get(algo)
    # (use_vllm: vLLM is not installed here; test_use_vllm_needs_vllm)
    taken = {option: SET[option] for option in algorithm.options if option != "use_vllm"}
    length = {} if algorithm.online else {"max_length": 77}  # online: max_completion_length
    evaluated = {"eval_dataset": "e"} if "num_generations_eval" in taken else {}
    config = train_config(
        tmp_path, algo=algo, lr=3e-4, warmup_steps=7, lr_scheduler="cosine", bf16=on,
        gradient_checkpointing=on, report_to="tensorboard" if on else "none", **length, **taken,
        **evaluated,
    )  # fmt: skip
    dataclasses.replace(config, report_to="none").validate()  # (tensorboard is not installed)
    args = trl_arguments(config, tmp_path)
    assert type(args) is algorithm.config_class()
    for field, value in LOSSES[algo].items():
        assert getattr(args, field) == value
    if algo == "orpo":
        assert not hasattr(args, "loss_type")  # one fixed loss
    assert args.beta == 0.3 if "beta" in taken else not hasattr(args, "beta")
    if "label_smoothing" in taken:
        assert args.label_smoothing == 0.2
    if "precompute_ref" in taken:
        assert args.precompute_ref_log_probs is True
    for option in set(taken) - {"beta", "label_smoothing", "precompute_ref"}:
        assert getattr(args, ALGORITHM_OPTIONS[option]) == SET[option], option
    # gradient checkpointing: transformers reads activation_checkpointing, TRL its alias
    assert args.activation_checkpointing is on and args.gradient_checkpointing is on
    assert args.bf16 is on  # (TRL's default is True: off must be passed)
    assert args.report_to == (["tensorboard"] if on else [])
    assert (args.learning_rate, args.warmup_steps) == (3e-4, 7)
    assert args.max_length == 77 if not algorithm.online else not hasattr(args, "max_length")
    assert args.lr_scheduler_type.value == "cosine"


@pytest.mark.parametrize("algo", list(LOSSES))
def test_loss_options_default_off_where_taken(tmp_path, algo) -> None:
    config = train_config(tmp_path, algo=algo)
    config.validate()
    args = trl_arguments(config, tmp_path)
    if "beta" in ALGORITHMS.get(algo).options:  # TRL's default for the algorithm, recorded
        trl_default = type(args).__dataclass_fields__["beta"].default
        assert args.beta == config.beta == trl_default == {"grpo": 0.0, "rloo": 0.05}.get(algo, 0.1)
    for option in set(ALGORITHMS.get(algo).options) - {"beta", "label_smoothing", "precompute_ref"}:
        field = ALGORITHM_OPTIONS[option]  # unset: TRL's default reaches the trainer
        assert getattr(args, field) == type(args).__dataclass_fields__[field].default, option
    if "precompute_ref" in ALGORITHMS.get(algo).options:
        assert args.precompute_ref_log_probs is False
    assert args.activation_checkpointing is False and args.bf16 is False


REFUSED = [
    (algo, option)
    for algo in ALGORITHMS
    for option in ALGORITHM_OPTIONS
    if option not in ALGORITHMS.get(algo).options
]


@pytest.mark.parametrize(("algo", "option"), REFUSED, ids=[f"{a}-{o}" for a, o in REFUSED])
def test_an_option_the_loss_does_not_read_is_refused(tmp_path, algo, option) -> None:
    config = train_config(tmp_path, algo=algo, **{option: SET[option]})
    flag = "--" + option.replace("_", "-")
    for check in (config.validate, lambda: trl_arguments(config, tmp_path)):
        with pytest.raises(UsageError, match=f"{flag}.* --algo {algo} ") as error:
            check()
        assert "drop it" in str(error.value)


def test_refusal_names_the_algorithms_that_take_it(tmp_path) -> None:
    with pytest.raises(UsageError) as error:
        train_config(tmp_path, algo="dpo", label_smoothing=0.1).validate()
    message = str(error.value)
    assert message.startswith("--label-smoothing 0.1 has no effect with --algo dpo")
    assert "--algo robust, simpo" in message


def test_loss_options_name_fields_of_the_config_class() -> None:
    for name in ALGORITHMS:
        algorithm = ALGORITHMS.get(name)
        fields = set(algorithm.config_class().__dataclass_fields__)
        for option in algorithm.options:
            assert ALGORITHM_OPTIONS[option] in fields, (name, option)
        assert set(algorithm.settings) <= fields, name


def test_trl_defaults_checkpointing_on() -> None:
    """Why omotool always sets both fields: TRL's configs default the deprecated
    ``gradient_checkpointing`` alias to True, which turns ``activation_checkpointing`` (what
    transformers' Trainer reads) on when it is left unset."""
    from trl import DPOConfig

    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        args = DPOConfig(output_dir="unused", use_cpu=True, report_to=[])
    assert args.activation_checkpointing is True and args.bf16 is True


@dataclasses.dataclass
class NoMaxLength(TrainingArguments):
    """A TRL config as an older or newer TRL might have it: no ``max_length`` field."""


def test_a_field_missing_from_trl_is_an_error_not_dropped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Algorithm, "config_class", lambda self: NoMaxLength)
    with pytest.raises(OmoError, match="NoMaxLength has no field max_length"):
        trl_arguments(train_config(tmp_path, algo="sft"), tmp_path)


@dataclasses.dataclass
class Refusing(TrainingArguments):
    max_length: int | None = None

    def __post_init__(self) -> None:
        raise ValueError("not this combination")


def test_a_value_error_of_trl_becomes_a_usage_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Algorithm, "config_class", lambda self: Refusing)
    with pytest.raises(UsageError, match="TRL refuses these settings: not this combination"):
        trl_arguments(train_config(tmp_path, algo="sft"), tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr_scheduler": "cosine_with_min_lr"}, "--lr-scheduler 'cosine_with_min_lr': choose"),
        ({"lr_scheduler": "constant", "warmup_steps": 5}, "constant_with_warmup"),
        ({"warmup_steps": -1}, "--warmup-steps must be >= 0"),
        ({"max_steps": 0}, "--max-steps must be -1"),
        ({"epochs": 0.0}, "--epochs must be > 0"),
        ({"max_length": 0}, "--max-length must be at least 1"),
        ({"eval_steps": 5}, "--eval-steps needs --eval-dataset"),
        ({"eval_batch_size": 16}, "--eval-batch-size needs --eval-dataset"),
        ({"eval_batch_size": 0, "eval_dataset": "e"}, "--eval-batch-size must be at least 1"),
        ({"beta": 0.0}, "--beta must be > 0"),
        ({"algo": "robust", "label_smoothing": 0.5}, r"--label-smoothing must be in \[0, 0.5\)"),
        ({"save_total_limit": 0}, "--save-total-limit must be at least 1"),
        ({"algo": "kto", "batch_size": 1}, "--algo kto needs --batch-size 2 or more"),
        ({"lr": 0.0}, r"^--lr must be > 0\.$"),
        ({"batch_size": 0}, r"^--batch-size must be at least 1\.$"),
        ({"grad_accum": 0}, r"^--grad-accum must be at least 1\.$"),
        ({"max_steps": -2}, r"^--max-steps must be -1 \(train for --epochs\) or at least 1\.$"),
        ({"report_to": "mlflow"}, "--report-to 'mlflow': choose one of none, tensorboard, wandb"),
        ({"algo": "dpx"}, "Unknown algorithm 'dpx'.* Did you mean 'dpo'"),
    ],
)
def test_out_of_range_options_are_refused_before_loading(tmp_path, options, message) -> None:
    with pytest.raises(UsageError, match=message):
        train_config(tmp_path, **options).validate()


def test_command_line_refuses_an_option_the_loss_does_not_read(cli, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(
        "train", "--algo", "sft", "--merge", "none", "--beta", "0.3", "--model", "no-model",
        "--dataset", "no-data.jsonl", "-o", out, expect=2,
    )  # fmt: skip
    output = " ".join(result.output.split())
    assert "--beta 0.3 has no effect with --algo sft" in output
    assert "Traceback" not in output and len(output) < 300
    assert not out.exists()  # refused before anything was read or written


def test_runner_re_exports_the_options() -> None:
    from omotool.train import arguments, runner

    assert runner.TrainConfig is arguments.TrainConfig
    assert runner.trl_arguments is arguments.trl_arguments
    assert runner.MERGES is arguments.MERGES


def test_merges_are_the_optimizers_merge_rules() -> None:
    from omotool.optim.functional import MERGE_RULES
    from omotool.train.options import MERGING

    assert sorted(MERGES) == sorted(MERGE_RULES.names())
    assert sorted(MERGING) == sorted(n for n in MERGE_RULES.names() if MERGE_RULES.get(n).merges)


# Values away from every default, for the merge options.
MERGE_SET = {
    "base": "base-model", "task_vector": "runs/tau", "reserve_p": 0.2, "alpha": 0.0,
    "online_step": 4, "rescale": "l1", "election": "weighted", "tau_clip": 2.0,
    "missing": "adamw",
}  # fmt: skip
MERGE_REFUSED = [
    (merge, option)
    for merge in MERGES
    for option, takers in MERGE_OPTIONS.items()
    if merge not in takers
]


def test_merge_set_covers_every_merge_option() -> None:
    assert set(MERGE_SET) == set(MERGE_OPTIONS)
    defaults = TrainConfig()
    assert all(MERGE_SET[o] != getattr(defaults, o) for o in MERGE_OPTIONS)


@pytest.mark.parametrize(
    ("merge", "option"), MERGE_REFUSED, ids=[f"{m}-{o}" for m, o in MERGE_REFUSED]
)
def test_a_merge_option_the_merge_does_not_read_is_refused(tmp_path, merge, option) -> None:
    vector = {} if merge == "none" or option in ("base", "task_vector") else {"base": "b"}
    config = train_config(tmp_path, merge=merge, **vector, **{option: MERGE_SET[option]})
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UsageError, match=f"^{flag} {MERGE_SET[option]} has no effect with "
                       f"--merge {merge} ") as error:  # fmt: skip
        config.validate()
    takers = MERGE_OPTIONS[option]
    assert str(error.value).endswith(f"drop it, or use --merge {' or '.join(takers)}.")


def test_merge_options_at_their_defaults_are_accepted_with_adamw(tmp_path) -> None:
    """Only a value that differs from the default is refused; ``--seed`` also seeds
    training, so it is never refused."""
    defaults = TrainConfig()
    same = {option: getattr(defaults, option) for option in MERGE_OPTIONS}
    train_config(tmp_path, merge="none", seed=7, **same).validate()


@pytest.mark.parametrize("merge", ["dare", "ties"])
def test_merge_options_reach_a_merge_that_reads_them(tmp_path, merge) -> None:
    taken = {o: MERGE_SET[o] for o, takers in MERGE_OPTIONS.items() if merge in takers}
    taken.pop("base")  # (give --base or --task-vector, not both)
    train_config(tmp_path, merge=merge, **taken).validate()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reserve_p": 0.0}, r"--reserve-p must be in \(0, 1\]"),
        ({"reserve_p": 1.5}, r"--reserve-p must be in \(0, 1\]"),
        ({"alpha": -0.1}, r"--alpha must be in \[0, 1\]"),
        ({"alpha": 1.5}, r"--alpha must be in \[0, 1\]"),
        ({"online_step": 0}, "--online-step must be at least 1"),
        ({"rescale": "dropout"}, "--rescale 'dropout': choose one of none, inverse, l1"),
        ({"merge": "ties", "election": "majority"}, "--election 'majority': choose one of"),
        ({"tau_clip": 0.0}, "--tau-clip must be > 0"),
        ({"missing": "skip"}, "--missing 'skip': choose one of error, adamw"),
        ({"merge": "ties", "tau_clip": 2.0}, r"--tau-clip 2.0 has no effect with --merge ties "
         r"\(it clamps the kept task vector, which only OnDARE does\): drop it, or use --merge "
         "dare."),
        ({"merge": "ties", "tau_clip": None}, "--tau-clip none has no effect with --merge ties"),
    ],
)  # fmt: skip
def test_out_of_range_merge_options_are_refused_before_loading(tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        train_config(tmp_path, **({"merge": "dare", "base": "b"} | options)).validate()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer_backend": "gpu"}, "--optimizer-backend 'gpu': choose one of auto, reference"),
        ({"optimizer_backend": "triton", "online_step": 2}, "triton does not support step-K"),
        ({"optimizer_backend": "triton", "rescale": "l1"}, "triton does not support rescale='l1'"),
    ],
)
def test_optimizer_backend_is_checked_before_loading(tmp_path, options, message) -> None:
    with pytest.raises(UsageError, match=message):
        train_config(tmp_path, **({"merge": "dare", "base": "b"} | options)).validate()


def test_triton_backend_needs_cuda_or_the_interpreter(tmp_path, monkeypatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = train_config(tmp_path, merge="dare", base="b", optimizer_backend="triton")
    with pytest.raises(UsageError, match="runs on CUDA GPUs"):
        config.validate()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config.validate()


def test_command_line_refuses_a_merge_option_adamw_does_not_read(cli, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(
        "train", "--algo", "dpo", "--merge", "none", "--alpha", "0", "--model", "no-model",
        "--dataset", "no-data.jsonl", "-o", out, expect=2,
    )  # fmt: skip
    output = " ".join(result.output.split())
    assert "--alpha 0.0 has no effect with --merge none" in output
    assert "--merge dare or ties" in output and "Traceback" not in output
    assert not out.exists()


# -- online RL: rewards ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(algo="grpo", reward=[]), "--algo grpo learns from rewards: give --reward"),
        (dict(algo="dpo", reward=["exact"]), "--reward exact has no effect with --algo dpo"),
        (dict(algo="kto", reward_model=["rm"]), "--reward-model rm has no effect with --algo kto"),
        (dict(algo="rloo", reward=["nope"]), "--reward 'nope': give a verifier"),
        (dict(algo="grpo", reward=["regex"]), "--reward regex needs --reward-pattern"),
        (dict(algo="grpo", reward_pattern="x"), "--reward-pattern is read by --reward regex"),
        (dict(algo="grpo", reward=["regex"], reward_pattern="("), "not a regular expression"),
        (dict(algo="grpo", reward=["f.py:g"], reference_field="answer"),
         "--reference-field answer is read by the verifiers only"),
        (dict(algo="grpo", reward=["exact"], reward_model=["rm"], reward_weights=[1.0]),
         r"gives 1 weights for 2 rewards \(--reward exact, --reward-model rm\)"),
        (dict(algo="grpo", reward_weights=[math.inf]),
         r"--reward-weights gives --reward exact the weight inf: weights must be finite"),
        (dict(algo="rloo", reward=["exact", "f.py:g"], reward_weights=[1.0, -math.inf]),
         "gives --reward f.py:g the weight -inf"),
        (dict(algo="grpo", reward_weights=[math.nan]), "the weight nan"),
        (dict(algo="grpo", num_generations_eval=4), "--num-generations-eval needs --eval-dataset"),
        (dict(algo="grpo", num_generations=16, batch_size=16, eval_dataset="e"),
         r"evaluates --num-generations 16 completions per prompt, but an evaluation batch holds "
         r"--eval-batch-size 8 × 1 process\(es\) = 8 completions"),
        (dict(algo="grpo", num_generations_eval=3, eval_dataset="e"),
         "evaluates --num-generations-eval 3 completions"),
        (dict(algo="grpo", num_generations_eval=0, eval_dataset="e"),
         "--num-generations-eval must be at least 1"),
        (dict(algo="grpo", max_length=64), "use --max-completion-length"),
        (dict(algo="grpo", use_vllm=True), "--use-vllm needs the vllm package"),
        (dict(algo="grpo", num_generations=3),
         r"--batch-size 8 × 1 process\(es\) × --grad-accum 1 = 8 completions, not a multiple "
         "of 3"),
        (dict(algo="rloo", batch_size=3), "--num-generations 2 .* = 3 completions"),
        (dict(algo="grpo", batch_size=1),  # --batch-size's default: the fix is in the message
         r"= 1 completions, not a multiple of 8: make the product a multiple \(e.g. "
         r"--batch-size 8\)"),
        (dict(algo="grpo", num_generations=1, batch_size=1),
         "--num-generations must be at least 2"),
        (dict(algo="grpo", beta=-0.1), "--beta must be >= 0"),
        (dict(algo="dpo", beta=0.0), "--beta must be > 0"),
        (dict(algo="grpo", loss_type="ppo"), "--loss-type 'ppo': choose one of grpo, dr_grpo"),
        (dict(algo="grpo", scale_rewards="std"), "--scale-rewards 'std': choose one of group"),
        (dict(algo="grpo", top_p=0.0), r"--top-p must be in \(0, 1\]"),
        (dict(algo="grpo", temperature=0.0), "--temperature must be > 0"),
    ],
)  # fmt: skip
def test_online_settings_are_checked_before_loading(tmp_path, options, message) -> None:
    with pytest.raises(UsageError, match=message):
        train_config(tmp_path, **options).validate()


def test_grpo_takes_zero_beta_and_several_processes_count(tmp_path, monkeypatch) -> None:
    config = train_config(tmp_path, algo="grpo", beta=0.0, num_generations=4, batch_size=4)
    assert trl_arguments(config, tmp_path).beta == 0.0
    config.batch_size = 2
    with pytest.raises(UsageError, match="= 2 completions, not a multiple of 4"):
        config.validate()
    monkeypatch.setenv("WORLD_SIZE", "2")  # 2 completions × 2 processes: one group of 4
    config.validate()


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (dict(grad_accum=1, trl={"steps_per_generation": 2}), None),  # 4 × 2: one group
        (dict(grad_accum=2, trl={"steps_per_generation": 1}),
         r"a generation holds --batch-size 4 × 1 process\(es\) × --trl steps_per_generation 1 "
         "= 4 completions, not a multiple of 8"),
        (dict(grad_accum=2), None),  # steps_per_generation defaults to --grad-accum
        (dict(trl={"generation_batch_size": 16}), None),
        (dict(trl={"generation_batch_size": 12}),
         "a generation holds --trl generation_batch_size 12 = 12 completions, not a multiple"),
    ],
)  # fmt: skip
def test_the_group_check_counts_a_generation_as_trl_does(tmp_path, options, refusal) -> None:
    """TRL samples ``--batch-size × processes × steps_per_generation`` completions at once
    (or ``generation_batch_size``), and that must hold whole groups: with --trl
    steps_per_generation the step's own batch (× --grad-accum) is not what counts."""
    config = train_config(tmp_path, algo="grpo", num_generations=8, batch_size=4, **options)
    if refusal is None:
        config.validate()
        arguments = trl_arguments(config, tmp_path)  # TRL agrees
        assert arguments.generation_batch_size % 8 == 0
        return
    with pytest.raises(UsageError, match=refusal):
        config.validate()
    with pytest.raises(UsageError, match="must be divisible by num_generations"):
        trl_arguments(train_config(tmp_path, algo="grpo", num_generations=8, batch_size=4,
                                   **options), tmp_path)  # fmt: skip


def test_reward_options_on_the_command_line(cli, tmp_path) -> None:
    result = cli(
        "train", "--model", "m", "--dataset", "d", "-o", tmp_path / "o", "--algo", "grpo",
        "--merge", "none", "--reward", "exact", "--reward", "r.py:f", "--reward-weights", "0.5",
        expect=2,
    )  # fmt: skip
    assert "--reward-weights gives 1 weights for 2 rewards" in " ".join(result.output.split())


# -- derived from the declaration -------------------------------------------------------------
def test_merge_options_reach_the_optimizer_by_its_own_argument_names(tmp_path) -> None:
    import inspect

    from omotool.optim import OnlineMergingAdamW
    from omotool.train.arguments import optimizer_options

    config = train_config(tmp_path, merge="dare", base="b", tau_clip=None, missing="adamw")
    given = optimizer_options(config)
    assert set(given) <= set(inspect.signature(OnlineMergingAdamW).parameters)
    assert given["tau_clip"] is None and given["missing"] == "adamw"
    assert (given["method"], given["backend"], given["seed"]) == ("dare", "auto", 0)


def test_tau_clip_none_and_missing_from_the_command_line_and_recipes() -> None:
    from omotool.config import build_config

    required = {"model": "m", "dataset": "d", "out": "o", "base": "b"}
    config = build_config(TrainConfig, required, {"tau_clip": "none", "missing": "adamw"})
    assert (config.tau_clip, config.missing) == (None, "adamw")
    assert build_config(TrainConfig, {**required, "tau-clip": None}, {}).tau_clip is None
    assert build_config(TrainConfig, required, {"tau_clip": "2.5"}).tau_clip == 2.5
    config.validate()


def test_converted_trl_values_set_only_the_declared_fields(tmp_path) -> None:
    from omotool.train.arguments import TRL_VALUES

    config = train_config(tmp_path, save_steps=5, report_to="tensorboard", fsdp=True,
                          eval_dataset="e", eval_steps=3, deepspeed="zero2")  # fmt: skip
    for option, convert in TRL_VALUES.items():
        assert set(convert(config)) == set(train_options()[option].trl), option


def test_each_trl_field_has_at_most_one_owner() -> None:
    from omotool.train.options import trl_owner

    fields = [f for option in train_options().values() for f in option.trl]
    assert len(fields) == len(set(fields))
    assert (trl_owner("learning_rate"), trl_owner("data_seed")) == ("lr", "seed")
    assert trl_owner("precompute_ref_log_probs") == "precompute_ref"
    assert trl_owner("adam_beta1") is None  # free for a future --trl adam_beta1=...


def test_command_line_reads_tau_clip_none_and_missing(cli, tmp_path) -> None:
    out = tmp_path / "run"
    common = ("--model", "m", "--dataset", "d", "-o", out, "--base", "b")
    result = cli("train", *common, "--merge", "ties", "--tau-clip", "none", expect=2)
    assert "--tau-clip none has no effect with --merge ties" in " ".join(result.output.split())
    result = cli("train", *common, "--missing", "skip", expect=2)
    assert "--missing 'skip': choose one of error, adamw" in " ".join(result.output.split())
    assert not out.exists()


def test_evaluation_batches_and_generations_reach_trl(tmp_path) -> None:
    big = train_config(
        tmp_path, algo="grpo", num_generations=16, batch_size=16, eval_dataset="e",
        eval_batch_size=16,
    )  # fmt: skip
    big.validate()
    assert trl_arguments(big, tmp_path).per_device_eval_batch_size == 16
    fewer = train_config(
        tmp_path, algo="rloo", num_generations=16, batch_size=16, eval_dataset="e",
        num_generations_eval=4,
    )  # fmt: skip
    fewer.validate()
    args = trl_arguments(fewer, tmp_path)
    assert (args.num_generations_eval, args.per_device_eval_batch_size) == (4, 8)
    with pytest.raises(UsageError, match="--num-generations-eval 2 has no effect with --algo dpo"):
        train_config(tmp_path, algo="dpo", eval_dataset="e", num_generations_eval=2).validate()


@pytest.mark.parametrize("option", ["log_completions", "print_completions"])
def test_the_completion_logs_are_refused_for_fixed_data(tmp_path, option) -> None:
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UsageError, match=f"^{flag} 2 has no effect with --algo dpo"):
        train_config(tmp_path, algo="dpo", **{option: 2}).validate()
    train_config(tmp_path, algo="grpo", **{option: 2}).validate()
    with pytest.raises(OmoError, match=flag):
        train_config(tmp_path, algo="grpo", **{option: -1}).validate()
