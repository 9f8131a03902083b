"""``omotool merge-offline`` on tiny real models: each method against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omotool.merging.consensus import elect_sign
from omotool.tiny_models import perturbed, save_model
from tests.conftest import leftovers, state_dict_of


@pytest.fixture(scope="module")
def triple(llama_pair, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, sft, rlhf): the RLHF model is the SFT model moved a little further."""
    from transformers import AutoModelForCausalLM

    base, sft = llama_pair
    rlhf = tmp_path_factory.mktemp("rlhf") / "rlhf"
    save_model(perturbed(AutoModelForCausalLM.from_pretrained(str(sft)), 0.01, seed=7), rlhf)
    return base, sft, rlhf


def sd(path: Path) -> dict[str, torch.Tensor]:
    return state_dict_of(path)


@pytest.mark.parametrize("alpha", [0.3, 1.5])
def test_linear_is_interpolation(triple, cli, tmp_path, alpha) -> None:
    _, sft, rlhf = triple
    cli("merge-offline", "--sft", sft, "--rlhf", rlhf, "--alpha", alpha, "-o", tmp_path / "m")
    merged, a, b = sd(tmp_path / "m"), sd(sft), sd(rlhf)
    for name in a:
        assert torch.allclose(merged[name], a[name] + alpha * (b[name] - a[name]), atol=1e-6)
    meta = json.loads((tmp_path / "m" / "omotool.json").read_text())
    assert meta["alpha"] == alpha and (meta["note"] is not None) == (alpha > 1)


def test_alpha_zero_and_one_give_the_inputs_back_exactly(triple, cli, tmp_path) -> None:
    _, sft, rlhf = triple
    cli("merge-offline", "--sft", sft, "--rlhf", rlhf, "--alpha", "0,1", "-o", tmp_path / "s")
    for alpha, source in (("0", sft), ("1", rlhf)):
        merged, expected = sd(tmp_path / "s" / f"alpha-{alpha}"), sd(source)
        assert all(torch.equal(merged[n], expected[n]) for n in expected)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_sweep_equals_separate_runs(triple, cli, tmp_path, method) -> None:
    base, sft, rlhf = triple
    extra = ["--base", base, "--density", "0.5"] if method != "linear" else []
    common = ["--sft", sft, "--rlhf", rlhf, "--method", method, *extra]
    cli("merge-offline", *common, "--alpha", "0.1,0.7", "-o", tmp_path / "sweep")
    for alpha in ("0.1", "0.7"):
        cli("merge-offline", *common, "--alpha", alpha, "-o", tmp_path / alpha)
        one, swept = sd(tmp_path / alpha), sd(tmp_path / "sweep" / f"alpha-{alpha}")
        assert all(torch.equal(one[n], swept[n]) for n in one)


def direct_ties(base, a, b, weights, density):
    out = {}
    for name in base:
        deltas = []
        for model in (a, b):
            d = model[name] - base[name]
            k = max(1, int(density * d.numel()))
            order = torch.argsort(d.abs().flatten(), descending=True, stable=True)
            mask = torch.zeros(d.numel(), dtype=torch.bool)
            mask[order[:k]] = True
            deltas.append(d * mask.view(d.shape))
        w = torch.tensor(weights).view(-1, *([1] * deltas[0].dim()))
        weighted = torch.stack(deltas) * w
        agree = weighted.sign() == elect_sign(weighted)
        total = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor.abs() < 1e-8] = 1
        out[name] = base[name] + total / divisor
    return out


def test_ties_and_task_arithmetic_match_direct_computation(triple, cli, tmp_path) -> None:
    base, sft, rlhf = triple
    cli(
        "merge-offline",
        "--sft",
        sft,
        "--rlhf",
        rlhf,
        "--base",
        base,
        "--method",
        "ties",
        "--density",
        "0.3",
        "--alpha",
        "0.4",
        "-o",
        tmp_path / "t",
    )
    cli(
        "merge-offline",
        "--sft",
        sft,
        "--rlhf",
        rlhf,
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--alpha",
        "0.4",
        "-o",
        tmp_path / "ta",
    )
    b, a, r = sd(base), sd(sft), sd(rlhf)
    expected = direct_ties(b, a, r, [0.6, 0.4], 0.3)
    merged = sd(tmp_path / "t")
    for name in b:
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name
    arithmetic = sd(tmp_path / "ta")
    for name in b:
        direct = b[name] + 0.6 * (a[name] - b[name]) + 0.4 * (r[name] - b[name])
        assert torch.allclose(arithmetic[name], direct, atol=1e-6), name


