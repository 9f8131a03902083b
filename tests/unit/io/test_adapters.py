"""PEFT adapter folders (omotool/io/adapters.py) and their use by `omotool eval`."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from omotool.errors import InputError
from omotool.eval.runner import _fingerprint, _Models
from omotool.io.adapters import adapter_base, is_adapter, load_adapter_model, tokenizer_folder
from tests.conftest import tiny_logits as logits


@pytest.fixture
def adapter(llama_pair, tmp_path):
    """An adapter over the tiny SFT model with B away from 0 (a trained one's stand-in)."""
    sft = AutoModelForCausalLM.from_pretrained(str(llama_pair[1]), dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(sft, config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    return folder, logits(model)


def test_an_adapter_folder_loads_merged_into_its_base(llama_pair, adapter) -> None:
    folder, expected = adapter
    assert is_adapter(folder) and not is_adapter(llama_pair[1])
    assert adapter_base(folder) == str(llama_pair[1])
    merged = load_adapter_model(folder, dtype=torch.float32)
    assert not hasattr(merged, "peft_config")  # a plain transformers model
    torch.testing.assert_close(logits(merged), expected)
    sft = AutoModelForCausalLM.from_pretrained(str(llama_pair[1]), dtype=torch.float32)
    assert not torch.allclose(logits(sft), expected)


def test_eval_loads_adapters_and_fingerprints_base_and_weights(llama_pair, adapter) -> None:
    folder, expected = adapter
    assert tokenizer_folder(folder) == str(llama_pair[1])  # none saved with it: the base's
    model, tokenizer = _Models().get(str(folder))
    torch.testing.assert_close(logits(model), expected)
    assert tokenizer is not None
    first = _fingerprint(str(folder))
    assert first.startswith("sha256:") and first != _fingerprint(str(llama_pair[1]))
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    assert _fingerprint(str(folder)) != first


def test_an_adapter_whose_base_is_missing_is_named(adapter, tmp_path) -> None:
    folder, _ = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="its base model .*gone.* cannot be found"):
        load_adapter_model(folder)


def test_adapter_reader_reads_the_merged_weights_lazily(llama_pair, adapter) -> None:
    from omotool.io.adapters import AdapterReader, open_model

    folder, _ = adapter
    merged = load_adapter_model(folder, dtype=torch.float32).state_dict()
    with open_model(folder) as reader:
        assert isinstance(reader, AdapterReader) and reader.scale == 2.0
        assert len(reader.adapted) == 4  # q_proj and v_proj of 2 layers
        for name in reader.names:
            torch.testing.assert_close(reader.get(name), merged[name])
    with open_model(llama_pair[1]) as plain:
        assert not isinstance(plain, AdapterReader)


def test_delta_and_merge_offline_take_an_adapter_as_a_model(llama_pair, adapter, tmp_path):
    from safetensors.torch import load_file

    from omotool.delta import DeltaConfig, compute_delta
    from omotool.merge_offline import MergeConfig, run_merge

    folder, _ = adapter
    sft = {
        k: v
        for k, v in AutoModelForCausalLM.from_pretrained(str(llama_pair[1])).state_dict().items()
    }
    merged = load_adapter_model(folder, dtype=torch.float32).state_dict()
    # τ from the SFT model to the adapter: s·B·A on the adapted weights, 0 elsewhere
    compute_delta(DeltaConfig(base=str(llama_pair[1]), sft=str(folder), out=str(tmp_path / "tau")))
    tau = load_file(tmp_path / "tau" / "model.safetensors")
    for name, value in tau.items():
        torch.testing.assert_close(value, merged[name] - sft[name], atol=1e-6, rtol=1e-5)
        assert ("q_proj" in name or "v_proj" in name) == bool(value.abs().max() > 0), name
    meta = json.loads((tmp_path / "tau" / "omotool.json").read_text())
    assert meta["sft"]["path"] == str(folder.absolute())
    # offline interpolation between SFT and the adapter's model, halfway
    run_merge(MergeConfig(sft=str(llama_pair[1]), rlhf=str(folder), out=str(tmp_path / "half")))
    half = AutoModelForCausalLM.from_pretrained(str(tmp_path / "half"), dtype=torch.float32)
    for name, value in half.state_dict().items():
        torch.testing.assert_close(value, (sft[name] + merged[name]) / 2, atol=1e-6, rtol=1e-5)
    meta = json.loads((tmp_path / "half" / "omotool.json").read_text())
    assert meta["rlhf"]["path"] == str(folder.absolute())


def test_adapters_with_more_than_lora_factors_are_refused(adapter) -> None:
    from omotool.io.adapters import open_model

    folder, _ = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match="use_dora is not supported here"):
        open_model(folder)


def test_adapter_delta_is_s_b_a_from_the_factors_and_zero_elsewhere(llama_pair, adapter) -> None:
    from safetensors.torch import load_file

    from omotool.io.adapters import AdapterDelta, AdapterReader
    from omotool.io.reader import fingerprint
    from omotool.optim.references import adapter_task_vector

    folder, _ = adapter
    factors = load_file(folder / "adapter_model.safetensors")
    with AdapterDelta(folder) as delta:
        for name in delta.names:
            tau = delta.get(name)
            assert tau.dtype == torch.float32 and tuple(tau.shape) == delta.shape(name)
            if name not in delta.adapted:
                assert not tau.any(), name
                continue
            a, b = (factors[key] for key in delta.adapted[name])
            torch.testing.assert_close(tau, 2.0 * b @ a)  # s = 4 / 2
            assert tau.abs().max() > 0
    tv = adapter_task_vector(folder)
    assert tv.sft_fingerprint == fingerprint(AdapterReader(folder))  # as `delta` records it
    name = next(iter(AdapterReader(folder).adapted))
    torch.testing.assert_close(tv.get(name), AdapterDelta(folder).get(name))
