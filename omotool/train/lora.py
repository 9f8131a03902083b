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
    """Refuse, before anything loads: an adapter folder as ``--model`` (not yet); a LoRA
    option without ``--lora-r``; LoRA without the
    peft package; with ``--merge dare|ties``, what LoRA merging does not support yet (step-K,
    FSDP, DeepSpeed, 4-bit weights); ``--load-in-4bit`` without CUDA or bitsandbytes."""
    from omotool.io.adapters import adapter_base, is_adapter
    from omotool.train.options import train_options

    if config.model and is_adapter(config.model):
        raise InputError(
            f"--model {config.model} is a LoRA adapter folder: training starts from a whole "
            "model for now. Write the adapter's model first: omotool merge-offline --sft "
            f"{adapter_base(config.model)} --rlhf {config.model} --alpha 1 -o MERGED, then "
            "--model MERGED."
        )
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
    if not lora_on(config):
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
