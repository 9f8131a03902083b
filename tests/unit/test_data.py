"""Training data: formats, row checks named by file and line, unpairing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omotool.data import load_examples, read_rows
from omotool.errors import InputError, UsageError

PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
CHAT_PAIR = {
    "prompt": [{"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, suffix) -> None:
    rows = [PAIR, {"prompt": "3+3?", "chosen": "6", "rejected": "7"}]
    path = tmp_path / f"prefs.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        path.write_text("prompt,chosen,rejected\n2+2?,4,5\n3+3?,6,7\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_examples(path, "preference") == rows


def test_conversational_rows_are_accepted(tmp_path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_PAIR])
    assert load_examples(path, "preference") == [CHAT_PAIR]


def test_malformed_json_names_the_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(InputError, match=r"bad.jsonl:3: not valid JSON"):
        load_examples(path, "preference")


def test_missing_field_names_field_line_and_formats(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(InputError) as error:
        load_examples(path, "preference")
    message = str(error.value)
    assert "p.jsonl:2" in message and "'rejected'" in message
    assert "prompt/chosen/rejected or chosen/rejected" in message


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "a", "chosen": None, "rejected": "c"}, "field 'chosen' is null"),
        ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "field 'chosen' is empty"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' is int"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "b", "rejected": "c"}, "role"),
        ({"prompt": [{"content": "x"}], "chosen": "b", "rejected": "c"}, "needs 'role'"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, problem) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, PAIR, row])
    with pytest.raises(InputError, match="p.jsonl:3") as error:
        load_examples(path, "preference")
    assert problem in str(error.value)


def test_csv_and_json_locations(tmp_path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e,e\n")
    with pytest.raises(InputError, match=r"p.csv:3: 'chosen' and 'rejected' are identical"):
        load_examples(path, "preference")
    path = tmp_path / "p.json"
    path.write_text(json.dumps([PAIR, {"prompt": "a"}]))
    with pytest.raises(InputError, match=r"p.json item 1: missing field"):
        load_examples(path, "preference")


def test_empty_dataset_is_an_error(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match="no examples"):
        load_examples(path, "preference")


def test_mixed_formats_are_refused(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {"chosen": "b", "rejected": "c"}])
    with pytest.raises(InputError, match="p.jsonl:2: fields .* differ"):
        load_examples(path, "preference")


def test_kto_takes_unpaired_rows_and_unpairs_pairs(tmp_path) -> None:
    unpaired = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "a", "completion": "c", "label": "false"},
    ]
    path = write_jsonl(tmp_path / "u.jsonl", unpaired)
    assert [e["label"] for e in load_examples(path, "unpaired")] == [True, False]
    pairs = write_jsonl(tmp_path / "p.jsonl", [PAIR])
    assert load_examples(pairs, "unpaired") == [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "2+2?", "completion": "5", "label": False},
    ]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "completion": "b", "label": "maybe"}])
    with pytest.raises(InputError, match="b.jsonl:1: field 'label'"):
        load_examples(bad, "unpaired")


def test_sft_takes_text_messages_or_the_chosen_answer(tmp_path) -> None:
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert load_examples(texts, "language_modeling") == [{"text": "hello"}]
    pairs = write_jsonl(tmp_path / "p.jsonl", [PAIR])
    assert load_examples(pairs, "language_modeling") == [{"prompt": "2+2?", "completion": "4"}]
    chats = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"]}]
    )
    assert load_examples(chats, "language_modeling")[0]["messages"][1]["content"] == "4"


def test_prompt_rows_keep_the_columns_rewards_read(tmp_path) -> None:
    rows = [
        {"prompt": "2+2?", "reference": "4", "topic": "math"},
        {"prompt": CHAT_PAIR["prompt"], "reference": 4, "topic": "math"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_examples(path, "prompt", columns={"reference": "--reward exact"}) == rows
    assert load_examples(write_jsonl(tmp_path / "pairs.jsonl", [PAIR]), "prompt") == [PAIR]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "a"}, r"p.jsonl:2: field 'reference' is missing, but --reward exact reads it"),
        ({"prompt": "a", "reference": None}, r"p.jsonl:2: field 'reference' is null"),
        ({"reference": "1"}, r"p.jsonl:2: missing field 'prompt'"),
        ({"prompt": "", "reference": "1"}, r"p.jsonl:2: field 'prompt' is empty"),
    ],
)
def test_bad_prompt_rows_are_named(tmp_path, row, problem) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine", "reference": "1"}, row])
    with pytest.raises(InputError, match=problem):
        load_examples(path, "prompt", columns={"reference": "--reward exact"})


def test_bad_paths_and_kinds(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        list(read_rows(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="is a folder"):
        list(read_rows(tmp_path))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(InputError, match="unknown data format"):
        list(read_rows(tmp_path / "data.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet"):
        list(read_rows(tmp_path / "broken.parquet"))
    with pytest.raises(UsageError, match="unknown data kind"):
        load_examples(tmp_path / "x.jsonl", "pairs")
    for suffix in (".jsonl", ".json", ".csv"):
        (tmp_path / f"latin1{suffix}").write_bytes(b'{"prompt": "caf\xe9"}\n')
        with pytest.raises(InputError, match="not UTF-8 text"):
            list(read_rows(tmp_path / f"latin1{suffix}"))


def test_hub_name_without_network_is_a_clear_error(tmp_path) -> None:
    # A fresh process: `datasets` reads the offline switches when it is imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")
    code = (
        "from omotool.data import read_rows\n"
        "from omotool.errors import InputError\n"
        "try:\n    list(read_rows('someone/no-such-prefs'))\n"
        "except InputError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "cannot load dataset 'someone/no-such-prefs'" in done.stdout
    assert "local .jsonl" in done.stdout
