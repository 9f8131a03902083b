"""The small on-disk helpers of ``omotool.io.formats``."""

from __future__ import annotations

import json

from omotool.io.formats import write_jsonl


def test_write_jsonl_writes_one_object_a_line_and_leaves_nothing_aside(tmp_path) -> None:
    rows = [{"prompt": "What is 2 + 3?", "reference": "5"}, {"prompt": "é", "n": 1}]
    target = tmp_path / "rows.jsonl"
    write_jsonl(target, iter(rows))  # any iterable, read once
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no partial file left
