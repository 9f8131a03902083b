"""``omotool delta`` end to end on tiny real models, and every bad input it must explain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omotool.delta import DeltaConfig, compute_delta
from omotool.io import ModelReader, fingerprint
from tests.conftest import leftovers, state_dict_of


def load_tau(folder: Path) -> dict[str, torch.Tensor]:
    reader = ModelReader(folder)
    return {name: reader.get(name) for name in reader.names}


@pytest.mark.parametrize("pair", ["llama_pair", "sharded_pair", "tied_pair", "gpt2_pair"])
def test_delta_equals_state_dict_difference(pair, cli, tmp_path, request) -> None:
    base, sft = request.getfixturevalue(pair)
    out = tmp_path / "tau"
    result = cli("delta", base, sft, "-o", out)
    assert "‖τ‖" in result.output
    tau = load_tau(out)
    base_sd, sft_sd = state_dict_of(base), state_dict_of(sft)
    stored = set(ModelReader(sft).names)
    assert set(tau) == stored  # tied heads are not stored twice
    for name in stored:
        assert torch.equal(tau[name], sft_sd[name] - base_sd[name]), name
    meta = json.loads((out / "omotool.json").read_text())
    assert meta["kind"] == "task_vector"
    assert meta["sft"]["fingerprint"] == fingerprint(ModelReader(sft))
    assert meta["base"]["fingerprint"] == fingerprint(ModelReader(base))
    assert meta["parameters"] == sum(t.numel() for t in tau.values())
    assert meta["config"]["sparsify"] == "none"


def test_delta_json_summary_and_library_agree(llama_pair, cli, tmp_path) -> None:
    base, sft = llama_pair
    result = cli("delta", base, sft, "-o", tmp_path / "a", "--json")
    summary = json.loads(result.stdout)
    tau = load_tau(tmp_path / "a")
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tau.values()))
    assert summary["tau_norm"] == pytest.approx(float(norm), rel=1e-6)
    assert summary["tensors"] == len(tau)
    assert summary["kept_fraction"] == 1.0
    library = compute_delta(DeltaConfig(base=str(base), sft=str(sft), out=str(tmp_path / "b")))
    assert library.tau_norm == pytest.approx(summary["tau_norm"])
    top = summary["top_changes"][0]
    assert top["relative"] == max(c["relative"] for c in summary["top_changes"])


def test_delta_dare_is_seeded_and_rescaled(llama_pair, cli, tmp_path) -> None:
    base, sft = llama_pair
    args = ["--sparsify", "dare", "--density", "0.25", "--seed", "3", "--json"]
    first = json.loads(cli("delta", base, sft, "-o", tmp_path / "a", *args).stdout)
    cli("delta", base, sft, "-o", tmp_path / "b", *args)
    cli("delta", base, sft, "-o", tmp_path / "c", *args[:-2], "4")
    a, b, c = load_tau(tmp_path / "a"), load_tau(tmp_path / "b"), load_tau(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert abs(first["kept_fraction"] - 0.25) < 0.01
    dense = load_tau(cli("delta", base, sft, "-o", tmp_path / "d") and tmp_path / "d")
    name = "model.layers.0.mlp.up_proj.weight"
    kept = a[name] != 0
    assert torch.allclose(a[name][kept], dense[name][kept] / 0.25)
    meta = json.loads((tmp_path / "a" / "omotool.json").read_text())
    assert meta["sparsify"] == {"method": "dare", "density": 0.25, "rescale": "inverse", "seed": 3}


def test_delta_magnitude_keeps_exact_top_fraction(llama_pair, cli, tmp_path) -> None:
    base, sft = llama_pair
    cli("delta", base, sft, "-o", tmp_path / "m", "--sparsify", "magnitude", "--density", "0.1")
    cli("delta", base, sft, "-o", tmp_path / "d")
    sparse, dense = load_tau(tmp_path / "m"), load_tau(tmp_path / "d")
    for name, t in sparse.items():
        k = max(1, int(0.1 * t.numel()))
        assert int((t != 0).sum()) == k
        assert torch.equal(t[t != 0], dense[name][t != 0])
        assert float(dense[name][t == 0].abs().max()) <= float(t[t != 0].abs().min())


def test_delta_dtype_sharding_and_recipe_override(llama_pair, cli, tmp_path) -> None:
    base, sft = llama_pair
    recipe = tmp_path / "delta.yaml"
    recipe.write_text(
        f"base: {base}\nsft: {sft}\nout: {tmp_path / 'r'}\ndtype: bfloat16\nshard-size: 100KB\n"
    )
    cli("delta", "--config", recipe, "--dtype", "float16")
    out = tmp_path / "r"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert all(t.dtype == torch.float16 for t in load_tau(out).values())
    meta = json.loads((out / "omotool.json").read_text())
    assert meta["dtype"] == "float16" and meta["config"]["shard_size"] == "100KB"


def test_delta_default_dtype_follows_sft(tmp_path, cli) -> None:
    from omotool.tiny_models import build_pair

    base, sft = build_pair(tmp_path / "bf16", dtype=torch.bfloat16)
    cli("delta", base, sft, "-o", tmp_path / "t")
    assert {t.dtype for t in load_tau(tmp_path / "t").values()} == {torch.bfloat16}


def test_console_script_and_module_entry(llama_pair, tmp_path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "omotool", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("omotool ")
    exe = Path(sys.executable).parent / "omotool"
    done = subprocess.run(
        [str(exe), "delta", *llama_pair, "-o", str(tmp_path / "t"), "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors"] > 0


# -- bad input: exit code, message, nothing left behind ------------------------------------
def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_weights(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def assert_failed_cleanly(result, out: Path, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)
    assert "Traceback" not in result.output
    assert not out.exists()
    assert leftovers(out.parent) == []


def test_bad_missing_path(llama_pair, cli, tmp_path) -> None:
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], tmp_path / "nope" / "sft", "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, "no such file or folder")


def test_bad_not_a_model(llama_pair, cli, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], tmp_path / "empty", "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, "not a model folder")


def test_bad_tensor_sets_differ(llama_pair, cli, tmp_path) -> None:
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    edit_weights(sft, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], sft, "-o", out, expect=None)
    assert_failed_cleanly(
        result, out, 1, "only in the base model: model.layers.1.mlp.up_proj.weight"
    )


def test_bad_shape_mismatch_names_both_shapes(llama_pair, cli, tmp_path) -> None:
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    name = "model.layers.0.mlp.up_proj.weight"
    edit_weights(sft, lambda t: t.__setitem__(name, t[name][:, :16].contiguous()))
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, f"{name} [128, 16] (SFT) vs [128, 32] (base)")


def test_different_hidden_sizes_are_other_architectures(tmp_path, cli) -> None:
    """Only a vocabulary that grew gets the --vocab-mismatch hint; a hidden size does not."""
    from omotool.tiny_models import build_model

    base = build_model(tmp_path / "base", hidden_size=32)
    sft = build_model(tmp_path / "sft", hidden_size=64)
    out = tmp_path / "t"
    for extra in ((), ("--vocab-mismatch", "truncate")):
        result = cli("delta", base, sft, "-o", out, *extra, expect=None)
        assert_failed_cleanly(result, out, 1, "shapes differ", "different architectures")
        assert "--vocab-mismatch" not in result.output


def test_vocab_rows_added_error_then_truncate(llama_pair, cli, tmp_path) -> None:
    base = llama_pair[0]
    sft = copy_model(llama_pair[1], tmp_path / "sft")

    def add_rows(t):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = torch.cat([t[name], torch.ones(8, t[name].shape[1])])

    edit_weights(sft, add_rows)
    out = tmp_path / "t"
    result = cli("delta", base, sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, "--vocab-mismatch truncate")
    cli("delta", base, sft, "-o", out, "--vocab-mismatch", "truncate")
    tau = load_tau(out)
    base_sd, sft_sd = (
        load_file(str(base / "model.safetensors")),
        load_file(str(sft / "model.safetensors")),
    )
    emb = "model.embed_tokens.weight"
    assert torch.equal(tau[emb], sft_sd[emb][: base_sd[emb].shape[0]] - base_sd[emb])
    meta = json.loads((out / "omotool.json").read_text())
    assert meta["truncated"][emb] == [328, 320]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_nan_or_inf_in_input(llama_pair, cli, tmp_path, bad) -> None:
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    name = "model.layers.1.self_attn.v_proj.weight"
    edit_weights(sft, lambda t: t[name].view(-1).__setitem__(5, bad))
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, f"tensor {name} holds NaN or inf")


def test_bad_integer_tensor_differs(llama_pair, cli, tmp_path) -> None:
    base = copy_model(llama_pair[0], tmp_path / "base")
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    edit_weights(base, lambda t: t.__setitem__("q.qweight", torch.zeros(4, dtype=torch.int32)))
    edit_weights(sft, lambda t: t.__setitem__("q.qweight", torch.ones(4, dtype=torch.int32)))
    out = tmp_path / "t"
    result = cli("delta", base, sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, "non-floating tensor q.qweight differs")


def test_equal_integer_tensor_is_skipped(llama_pair, cli, tmp_path) -> None:
    base = copy_model(llama_pair[0], tmp_path / "base")
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    for folder in (base, sft):
        edit_weights(folder, lambda t: t.__setitem__("pos_ids", torch.arange(4)))
    summary = json.loads(cli("delta", base, sft, "-o", tmp_path / "t", "--json").stdout)
    assert summary["skipped"] == ["pos_ids"]


def test_bad_dtype_mismatch_float_vs_int(llama_pair, cli, tmp_path) -> None:
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    name = "model.norm.weight"
    edit_weights(sft, lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, f"tensor {name} is torch.int32", "dequantize")


def test_bad_corrupted_file(llama_pair, cli, tmp_path) -> None:
    sft = copy_model(llama_pair[1], tmp_path / "sft")
    file = sft / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, "corrupted or truncated")


def test_bad_pickle_without_flag(llama_pair, cli, tmp_path) -> None:
    sft = tmp_path / "sft"
    sft.mkdir()
    shutil.copy(llama_pair[1] / "config.json", sft)
    torch.save(load_file(str(llama_pair[1] / "model.safetensors")), sft / "pytorch_model.bin")
    out = tmp_path / "t"
    result = cli("delta", llama_pair[0], sft, "-o", out, expect=None)
    assert_failed_cleanly(result, out, 1, "pickle", "--allow-pickle")
    cli("delta", llama_pair[0], sft, "-o", out, "--allow-pickle")
    assert set(load_tau(out)) == set(ModelReader(llama_pair[1]).names)


def test_bad_output_exists_is_kept(llama_pair, cli, tmp_path) -> None:
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("delta", *llama_pair, "-o", out, expect=1)
    assert "exists" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    cli("delta", *llama_pair, "-o", out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "omotool.json").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--density", "0"], "density must be in (0, 1]"),
        (["--density", "0.5"], "density needs a sparsifier"),
        (["--sparsify", "ties"], "Unknown sparsifier 'ties'"),
        (["--dtype", "int8"], "dtype 'int8'"),
        (["--shard-size", "lots"], "size 'lots' is not understood"),
        (["--rescale", "l2", "--sparsify", "dare"], "rescale 'l2'"),
    ],
)
def test_bad_options_are_usage_errors(llama_pair, cli, tmp_path, args, needle) -> None:
    out = tmp_path / "t"
    result = cli("delta", *llama_pair, "-o", out, *args, expect=None)
    assert_failed_cleanly(result, out, 2, needle)


def test_missing_output_option_is_usage_error(llama_pair, cli) -> None:
    result = cli("delta", *llama_pair, expect=2)
    assert "missing required option(s): out" in result.output


def test_debug_shows_traceback(llama_pair, cli, tmp_path) -> None:
    result = cli(
        "--debug", "delta", llama_pair[0], tmp_path / "x" / "y", "-o", tmp_path / "t", expect=1
    )
    assert result.exception is not None and type(result.exception).__name__ == "InputError"


def test_base_tied_sft_untied_lines_up(tied_pair, cli, tmp_path) -> None:
    base, tied_sft = tied_pair
    sft = copy_model(tied_sft, tmp_path / "sft")
    edit_weights(sft, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] * 2))
    config = json.loads((sft / "config.json").read_text())
    (sft / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    cli("delta", base, sft, "-o", tmp_path / "t")
    tau = load_tau(tmp_path / "t")
    embed_base = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
    embed_sft = load_file(str(sft / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(tau["lm_head.weight"], 2 * embed_sft - embed_base)


def test_hub_id_unreachable_is_a_clear_error(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "omotool",
            "delta",
            "no-such-org/base",
            "no-such-org/sft",
            "-o",
            str(tmp_path / "t"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 1
    assert "could not be fetched from the Hugging Face Hub" in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_mid_write_leaves_nothing(tmp_path) -> None:
    from omotool.tiny_models import build_pair

    base, sft = build_pair(
        tmp_path / "m", hidden_size=512, layers=4, vocab_size=8000, intermediate_size=1024
    )
    out = tmp_path / "t"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "omotool",
            "delta",
            str(base),
            str(sft),
            "-o",
            str(out),
            "--shard-size",
            "1MB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".t.omotool-tmp-*/*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "delta ended before a shard"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and leftovers(tmp_path) == []
