"""Every option of ``omotool train``, declared once: ``TrainOptions`` (``TrainConfig`` with
its checks lives in ``omotool.train.arguments``).

Each field carries a ``TrainOption``: its help and ``--help`` panel, the values it takes, which
``--merge`` values (``merges``) or algorithms (``lacks``: only those that list it in
``Algorithm.options``; ``online``: only those that sample) read it, and the TRL config fields
it sets (``trl``). The command's parameters, the recipe keys, the range checks, the refusals
and the TRL config (``omotool.train.arguments``) are all derived from it: adding an option is
adding a field here. The merge options (``--merge``, ``--reserve-p``, ..., ``--seed``) are the
optimizer's, declared in ``omotool.optim.options`` and taken from there (``_merge_option``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from omotool.config import above, at_least, declare, declared, default_of, within
from omotool.optim.options import (  # noqa: F401 - MERGES: the --merge values, offered here
    MERGES,
    MERGING,
    MergeFields,
    MergeOption,
)
from omotool.train.algorithms import ALGORITHMS

# TRL 1.16's GRPO losses and reward scalings (GRPOConfig's loss_type and scale_rewards).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
REPORTERS = ("none", "tensorboard", "wandb")
# Schedulers that need nothing omotool does not pass (others need lr_scheduler_kwargs).
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
)  # fmt: skip

_SAMPLING = [name for name in ALGORITHMS if ALGORITHMS.get(name).online]
_FIXED_DATA = [name for name in ALGORITHMS if name not in _SAMPLING]
# --help panels
DATA, ALGO, MERGE = "Model and data", "Algorithm", "Merging"
ONLINE = "Online RL: " + ", ".join(_SAMPLING)
OPTIM, RUN, DEVICES, LORA = "Optimizer", "Run", "Memory and devices", "LoRA"
_SAMPLES_NOTHING = "it learns from fixed examples, it samples no completions"


@dataclass(frozen=True)
class TrainOption(MergeOption):
    """An option of ``omotool train`` (see ``omotool.config.Option`` for the common part).

    - ``merges``: the ``--merge`` values that read it (empty: every one); ``does`` says what
      it does, for the refusal of another ``--merge`` (``omotool.optim.options.MergeOption``).
    - ``lacks``: set for an option only some algorithms read (those listing it in
      ``Algorithm.options``): why another one lacks it. Its default means "not set": TRL's
      own default then applies, and ``--help`` shows it.
    - ``online``: read only by the algorithms that sample completions (the rewards).
    - ``trl``: the fields of TRL's config it sets (its value, unless
      ``arguments.TRL_VALUES`` converts it); each field has one owner (``trl_owner``), so
      ``--trl`` (the pass-through of any other field) refuses the owned ones, naming it.
    - ``optim``: the argument of ``OnlineMergingAdamW`` it sets.
    - ``lora``: read only with ``--lora-r`` (LoRA on): a field of TRL's ``ModelConfig``, which
      builds the adapter (``omotool.train.lora``).
    """

    lacks: str = ""
    online: bool = False
    trl: tuple[str, ...] = ()
    optim: str = ""
    lora: bool = False

    def help_default(self, name: str, default: Any) -> str | None:
        if not self.lacks or default is not None:
            return None
        return trl_defaults(name)


def _opt(default: Any, help: str, panel: str, **details: Any) -> Any:
    return declare(default, TrainOption(help, panel, **details))


def _merge_option(name: str, panel: str = MERGE, **details: Any) -> Any:
    """The option of ``OnlineMergingAdamW``'s merge option ``name`` as declared in
    ``omotool.optim.options`` (default, help, values, range, the methods that read it), in
    ``panel``, with ``details`` (another help, TRL fields) added."""
    merge = declared(MergeFields)[name]
    shared = {f.name: getattr(merge, f.name) for f in dataclasses.fields(merge)}
    option = TrainOption(**{**shared, "panel": panel, "optim": name, **details})
    return declare(default_of(MergeFields, name), option)


@dataclass
class TrainOptions:
    """Every option of ``omotool train``; recipe keys and command-line names are these.
    ``omotool.train.arguments.TrainConfig`` adds their checks (``validate``)."""

    model: str = _opt("", "SFT model: the policy's start and reference.", DATA)
    dataset: str = _opt("", "Training data: .jsonl, .json, .parquet, .csv or a Hub dataset.", DATA)
    split: str = _opt("train", "Split of a Hub --dataset.", DATA)
    max_length: int | None = _opt(
        1024, "Longest prompt + answer, in tokens: longer examples are cut at the end.", DATA,
        bounds=at_least(1), trl=("max_length",),
    )  # fmt: skip
    eval_dataset: str | None = _opt(None, "Held-out data, evaluated every --eval-steps.", DATA)
    eval_split: str = _opt("test", "Split of a Hub --eval-dataset.", DATA)

    algo: str = _opt(
        "dpo", f"{', '.join(_FIXED_DATA)}; or {', '.join(_SAMPLING)} (online: sample "
        "completions, learn from --reward).", ALGO, choices="omotool.train.algorithms:ALGORITHMS",
    )  # fmt: skip
    beta: float | None = _opt(
        None, "beta of DPO-style losses (IPO: its tau); the KL weight of grpo/rloo (0: no "
        "reference model).", ALGO, bounds=at_least(0, "0: no KL term, no reference model"),
        lacks="its loss has no beta", trl=("beta",),
    )  # fmt: skip
    label_smoothing: float = _opt(
        0.0, "Label smoothing (robust: cDPO).", ALGO, bounds=within("[0, 0.5)"),
        lacks="its loss does not smooth labels", trl=("label_smoothing",),
    )  # fmt: skip
    precompute_ref: bool = _opt(
        False, "Reference log-probs once up front, then free the reference model.", ALGO,
        lacks="it has no reference model", trl=("precompute_ref_log_probs",),
    )  # fmt: skip
    trl: dict[str, Any] = _opt(
        {}, "Another field of the algorithm's TRL config, VALUE read as YAML (repeatable): "
        "--trl epsilon_high=0.28. Fields an option sets are refused.", ALGO,
    )  # fmt: skip

    reward: list[str] = _opt(
        [], "Reward (repeatable): exact, regex, last_number, contains (verifiers: the "
        "completion against the --reference-field column), or file.py:function / "
        "module:function (TRL's reward function signature).", ONLINE, online=True,
    )  # fmt: skip
    reward_model: list[str] = _opt(
        [], "Reward model folder: a 1-output sequence classifier (repeatable).", ONLINE,
        online=True,
    )  # fmt: skip
    reward_weights: list[float] | None = _opt(
        None, "One weight per reward, comma-separated: the --reward ones, then the models.",
        ONLINE, lacks="it has no reward functions", trl=("reward_weights",),
    )  # fmt: skip
    reward_pattern: str | None = _opt(
        None, "Regular expression of --reward regex (its group 1, if any, is the answer).",
        ONLINE, online=True,
    )  # fmt: skip
    reference_field: str = _opt(
        "reference", "The data column the verifier rewards compare with.", ONLINE, online=True
    )
    num_generations: int | None = _opt(
        None, "Completions sampled per prompt.", ONLINE, lacks=_SAMPLES_NOTHING,
        bounds=at_least(2, "advantages compare a prompt's completions"),
        trl=("num_generations",),
    )  # fmt: skip
    num_generations_eval: int | None = _opt(
        None, "Completions sampled per prompt when evaluating. [default: --num-generations]",
        ONLINE, lacks=_SAMPLES_NOTHING, bounds=at_least(1), trl=("num_generations_eval",),
    )  # fmt: skip
    max_completion_length: int | None = _opt(
        None, "Longest sampled completion, in tokens.", ONLINE, bounds=at_least(1),
        lacks=_SAMPLES_NOTHING, trl=("max_completion_length",),
    )  # fmt: skip
    temperature: float | None = _opt(
        None, "Sampling temperature.", ONLINE, bounds=above(0), lacks=_SAMPLES_NOTHING,
        trl=("temperature",),
    )  # fmt: skip
    top_p: float | None = _opt(
        None, "Nucleus sampling mass.", ONLINE, bounds=within("(0, 1]"), lacks=_SAMPLES_NOTHING,
        trl=("top_p",),
    )  # fmt: skip
    epsilon: float | None = _opt(
        None, "Clipping of the probability ratio.", ONLINE, bounds=above(0),
        lacks="its loss clips no probability ratio", trl=("epsilon",),
    )  # fmt: skip
    loss_type: str | None = _opt(
        None, "grpo's loss: " + ", ".join(LOSS_TYPES) + ".", ONLINE, choices=LOSS_TYPES,
        lacks="TRL gives it one loss", trl=("loss_type",),
    )  # fmt: skip
    scale_rewards: str | None = _opt(
        None, "grpo: advantages divided by the std of the group, batch, or none.", ONLINE,
        choices=SCALE_REWARDS, lacks="TRL does not scale its rewards by their spread",
        trl=("scale_rewards",),
    )  # fmt: skip
    num_iterations: int | None = _opt(
        None, "Optimizer steps per batch of completions.", ONLINE, bounds=at_least(1),
        lacks="it takes one step per batch", trl=("num_iterations",),
    )  # fmt: skip
    use_vllm: bool = _opt(
        False, "Sample with vLLM (GPU machines).", ONLINE, lacks=_SAMPLES_NOTHING,
        trl=("use_vllm",),
    )  # fmt: skip
    log_completions: int = _opt(
        8, "Completions a logging step adds to OUT/completions.jsonl, with their rewards "
        "(0: none).", ONLINE, online=True, bounds=at_least(0),
    )  # fmt: skip
    print_completions: int = _opt(
        0, "Completions shown in a table at each logging step.", ONLINE, online=True,
        bounds=at_least(0),
    )  # fmt: skip

    merge: str = _merge_option("method")
    base: str | None = _opt(
        None, "Base model; the task vector is computed at start.", MERGE, merges=MERGING,
        does="computes the task vector to merge from this base model",
    )  # fmt: skip
    task_vector: str | None = _opt(
        None, "Or the `omotool delta` output for --model (fingerprint checked).", MERGE,
        merges=MERGING, does="gives the task vector to merge",
    )  # fmt: skip
    reserve_p: float = _merge_option("reserve_p")
    alpha: float = _merge_option("alpha")
    online_step: int = _merge_option("online_step")
    rescale: str | None = _merge_option("rescale")
    election: str = _merge_option("election")
    tau_clip: float | None = _merge_option("tau_clip")
    missing: str = _merge_option("missing")

    lr: float = _opt(5e-7, "Learning rate.", OPTIM, bounds=above(0), trl=("learning_rate",))
    warmup_steps: int = _opt(
        0, "Linear warm-up steps.", OPTIM, bounds=at_least(0), trl=("warmup_steps",)
    )
    lr_scheduler: str = _opt(
        "linear", "transformers scheduler: linear, cosine, ...", OPTIM, choices=LR_SCHEDULERS,
        trl=("lr_scheduler_type",),
    )  # fmt: skip
    weight_decay: float = _opt(
        0.0, "Decoupled weight decay.", OPTIM, bounds=at_least(0), trl=("weight_decay",)
    )
    optimizer_backend: str = _opt(
        "auto", "How a step is computed: auto (cpu on CPUs, torch on GPUs), reference, cpu, "
        "torch, or triton (fused GPU kernels; not yet checked on a GPU).", OPTIM,
        choices="omotool.optim.online_merging:BACKENDS", optim="backend",
    )  # fmt: skip

    out: str = _opt("", "Run folder (model, checkpoints).", RUN, flags=("-o", "--out"))
    seed: int = _merge_option(
        "seed", RUN, help="Seed of data order, masks and initialisation.",
        trl=("seed", "data_seed"),
    )  # fmt: skip
    epochs: float = _opt(
        1.0, "Epochs over the data (unless --max-steps).", RUN, bounds=above(0),
        trl=("num_train_epochs",),
    )  # fmt: skip
    max_steps: int = _opt(-1, "Optimizer steps; -1: as --epochs give.", RUN, trl=("max_steps",))
    batch_size: int = _opt(
        1, "Examples per device per micro-batch (grpo, rloo: completions; × processes × "
        "--grad-accum must be a multiple of --num-generations).", RUN, bounds=at_least(1),
        trl=("per_device_train_batch_size",),
    )  # fmt: skip
    eval_batch_size: int = _opt(
        8, "Examples per device per evaluation batch (online: a multiple of the evaluation "
        "generations).", RUN, bounds=at_least(1), trl=("per_device_eval_batch_size",),
    )  # fmt: skip
    grad_accum: int = _opt(
        1, "Micro-batches per optimizer step.", RUN, bounds=at_least(1),
        trl=("gradient_accumulation_steps",),
    )  # fmt: skip
    save_steps: int = _opt(
        0, "Checkpoint every N steps; 0: none (--num-iterations above 1: --resume needs a "
        "checkpoint at a multiple of the generation buffer's steps).", RUN, bounds=at_least(0),
        trl=("save_strategy", "save_steps"),
    )  # fmt: skip
    save_total_limit: int | None = _opt(
        None, "Keep only the newest N checkpoints.", RUN, bounds=at_least(1),
        trl=("save_total_limit",),
    )  # fmt: skip
    logging_steps: int = _opt(
        1, "Log metrics every N steps.", RUN, bounds=at_least(1), trl=("logging_steps",)
    )
    eval_steps: int | None = _opt(
        None, "Evaluate every N steps. [default: --logging-steps]", RUN, bounds=at_least(1),
        trl=("eval_strategy", "eval_steps"),
    )  # fmt: skip
    report_to: str = _opt(
        "none", "none, tensorboard or wandb.", RUN, choices=REPORTERS, trl=("report_to",)
    )
    resume: bool = _opt(False, "Continue the run in --out from its newest checkpoint.", RUN)
    overwrite: bool = _opt(False, "Replace an existing run folder.", RUN)

    bf16: bool = _opt(
        False, "bfloat16 weights (float32 moments and master copy).", DEVICES, trl=("bf16",)
    )
    gradient_checkpointing: bool = _opt(
        False, "Recompute activations.", DEVICES,
        trl=("activation_checkpointing", "gradient_checkpointing"),
    )  # fmt: skip
    fsdp: bool = _opt(
        False, "Shard parameters, gradients and optimizer state across GPUs (FSDP2).", DEVICES,
        trl=("fsdp", "fsdp_config"),
    )  # fmt: skip
    deepspeed: str | None = _opt(
        None, "DeepSpeed ZeRO: zero1, zero2, zero3 (shipped configs) or a JSON/YAML config "
        "without an optimizer block (omotool provides it); with --merge none for now.", DEVICES,
        trl=("deepspeed",),
    )  # fmt: skip

    # LoRA (PEFT): TRL's ModelConfig names and defaults; omotool.train.lora builds the adapter.
    lora_r: int | None = _opt(
        None, "Train a LoRA adapter of this rank instead of every weight (the run folder then "
        "holds a PEFT adapter over --model).", LORA, bounds=at_least(1),
    )  # fmt: skip
    lora_alpha: float = _opt(
        32.0, "LoRA scale numerator: the update is (alpha/r)·B·A (alpha/√r with --use-rslora).",
        LORA, bounds=above(0), lora=True,
    )  # fmt: skip
    lora_dropout: float = _opt(
        0.05, "Dropout on the LoRA branch's input.", LORA, bounds=within("[0, 1)"), lora=True
    )
    lora_target_modules: str = _opt(
        "all-linear", "Modules that get an adapter: all-linear (every linear layer but the "
        "output head) or names, comma-separated: q_proj,v_proj.", LORA, lora=True,
    )  # fmt: skip
    use_rslora: bool = _opt(
        False, "Rank-stabilised LoRA: scale alpha/√r instead of alpha/r.", LORA, lora=True
    )
    load_in_4bit: bool = _opt(
        False, "QLoRA: load --model in 4 bits (bitsandbytes, CUDA only; not yet run by "
        "omotool's tests).", LORA, lora=True,
    )  # fmt: skip


def train_options() -> dict[str, TrainOption]:
    """The declared options of ``TrainOptions``, by field name, in declaration order."""
    return declared(TrainOptions)  # type: ignore[return-value]


def trl_owner(trl_field: str) -> str | None:
    """The option that sets ``trl_field`` of TRL's config, if one does (``--trl KEY=VALUE``
    refuses those, naming the option)."""
    owners = {f: name for name, option in train_options().items() for f in option.trl}
    return owners.get(trl_field)


def trl_default(algo: str, name: str) -> Any:
    """The default of TRL field ``name`` in the TRL config class of ``algo``."""
    with warnings.catch_warnings():  # trl.experimental announces itself
        warnings.simplefilter("ignore")
        config_class = ALGORITHMS.get(algo).config_class()
    return config_class.__dataclass_fields__[name].default


def trl_defaults(name: str) -> str | None:
    """TRL's defaults of option ``name`` for the algorithms that read it, read from the
    installed TRL: ``TRL's: 0.1; grpo 0, rloo 0.05`` (the common one, then the others); None
    where TRL has none."""
    (field,) = train_options()[name].trl
    values = {
        algo: trl_default(algo, field)
        for algo in ALGORITHMS
        if name in ALGORITHMS.get(algo).options
    }
    shown = {algo: f"{v:g}" if isinstance(v, float) else str(v) for algo, v in values.items()}
    common = Counter(shown.values()).most_common(1)[0][0]
    if set(shown.values()) == {"None"}:
        return None
    others = ", ".join(f"{algo} {text}" for algo, text in shown.items() if text != common)
    return f"TRL's: {common}" + (f"; {others}" if others else "")
