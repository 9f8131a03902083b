"""The demo's settings per track."""

from __future__ import annotations

import pytest

from omotool.demo.pipeline import GRPO_METHODS, METHODS, settings_for
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
