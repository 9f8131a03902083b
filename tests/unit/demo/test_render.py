"""The demo's figures in the docs are the render of the committed results file."""

from __future__ import annotations

from pathlib import Path

import pytest

from omotool.demo.render import (
    DOCUMENTS,
    RESULTS,
    load_results,
    render_sections,
    render_text,
    stale_documents,
)
from omotool.errors import InputError

ROOT = Path(__file__).resolve().parents[3]


def test_docs_are_the_render_of_the_committed_results() -> None:
    assert stale_documents(ROOT) == [], "run `python scripts/render_docs.py`"


def test_committed_results_say_where_they_came_from() -> None:
    made = load_results(ROOT / RESULTS)["provenance"]
    for key in ("omotool", "commit", "command", "threads", "cpu", "date", "seconds"):
        assert made[key] not in (None, ""), key
    assert made["command"].startswith("omotool demo")


def test_render_replaces_only_the_marked_section() -> None:
    results = render_sections(ROOT)
    text = "before\n<!-- demo:summary:begin -->\nstale 0.999\n<!-- demo:summary:end -->\nafter\n"
    rendered = render_text(text, ("summary",), results, "x.md")
    assert rendered.startswith("before\n<!-- demo:summary:begin -->\n")
    assert rendered.endswith("<!-- demo:summary:end -->\nafter\n")
    assert "stale 0.999" not in rendered and "| AdamW |" in rendered
    assert render_text(rendered, ("summary",), results, "x.md") == rendered
    with pytest.raises(InputError, match="no <!-- demo:details:begin/end --> markers"):
        render_text(text, ("details",), results, "x.md")


def test_every_document_has_its_markers() -> None:
    for name, sections in DOCUMENTS.items():
        text = (ROOT / name).read_text(encoding="utf-8")
        for section in sections:
            assert f"<!-- demo:{section}:begin -->" in text, name


def test_cost_names_each_committed_run_with_its_seconds() -> None:
    cost = render_sections(ROOT)["cost"]
    for path in sorted((ROOT / RESULTS.parent).glob("*.json")):
        made = load_results(path)["provenance"]
        assert f"`{made['command']}`" in cost and f"{made['seconds']:.0f} s" in cost, path.name


def test_lora_sections_say_how_to_make_a_missing_results_file(tmp_path) -> None:
    import shutil

    from omotool.demo.render import GRPO_RESULTS

    for path in (RESULTS, GRPO_RESULTS):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    sections = render_sections(tmp_path)
    for name in ("lora-details", "lora-summary"):
        assert "Not made yet: `omotool demo --track lora" in sections[name]
    assert "LoRA track" not in sections["cost"]
