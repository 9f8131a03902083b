"""The demo's settings per track (``omotool.demo.settings``)."""

from __future__ import annotations

import pytest

from omotool.demo.settings import GRPO_METHODS, settings_for
from omotool.demo.stages import METHODS
from omotool.errors import UsageError


def test_each_track_trains_its_methods_over_its_grids() -> None:
    dpo, grpo = settings_for(False), settings_for(False, track="grpo")
    assert dpo.methods() == tuple(METHODS) and grpo.methods() == GRPO_METHODS
    assert [lr for lr, _ in grpo.grid("adamw")] == list(grpo.grpo_lr_grid)
    assert [lr for lr, _ in grpo.grid("onties")] == list(grpo.grpo_ties_lr_grid)
    assert [lr for lr, _ in dpo.grid("adamw")] == list(dpo.lr_grid)
    for settings in (grpo, settings_for(True, track="grpo")):  # merge-offline sweeps an AdamW run
        assert settings.grpo_merge_lr in [lr for lr, _ in settings.grid("adamw")]
    assert settings_for(True, seeds=2, track="grpo").seeds == 2


def test_an_unknown_track_is_refused() -> None:
    with pytest.raises(UsageError, match="--track 'ppo': choose one of dpo, grpo"):
        settings_for(False, track="ppo")


def test_the_lora_track_trains_adapters_beside_full_adamw() -> None:
    from omotool.demo.stages import LORA_METHODS, run_name

    lora = settings_for(False, track="lora")
    assert lora.methods() == ("adamw", *LORA_METHODS)
    assert lora.grid("adamw") == settings_for(False).grid("adamw")  # the dpo track's runs
    assert [lr for lr, _ in lora.grid("lora-adamw")] == list(lora.lora_lr_grid)
    assert [lr for lr, _ in lora.grid("lora-onties")] == list(lora.lora_ties_lr_grid)
    assert min(lora.lora_lr_grid) > max(lora.lr_grid)  # adapters need larger steps
    assert run_name(1e-3, 1e-3, "lora-ondare") == "lr-0.001-alpha-0.001"
    assert run_name(1e-3, 0.0, "lora-adamw") == "lr-0.001"
