"""LoRA (PEFT) in ``omotool train``: the ``--lora-*`` options as TRL's ``ModelConfig`` and the
adapter config TRL builds from it, their checks, and the 4-bit load (QLoRA).

With ``--lora-r R`` every linear layer named by ``--lora-target-modules`` gets an adapter
``W = W₀ + s·B·A`` (``B`` d×R, initialised to 0; ``A`` R×k; ``s = alpha/R``, or
``alpha/√R`` with ``--use-rslora``); only ``A`` and ``B`` train, through the same optimizer as
full-parameter training. TRL's trainers take the adapter config (``peft_config``) and wrap
the model; a DPO-style reference is then the policy with its adapter switched off, which is
``--model`` itself. The run folder holds a PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(model, run)`` loads.

With ``--merge dare|ties`` the factors step through the same AdamW, then each adapted module
gets the merge of its full-weight update with ``T = F(τ)`` projected back onto its factors
(``omotool.optim.lora_merging``, math in ``omotool.optim.lora_projection``).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

from omotool.config import default_of, flag
from omotool.errors import InputError, UsageError

ALL_LINEAR = "all-linear"
INSTALL = "pip install 'omotool[lora]'"


def lora_on(config: Any) -> bool:
    """Whether ``config`` (a ``TrainConfig``) trains a LoRA adapter (``--lora-r`` given)."""
    return config.lora_r is not None


def target_modules(config: Any) -> str | list[str]:
    """``--lora-target-modules`` as PEFT takes it: ``"all-linear"`` or a list of names."""
    text = config.lora_target_modules.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = [name.strip() for name in text.split(",")]
    if not text or not all(names):
        raise UsageError(
            f"--lora-target-modules {config.lora_target_modules!r}: write {ALL_LINEAR} or module "
            "names separated by commas, e.g. q_proj,v_proj."
        )
    return names


def check_lora(config: Any) -> None:
    """Refuse, before anything loads: an SFT adapter as ``--model`` that cannot be continued
    as asked (``check_sft_adapter``); a LoRA option without ``--lora-r``; LoRA without the
    peft package; with ``--merge dare|ties``, what LoRA merging does not support yet (step-K,
    FSDP, DeepSpeed, 4-bit weights); ``--load-in-4bit`` without CUDA or bitsandbytes."""
    from omotool.io.adapters import is_adapter
    from omotool.train.options import train_options

    if config.model and is_adapter(config.model):
        check_sft_adapter(config)
    if not lora_on(config):
        for name, option in train_options().items():
            if option.lora and getattr(config, name) != default_of(type(config), name):
                value = getattr(config, name)
                given = flag(name) if isinstance(value, bool) else f"{flag(name)} {value}"
                raise UsageError(
                    f"{given} has no effect without --lora-r (LoRA is off: every weight trains): "
                    "add --lora-r R, or drop it."
                )
        return
    target_modules(config)
    if importlib.util.find_spec("peft") is None:
        raise UsageError(f"--lora-r needs the peft package: {INSTALL}")
    if config.merge != "none":
        not_yet = [
            given
            for given, refused in (
                (f"--online-step {config.online_step}", config.online_step != 1),
                ("--fsdp", config.fsdp),
                (f"--deepspeed {config.deepspeed}", config.deepspeed),
                ("--load-in-4bit", config.load_in_4bit),
            )
            if refused
        ]
        if not_yet:
            raise UsageError(
                f"--merge {config.merge} with --lora-r merges the adapter every step of one "
                f"process or of DDP processes; {not_yet[0]} is not supported with it yet: drop "
                "it, or use --merge none."
            )
    if config.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers do not run "
                "on CPUs. Drop it to train the adapter over the full-precision model."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(
                "--load-in-4bit needs the bitsandbytes package: pip install bitsandbytes"
            )


def check_sft_adapter(config: Any) -> None:
    """``--model`` is a PEFT adapter folder (an SFT adapter over a base): training continues
    that adapter, so it needs ``--lora-r`` equal to its rank, and ``--lora-alpha``,
    ``--lora-target-modules`` and ``--use-rslora`` either left at their defaults (the adapter's
    own are used) or equal to the adapter's; ``--lora-dropout`` may differ (a training setting).
    Its base must be found and it must be plain LoRA (``AdapterReader``'s checks)."""
    from omotool.io.adapters import AdapterReader

    adapter = config.model
    if not lora_on(config):
        raise UsageError(
            f"--model {adapter} is a LoRA adapter folder: give --lora-r with its rank to go on "
            "training it, or train every weight of its model written whole first: omotool "
            f"merge-offline --sft BASE --rlhf {adapter} --alpha 1 -o MERGED, then --model MERGED."
        )
    with AdapterReader(adapter):  # its base found, plain LoRA, every factor on a base weight
        pass
    saved = sft_adapter_config(adapter)
    defaults = type(config)()
    targets = target_modules(config)
    given = {
        "--lora-r": (config.lora_r, saved.r, config.lora_r != saved.r),
        "--lora-alpha": (
            config.lora_alpha,
            saved.lora_alpha,
            config.lora_alpha not in (defaults.lora_alpha, saved.lora_alpha),
        ),
        "--lora-target-modules": (
            config.lora_target_modules,
            ",".join(sorted(saved.target_modules))
            if not isinstance(saved.target_modules, str)
            else saved.target_modules,
            targets != ALL_LINEAR and set(targets) != set(saved.target_modules),
        ),
        "--use-rslora": (
            config.use_rslora,
            bool(saved.use_rslora),
            config.use_rslora and not saved.use_rslora,
        ),
    }
    for option, (value, theirs, differs) in given.items():
        if differs:
            raise UsageError(
                f"{option} {value}: --model {adapter} is a LoRA adapter with {option} {theirs}, "
                f"and training goes on with that adapter; give {option} {theirs} or drop it."
            )


def sft_adapter_config(adapter: str) -> Any:
    """The ``LoraConfig`` of the adapter folder ``adapter``, its base as found from here."""
    from peft import LoraConfig

    from omotool.io.adapters import adapter_base

    saved = LoraConfig.from_pretrained(adapter)
    saved.base_model_name_or_path = adapter_base(adapter)
    return saved


def load_policy(config: Any, dtype: Any) -> Any:
    """The model training starts from: ``--model`` loaded (4-bit with ``--load-in-4bit``);
    for an SFT adapter folder, its base with that adapter on, trainable (``PeftModel``), to
    go on training it: the written adapter is then the SFT adapter trained further, over the
    same base, and ``PeftModel.from_pretrained(base, run)`` is the trained policy."""
    from transformers import AutoModelForCausalLM

    from omotool.io.adapters import is_adapter

    options = {"dtype": dtype, **model_load_options(config, dtype)}
    if not is_adapter(config.model):
        return AutoModelForCausalLM.from_pretrained(config.model, **options)
    from peft import PeftModel

    saved = sft_adapter_config(config.model)
    if config.lora_dropout != type(config)().lora_dropout:
        saved.lora_dropout = config.lora_dropout
    base = AutoModelForCausalLM.from_pretrained(saved.base_model_name_or_path, **options)
    return PeftModel.from_pretrained(base, config.model, config=saved, is_trainable=True)


def check_adapter_base(config: Any) -> None:
    """With an SFT adapter as ``--model``, ``τ = s·B·A`` is taken against the adapter's own
    base; a ``--base`` given as well must be that model (same fingerprint), else refused."""
    from omotool.io.adapters import adapter_base
    from omotool.io.reader import ModelReader, fingerprint

    if not config.base:
        return
    own = adapter_base(config.model)
    with ModelReader(config.base) as given, ModelReader(own) as theirs:
        if fingerprint(given) == fingerprint(theirs):
            return
    raise InputError(
        f"--base {config.base} is not the base of the adapter --model {config.model} ({own}, "
        "its base_model_name_or_path): τ comes from the adapter itself (s·B·A); drop --base."
    )


REFERENCE_ADAPTER = "ref"  # the adapter name TRL's trainers compute reference log-probs with


def keep_sft_reference(model: Any) -> None:
    """Make the reference of a run that continues an SFT adapter the SFT policy (base + SFT
    adapter), not the bare base. TRL 1.16's DPO, KTO, GRPO and RLOO trainers, given a
    ``PeftModel`` and no ``ref_model``, copy its adapter into a frozen one named ``"ref"`` and
    compute reference log-probs with it active (with adapters off when there is none, the
    bare base); this adds that copy where a trainer did not, so the reference never falls
    back to the base. Call it before the first step (the adapter still the SFT one)."""
    if REFERENCE_ADAPTER in model.peft_config:
        return
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            copy = model.get_parameter(name.replace(".default.", f".{REFERENCE_ADAPTER}."))
            copy.data.copy_(param.data)
            copy.requires_grad_(False)
    model.set_adapter("default")


def model_config(config: Any, dtype: Any = None) -> Any:
    """TRL's ``ModelConfig`` holding the ``--lora-*`` options (TRL's own names)."""
    from trl import ModelConfig

    model = ModelConfig(
        model_name_or_path=config.model,
        dtype=dtype,
        use_peft=True,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        load_in_4bit=config.load_in_4bit,
    )
    # Set after __post_init__, which turns a one-name list into a string: PEFT reads a string
    # as a regular expression matched against the whole module path (q_proj would match none).
    model.lora_target_modules = target_modules(config)
    return model


def peft_config(config: Any) -> Any:
    """The adapter config TRL builds from the ``--lora-*`` options (``trl.get_peft_config``),
    for the trainer's ``peft_config``; None without ``--lora-r``."""
    if not lora_on(config):
        return None
    from trl import get_peft_config

    return get_peft_config(model_config(config))


def model_load_options(config: Any, dtype: Any) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: the 4-bit quantization (TRL's
    ``get_quantization_config``) with ``--load-in-4bit``, else none."""
    if not (lora_on(config) and config.load_in_4bit):
        return {}
    import os

    from trl import get_quantization_config

    return {  # 4-bit weights load straight onto this process's GPU
        "quantization_config": get_quantization_config(model_config(config, dtype)),
        "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))},
    }


def check_targets(config: Any, model_config: Any) -> None:
    """Refuse ``--lora-target-modules`` that name no module of ``--model`` (whose transformers
    config is ``model_config``), before its weights load: the adapter is built on an empty
    (meta-device) copy of the model, as PEFT would build it."""
    from omotool.io.adapters import is_adapter

    if not lora_on(config) or is_adapter(config.model):  # an adapter's targets are its own
        return
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(model_config)
        try:
            get_peft_model(skeleton, peft_config(config))
        except ValueError as exc:
            raise InputError(
                f"--lora-target-modules {config.lora_target_modules}: {config.model} has no "
                f"such module to adapt ({exc})."
            ) from None


def lora_merging_trainer(trainer_class: type, task_vector: Any, **options: Any) -> type:
    """``trainer_class`` training a LoRA adapter with online merging: the factors step with
    ``OnlineMergingAdamW(method="none")`` (as with ``--merge none``) wrapped in
    ``LoraOnlineMerging``, which merges each adapted module's update with ``task_vector``;
    ``options`` are ``OnlineMergingAdamW``'s (``method``, ``reserve_p``, ..., ``backend``)."""
    from omotool.optim.lora_merging import LoraOnlineMerging, peft_lora_modules
    from omotool.train.trainer import online_merging_trainer

    merge = {key: value for key, value in options.items() if key != "backend"}
    inner = {"method": "none", "backend": options.get("backend", "auto")}

    class LoraOnlineMergingTrainer(online_merging_trainer(trainer_class, None, **inner)):  # type: ignore[misc]
        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                factors = super().create_optimizer(model)
                modules = peft_lora_modules(self.model if model is None else model)
                self.optimizer = LoraOnlineMerging(factors, modules, task_vector, **merge)
            return self.optimizer

    LoraOnlineMergingTrainer.__name__ = f"LoraOnlineMerging{trainer_class.__name__}"
    return LoraOnlineMergingTrainer
