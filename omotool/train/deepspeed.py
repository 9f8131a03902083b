"""``omotool train --deepspeed``: the DeepSpeed config named, its checks, and the record a
resumption is checked against.

``--deepspeed`` takes ``zero1``, ``zero2`` or ``zero3`` (the configs in ``deepspeed_configs/``
next to this module, shipped in the wheel) or a JSON/YAML file, and hands the mapping to TRL's
``deepspeed`` field (transformers then builds the optimizer with ``Trainer.create_optimizer``,
since the config has no ``optimizer`` block). DeepSpeed ZeRO steps that optimizer on flat
partitions of the parameters it swaps into the optimizer's groups; with ``--merge none`` that is
AdamW, elementwise, so the partitions need no names; with ``--merge dare|ties`` the trainer
hands the optimizer the partitions' runs after ``deepspeed.initialize``
(``OnlineMergingAdamW.attach_zero_runs``), and each run is merged as its part of the whole
parameter. What cannot run so is refused before anything loads (``check_deepspeed``): the l1
rescale or the Triton backend with merging, another optimizer or schedule, an offloaded
optimizer, FSDP as well, a ZeRO-3 config that would save partitions as the final model, and a
run without a launcher.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import yaml

from omotool.errors import InputError, UsageError
from omotool.train.options import TrainOptions

DEEPSPEED_FILE = "deepspeed.json"  # in the run folder: what a resumption must match


# --deepspeed zero1 / zero2 / zero3: the configs shipped inside the package (package data, so
# an installed wheel has them), omotool/train/deepspeed_configs/.
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "deepspeed_configs"
DEEPSPEED_STAGES = ("zero1", "zero2", "zero3")


def deepspeed_config(config: TrainOptions) -> dict[str, Any] | None:
    """The DeepSpeed config ``--deepspeed`` names (a shipped stage or a JSON/YAML file), as the
    mapping handed to TRL's ``deepspeed`` field; None without ``--deepspeed``."""
    if config.deepspeed is None:
        return None
    name = config.deepspeed
    path = DEEPSPEED_CONFIGS / f"{name}.json" if name in DEEPSPEED_STAGES else Path(name)
    try:
        loaded = yaml.safe_load(path.read_text())  # YAML reads JSON too
    except OSError as exc:
        raise InputError(
            f"--deepspeed {name}: cannot read {path} ({exc.strerror or exc}); give a DeepSpeed "
            f"JSON/YAML config or one of {', '.join(DEEPSPEED_STAGES)}."
        ) from exc
    except yaml.YAMLError as exc:
        raise InputError(f"--deepspeed {name}: {path} is not valid JSON or YAML ({exc}).") from exc
    if not isinstance(loaded, dict):
        raise InputError(f"--deepspeed {name}: {path} must hold a mapping (a DeepSpeed config).")
    return loaded


def deepspeed_stage(settings: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it has none)."""
    return int((settings.get("zero_optimization") or {}).get("stage", 0))


def check_deepspeed(config: TrainOptions) -> None:
    """Refuse a ``--deepspeed`` run that would not train with omotool's optimizer as given:
    another optimizer or schedule from the DeepSpeed config, an offloaded optimizer (accelerate
    would replace the client optimizer by DeepSpeedCPUAdam), FSDP as well, or what online
    merging does not do on DeepSpeed's flat partitions (the l1 rescale, the Triton backend)."""
    settings = deepspeed_config(config)
    if settings is None:
        return
    given = f"--deepspeed {config.deepspeed}"
    if config.fsdp:
        raise UsageError(f"{given} and --fsdp both shard the model: choose one of them.")
    if config.merge != "none" and config.rescale == "l1":
        raise UsageError(
            f"--merge {config.merge} --rescale l1 with {given}: the l1 rescale is not "
            "supported on DeepSpeed's partitions; use --rescale inverse or none."
        )
    if config.merge != "none" and config.optimizer_backend == "triton":
        raise UsageError(
            f"--merge {config.merge} --optimizer-backend triton with {given}: the Triton "
            "backend does not merge DeepSpeed's partitions yet; use --optimizer-backend torch."
        )
    if "optimizer" in settings:
        raise UsageError(
            f"{given} has an optimizer block: omotool provides the optimizer: remove the "
            "optimizer block (--lr and --weight-decay set it)."
        )
    if "scheduler" in settings:
        raise UsageError(
            f"{given} has a scheduler block: omotool sets the schedule: remove the scheduler "
            "block (--lr-scheduler and --warmup-steps set it)."
        )
    zero = settings.get("zero_optimization") or {}
    if str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() != "none":
        raise UsageError(
            f"{given} has zero_optimization.offload_optimizer: an offloaded optimizer would be "
            "replaced by DeepSpeed's CPU Adam, not omotool's; it is not supported yet, remove "
            "offload_optimizer."
        )
    if deepspeed_stage(settings) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise UsageError(
            f"{given} is ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the final "
            "model would be saved as partitions, not as a model folder; set it to true."
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"{given} needs DeepSpeed: pip install 'omotool[deepspeed]'")
    if "WORLD_SIZE" not in os.environ:
        raise UsageError(
            f"{given} partitions the run over processes a launcher starts: run "
            "`torchrun --nproc_per_node N -m omotool train ...` (N=1 for one process), or "
            "`accelerate launch`."
        )


def init_deepspeed_comm() -> None:
    """DeepSpeed's communication over the process group accelerate set up: ZeRO-3 partitions
    the model as it loads (``deepspeed.zero.Init``), which reads the world size from it, and
    accelerate initialises it only for GPU processes."""
    import deepspeed

    deepspeed.init_distributed()


def deepspeed_record(config: TrainOptions) -> dict[str, Any] | None:
    """The DeepSpeed config a run uses, its ZeRO stage and its number of processes (saved in
    ``OUT/deepspeed.json`` when the run starts, and in ``omotool.json``); None without."""
    settings = deepspeed_config(config)
    if settings is None:
        return None
    return {
        "config": config.deepspeed,
        "zero_stage": deepspeed_stage(settings),
        "world_size": world_size(),
        "settings": settings,
    }


def world_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_deepspeed_resume(config: TrainOptions, checkpoint: Path) -> None:
    """Refuse to resume a DeepSpeed run on another number of processes or under another ZeRO
    stage (as ``OUT/deepspeed.json`` recorded them): its optimizer state is partitioned per
    process, and under ZeRO-3 the model too."""
    current = deepspeed_record(config)
    if current is None:
        return
    if not any(checkpoint.glob("global_step*")):
        raise InputError(
            f"--resume --deepspeed {config.deepspeed}: {checkpoint} holds no DeepSpeed "
            "checkpoint (no global_step* folder)."
        )
    path = checkpoint.parent / DEEPSPEED_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"--resume: cannot read {path}, the run's DeepSpeed record ({exc})."
        ) from exc
    if saved["world_size"] != current["world_size"]:
        raise UsageError(
            f"--resume: the run in {checkpoint.parent} was made by {saved['world_size']} "
            f"DeepSpeed processes, this one has {current['world_size']}; resume on "
            f"{saved['world_size']} processes (the optimizer state is partitioned per process)."
        )
    if saved["zero_stage"] != current["zero_stage"]:
        raise UsageError(
            f"--resume: the run in {checkpoint.parent} was made under ZeRO-{saved['zero_stage']}"
            f", --deepspeed {config.deepspeed} is ZeRO-{current['zero_stage']}; resume under "
            "the run's own ZeRO stage."
        )
