"""The resumption's cut of the run's logs (``omotool.train.runner._truncate_metrics``)."""

from __future__ import annotations

import json

from omotool.train.runner import _truncate_metrics


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
