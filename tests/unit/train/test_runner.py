"""``omotool.train.runner``: the steps a batch of sampled completions lasts (resume points)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from omotool.train.runner import generation_buffer_steps


@pytest.mark.parametrize(
    ("steps_per_generation", "num_iterations", "grad_accum", "steps"),
    [
        (1, 1, 1, 1),  # sampled every step: every checkpoint is a resume point
        (1, 2, 1, 2),
        (2, 2, 2, 2),  # TRL's default: steps_per_generation = grad_accum
        (4, 1, 2, 2),
        (1, 3, 2, 3),  # micro-batches 3, 6, ...: optimizer steps 3, 6, ... (grad_accum 2)
        (1, 1, 2, 1),
    ],
)
def test_generation_buffer_steps(steps_per_generation, num_iterations, grad_accum, steps) -> None:
    arguments = SimpleNamespace(
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
        gradient_accumulation_steps=grad_accum,
    )
    assert generation_buffer_steps(arguments) == steps


def test_the_dpo_family_buffers_nothing() -> None:
    assert generation_buffer_steps(SimpleNamespace(gradient_accumulation_steps=4)) == 1