def test_dare_linear_full_density_is_task_arithmetic_and_unbiased_in_law(triple, cli, tmp_path):
    base, sft, rlhf = triple
    common = ["--sft", sft, "--rlhf", rlhf, "--base", base, "--alpha", "0.5"]
    cli("merge-offline", *common, "--method", "task_arithmetic", "-o", tmp_path / "ta")
    cli("merge-offline", *common, "--method", "dare_linear", "-o", tmp_path / "d1")
    cli(
        "merge-offline",
        *common,
        "--method",
        "dare_linear",
        "--density",
        "0.5",
        "-o",
        tmp_path / "d5",
    )
    ta, d1, d5, b = sd(tmp_path / "ta"), sd(tmp_path / "d1"), sd(tmp_path / "d5"), sd(base)
    assert all(torch.allclose(ta[n], d1[n], atol=1e-6) for n in ta)
    name = "model.layers.0.mlp.up_proj.weight"
    # E[F_R(τ)] = τ: the mean shift equals task arithmetic's within sampling error.
    assert abs(float((d5[name] - b[name]).mean() - (ta[name] - b[name]).mean())) < 2e-3
    # Both deltas dropped (probability 1/4): the entry stays at the base value.
    both_dropped = (d5[name] - b[name]).abs() < 1e-12
    assert abs(float(both_dropped.float().mean()) - 0.25) < 0.05


def test_merged_model_loads_and_generates(triple, cli, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, sft, rlhf = triple
    cli(
        "merge-offline",
        "--sft",
        sft,
        "--rlhf",
        rlhf,
        "--dtype",
        "bfloat16",
        "--shard-size",
        "100KB",
        "-o",
        tmp_path / "m",
    )
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert next(model.parameters()).dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    ids = tokenizer("one two", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


def test_tied_models_merge(tied_pair, cli, tmp_path) -> None:
    base, sft = tied_pair
    cli("merge-offline", "--sft", base, "--rlhf", sft, "--alpha", "0.5", "-o", tmp_path / "m")
    merged, a, b = sd(tmp_path / "m"), sd(base), sd(sft)
    assert torch.allclose(merged["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--alpha", "0.3,abc"], 2, "alpha 'abc' is not a number"),
        (["--method", "ties"], 2, "give --base BASE"),
        (["--method", "tiez", "--base", "X"], 2, "Did you mean 'ties'"),
        (["--method", "ties", "--base", "B", "--density", "1.5"], 2, "density must be in (0, 1]"),
        (["--density", "0.5"], 2, "does not sparsify"),
    ],
)
def test_bad_options(triple, cli, tmp_path, args, code, needle) -> None:
    base, sft, rlhf = triple
    args = [str(base) if a == "B" else a for a in args]
    result = cli(
        "merge-offline", "--sft", sft, "--rlhf", rlhf, *args, "-o", tmp_path / "m", expect=code
    )
    assert needle in result.output
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_architectures_that_differ_are_named(triple, gpt2_pair, cli, tmp_path) -> None:
    _, sft, _ = triple
    result = cli(
        "merge-offline", "--sft", sft, "--rlhf", gpt2_pair[1], "-o", tmp_path / "m", expect=1
    )
    assert "only in the SFT model" in result.output and "only in the RLHF model" in result.output
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_existing_output_is_kept_without_overwrite(triple, cli, tmp_path) -> None:
    _, sft, rlhf = triple
    (tmp_path / "m").mkdir()
    result = cli(
        "merge-offline",
        "--sft",
        sft,
        "--rlhf",
        rlhf,
        "--alpha",
        "0.2,0.4",
        "-o",
        tmp_path / "m",
        expect=1,
    )
    assert "--overwrite" in result.output and list((tmp_path / "m").iterdir()) == []
    cli(
        "merge-offline",
        "--sft",
        sft,
        "--rlhf",
        rlhf,
        "--alpha",
        "0.2,0.4",
        "-o",
        tmp_path / "m",
        "--overwrite",
    )
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["alpha-0.2", "alpha-0.4"]


def test_layer_alphas_merge_each_block_with_its_alpha(triple, cli, tmp_path) -> None:
    _, sft, rlhf = triple
    result = cli(
        "merge-offline",
        "--sft",
        sft,
        "--rlhf",
        rlhf,
        "--alpha",
        "0.5",
        "--layer-alpha",
        "0:0.0,1-:1.0,embed:0.25",
        "-o",
        tmp_path / "m",
    )
    merged, a, b = sd(tmp_path / "m"), sd(sft), sd(rlhf)
    expected_alpha = {"model.layers.0.": 0.0, "model.layers.1.": 1.0, "model.embed_tokens": 0.25}
    for name in a:
        alpha = next((v for k, v in expected_alpha.items() if name.startswith(k)), 0.5)
        assert torch.allclose(merged[name], a[name] + alpha * (b[name] - a[name]), atol=1e-6)
    assert "model.norm.weight" in " ".join(result.output.split())
    meta = json.loads((tmp_path / "m" / "omotool.json").read_text())
    assert set(meta["unmatched"]) == {"model.norm.weight", "lm_head.weight"}
