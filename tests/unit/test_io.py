"""Model-file I/O: lazy reads (single, sharded, tied, pickle), atomic sharded writes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omotool.errors import InputError, OutputError, UsageError
from omotool.io import SAFE_INDEX, ModelReader, ModelWriter, check_output, fingerprint
from tests.conftest import leftovers, state_dict_of


def test_reads_single_file_lazily_with_names_shapes_dtypes(llama_pair) -> None:
    base, _ = llama_pair
    reader = ModelReader(base)
    expected = load_file(str(base / "model.safetensors"))
    assert set(reader.names) == set(expected)
    for name, tensor in expected.items():
        assert reader.shape(name) == tuple(tensor.shape)
        assert reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.get(name), tensor)
    assert reader.aliases == {}
    assert reader.numel() == sum(t.numel() for t in expected.values())
    for ask in (reader.get, reader.shape, reader.dtype):
        with pytest.raises(InputError, match="has no tensor 'nope'"):
            ask("nope")


def test_reads_sharded_model_through_index(sharded_pair) -> None:
    base, _ = sharded_pair
    index = json.loads((base / SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = ModelReader(base)
    reference = state_dict_of(base)
    assert set(reader.names) == set(index["weight_map"])
    for name in reader.names:
        assert torch.equal(reader.get(name), reference[name])


def test_stale_shard_not_in_index_is_ignored(sharded_pair, tmp_path) -> None:
    base, _ = sharded_pair
    copy = tmp_path / "m"
    shutil.copytree(base, copy)
    save_file({"stale.weight": torch.ones(2)}, str(copy / "model-00099-of-00099.safetensors"))
    assert "stale.weight" not in ModelReader(copy)


def test_tied_model_resolves_lm_head_to_embeddings(tied_pair) -> None:
    base, _ = tied_pair
    reader = ModelReader(base)
    assert "lm_head.weight" not in reader.names
    assert reader.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" in reader
    assert torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight"))


def test_gpt2_tied_names(gpt2_pair) -> None:
    reader = ModelReader(gpt2_pair[0])
    assert reader.aliases == {"lm_head.weight": "transformer.wte.weight"}


def test_not_a_model_and_missing_path(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not a model folder"):
        ModelReader(tmp_path)
    with pytest.raises(InputError, match="no such file or folder"):
        ModelReader(tmp_path / "missing" / "model")


def test_index_naming_missing_shard(sharded_pair, tmp_path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(sharded_pair[0], copy)
    next(copy.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(InputError, match="missing"):
        ModelReader(copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(llama_pair, tmp_path, damage) -> None:
    copy = tmp_path / "m"
    shutil.copytree(llama_pair[0], copy)
    file = copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 9)
    with pytest.raises(InputError, match="corrupted or truncated"):
        reader = ModelReader(copy)
        for name in reader.names:
            reader.get(name)


def _pickle_model(source: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    torch.save(load_file(str(source / "model.safetensors")), out / "pytorch_model.bin")
    return out


def test_pickle_refused_without_flag_and_loaded_with_it(llama_pair, tmp_path) -> None:
    folder = _pickle_model(llama_pair[0], tmp_path / "bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        ModelReader(folder)
    reader = ModelReader(folder, allow_pickle=True)
    assert reader.format == "pickle"
    assert fingerprint(reader) == fingerprint(ModelReader(llama_pair[0]))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_never_executed(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _RunsCode()}, f)
    with pytest.raises(InputError, match="weights-only"):
        ModelReader(folder, allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()


def test_fingerprint_ignores_sharding_and_sees_weight_changes(llama_pair, sharded_pair, tmp_path):
    base, sft = llama_pair
    assert fingerprint(ModelReader(base)) != fingerprint(ModelReader(sft))
    resharded = tmp_path / "resharded"
    reader = ModelReader(base)
    with ModelWriter(resharded, reader.layout(), shard_size=50_000) as writer:
        for name, tensor in reader.tensors():
            writer.add(name, tensor)
    assert fingerprint(ModelReader(resharded)) == fingerprint(ModelReader(base))


def test_writer_shards_index_and_loads_with_transformers(llama_pair, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, sft = llama_pair
    out = tmp_path / "out"
    reader = ModelReader(sft)
    with ModelWriter(out, reader.layout(), shard_size=60_000) as writer:
        for name, tensor in reversed(list(reader.tensors())):  # any order
            writer.add(name, tensor)
        copied = writer.copy_model_files(sft)
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(copied)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / SAFE_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_file(str(sft / "model.safetensors")).values()
    )
    reference = state_dict_of(sft)
    loaded = state_dict_of(out)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in prompt
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tokenizer("one two", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_writer_single_shard_has_no_index(tmp_path) -> None:
    layout = {"a": ((2, 3), torch.bfloat16), "b": ((), torch.float32)}
    with ModelWriter(tmp_path / "o", layout) as writer:
        writer.add("a", torch.arange(6, dtype=torch.bfloat16).view(2, 3))
        writer.add("b", torch.tensor(3.0))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert loaded["a"].dtype == torch.bfloat16 and loaded["b"].shape == ()


ONE = {"a": ((3,), torch.float32)}


def test_writer_checks_layout_and_completeness(tmp_path) -> None:
    layout = {"a": ((3,), torch.float32), "b": ((2,), torch.float32)}
    with pytest.raises(UsageError, match="never written"), ModelWriter(tmp_path / "o", layout) as w:
        w.add("a", torch.ones(3))
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    with ModelWriter(tmp_path / "p", layout) as writer:
        with pytest.raises(InputError, match="layout says"):
            writer.add("a", torch.ones(4))
        with pytest.raises(UsageError, match="not in the writer's layout"):
            writer.add("c", torch.ones(3))
        writer.add("a", torch.ones(3))
        with pytest.raises(UsageError, match="twice"):
            writer.add("a", torch.ones(3))
        writer.add("b", torch.zeros(2))
    assert torch.equal(load_file(str(tmp_path / "p" / "model.safetensors"))["b"], torch.zeros(2))


def test_writer_failure_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "o"
    with pytest.raises(RuntimeError), ModelWriter(out, ONE) as writer:
        writer.add("a", torch.ones(3))
        raise RuntimeError("crash mid-write")
    assert not out.exists() and leftovers(tmp_path) == []


def test_writer_keyboard_interrupt_keeps_old_output(tmp_path) -> None:
    out = tmp_path / "o"
    with ModelWriter(out, ONE) as writer:
        writer.add("a", torch.ones(3))
    with pytest.raises(KeyboardInterrupt), ModelWriter(out, ONE, overwrite=True) as writer:
        writer.add("a", torch.zeros(3))
        raise KeyboardInterrupt
    assert torch.equal(load_file(str(out / "model.safetensors"))["a"], torch.ones(3))
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_whole_folder(tmp_path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    with pytest.raises(OutputError, match="--overwrite"):
        ModelWriter(out, ONE)
    with ModelWriter(out, ONE, overwrite=True) as writer:
        writer.add("a", torch.ones(3))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_output_may_not_be_an_input(tmp_path) -> None:
    with pytest.raises(OutputError, match="is the input"):
        check_output(tmp_path / "m", overwrite=True, inputs=[tmp_path / "m"])
    with pytest.raises(OutputError, match="is the input"):
        check_output(tmp_path, overwrite=True, inputs=[tmp_path / "m"])


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (needs root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_reports_and_leaves_nothing(tiny_disk) -> None:
    out = tiny_disk / "o"
    layout = {f"t{i}": ((64 * 1024,), torch.float32) for i in range(8)}
    with pytest.raises(OutputError, match="no space left"), ModelWriter(out, layout) as writer:
        for i in range(8):
            writer.add(f"t{i}", torch.ones(64 * 1024))  # 256 KB each: 2 MB in all
    assert not out.exists() and leftovers(tiny_disk) == []
