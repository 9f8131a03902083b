"""omotool/train/lora.py: continuing an SFT adapter (its options and its reference)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from omotool.errors import UsageError
from omotool.train.arguments import TrainConfig
from omotool.train.lora import REFERENCE_ADAPTER, check_sft_adapter, keep_sft_reference
from tests.conftest import tiny_logits as logits


@pytest.fixture
def sft_adapter(llama_pair, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(llama_pair[0]), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.fill_(0.3)
    model.save_pretrained(str(tmp_path / "sft"))
    return tmp_path / "sft"


def test_keep_sft_reference_adds_a_frozen_copy_of_the_adapter(llama_pair, sft_adapter):
    """Where a trainer made no reference adapter, the copy is made here: frozen, inactive,
    and with it active the model is the SFT policy, whatever the trained adapter became."""
    base = AutoModelForCausalLM.from_pretrained(str(llama_pair[0]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(sft_adapter), is_trainable=True).eval()
    sft = logits(model)
    keep_sft_reference(model)
    keep_sft_reference(model)  # a second call changes nothing
    assert sorted(model.peft_config) == ["default", REFERENCE_ADAPTER]
    assert model.active_adapters == ["default"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    for name, param in model.named_parameters():
        if ".default." in name and "lora_B" in name:
            param.data.add_(1.0)  # the trained adapter moves on
    assert not torch.allclose(logits(model), sft)
    model.set_adapter(REFERENCE_ADAPTER)
    torch.testing.assert_close(logits(model), sft)


def test_lora_options_left_at_their_defaults_take_the_adapters(sft_adapter):
    config = TrainConfig(model=str(sft_adapter), lora_r=2, lora_dropout=0.0)
    check_sft_adapter(config)  # alpha 32 and all-linear: the defaults, so the adapter's
    same = TrainConfig(
        model=str(sft_adapter), lora_r=2, lora_alpha=4.0, lora_target_modules="q_proj"
    )
    check_sft_adapter(same)
    with pytest.raises(UsageError, match="--lora-r 8: .*--lora-r 2"):
        check_sft_adapter(TrainConfig(model=str(sft_adapter), lora_r=8))


def test_a_base_given_with_an_adapter_must_be_its_base(llama_pair, sft_adapter):
    from omotool.errors import InputError
    from omotool.train.lora import check_adapter_base

    own = TrainConfig(model=str(sft_adapter), lora_r=2, merge="ties", base=str(llama_pair[0]))
    check_adapter_base(own)  # the same model: accepted (τ still from the factors)
    other = TrainConfig(model=str(sft_adapter), lora_r=2, merge="ties", base=str(llama_pair[1]))
    with pytest.raises(InputError, match="is not the base of the adapter"):
        check_adapter_base(other)
