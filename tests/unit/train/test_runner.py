"""``omotool.train.runner``: the resumption's cut of the run's logs (``_truncate_metrics``) and
the steps a batch of sampled completions lasts (``generation_buffer_steps``: resume points)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from omotool.train.runner import _truncate_metrics, generation_buffer_steps


def test_a_resumed_run_keeps_the_lines_up_to_its_checkpoint(tmp_path) -> None:
    path = tmp_path / "completions.jsonl"
    rows = [{"step": step, "completion": str(i)} for step in (1, 2, 3) for i in range(2)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text + '{"step": 4, "compl')  # a line cut short by a killed run
    _truncate_metrics(path, 2)
    assert path.read_text() == "".join(json.dumps(row) + "\n" for row in rows[:4])


def test_nothing_kept_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "completions.jsonl"
    path.write_text('{"step": 3}\n')
    _truncate_metrics(path, 2)
    assert not path.exists()
    _truncate_metrics(path, 2)  # nothing to cut


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
