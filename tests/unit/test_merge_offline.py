"""Layer-wise alphas: parsing and matching tensor names to transformer blocks."""

from __future__ import annotations

import pytest

from omotool.errors import InputError, UsageError
from omotool.merge_offline import LayerAlphas, MergeConfig


def test_ranges_embed_and_head_on_llama_names() -> None:
    layers = LayerAlphas.parse("0-9:0.2,10-19:0.5,20-:0.8,embed:0.1,head:0.9")
    assert layers.alpha_for("model.layers.0.self_attn.q_proj.weight") == 0.2
    assert layers.alpha_for("model.layers.9.mlp.down_proj.weight") == 0.2
    assert layers.alpha_for("model.layers.10.input_layernorm.weight") == 0.5
    assert layers.alpha_for("model.layers.31.mlp.up_proj.weight") == 0.8
    assert layers.alpha_for("model.embed_tokens.weight") == 0.1
    assert layers.alpha_for("lm_head.weight") == 0.9
    assert layers.alpha_for("model.norm.weight") is None


def test_gpt2_names_and_single_blocks() -> None:
    layers = LayerAlphas.parse("3:0.7,embed:0.0")
    assert layers.alpha_for("transformer.h.3.attn.c_attn.weight") == 0.7
    assert layers.alpha_for("transformer.h.4.attn.c_attn.weight") is None
    assert layers.alpha_for("transformer.wte.weight") == 0.0
    assert layers.alpha_for("transformer.wpe.weight") == 0.0
    assert layers.alpha_for("transformer.ln_f.weight") is None


def test_yaml_map(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text('"0-1": 0.25\n"2-": 0.75\nhead: 1.0\n')
    layers = LayerAlphas.parse(str(tmp_path / "a.yaml"))
    assert layers.alpha_for("model.layers.1.x") == 0.25
    assert layers.alpha_for("model.layers.5.x") == 0.75 and layers.head == 1.0
    with pytest.raises(InputError, match="no such layer-alpha file"):
        LayerAlphas.parse(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("0-9", "RANGE:ALPHA"),
        ("a-b:0.3", "not a block range"),
        ("5-2:0.1", "ends before"),
        ("0-3:x", "not a number"),
    ],
)
def test_bad_specs(spec, needle) -> None:
    with pytest.raises(UsageError, match=needle):
        LayerAlphas.parse(spec)


def test_layer_alpha_needs_a_single_alpha() -> None:
    config = MergeConfig(sft="a", rlhf="b", out="c", alpha="0.1,0.2", layer_alpha="0-:0.3")
    with pytest.raises(UsageError, match="single --alpha"):
        config.validate()
