"""TaskVector sources (delta output, two models, mapping) and FlatDelta storage."""

from __future__ import annotations

import pytest
import torch

from omotool.delta import DeltaConfig, compute_delta
from omotool.errors import InputError
from omotool.io import ModelReader, fingerprint
from omotool.optim import FlatDelta, OnlineMergingAdamW, TaskVector
from tests.conftest import state_dict_of


def test_load_from_delta_output_and_from_models_agree(llama_pair, tmp_path) -> None:
    base, sft = llama_pair
    compute_delta(DeltaConfig(base=str(base), sft=str(sft), out=str(tmp_path / "tau")))
    loaded = TaskVector.load(tmp_path / "tau")
    streamed = TaskVector.from_models(base, sft)
    assert loaded.sft_fingerprint == streamed.sft_fingerprint == fingerprint(ModelReader(sft))
    base_sd, sft_sd = state_dict_of(base), state_dict_of(sft)
    for name in ModelReader(sft).names:
        assert torch.equal(loaded.get(name), sft_sd[name] - base_sd[name])
        assert torch.equal(streamed.get(name), loaded.get(name))


def test_optimizer_on_a_real_model_with_a_loaded_task_vector(llama_pair, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    base, sft = llama_pair
    compute_delta(DeltaConfig(base=str(base), sft=str(sft), out=str(tmp_path / "tau")))
    model = AutoModelForCausalLM.from_pretrained(str(sft))
    opt = OnlineMergingAdamW(
        model.named_parameters(),
        tmp_path / "tau",
        method="ties",
        reserve_p=0.05,
        alpha=1e-3,
        lr=1e-3,
    )
    ids = torch.randint(0, 300, (2, 12))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.task_vector_fingerprint == fingerprint(ModelReader(sft))
    assert 0 < opt.stats()["merge/kept_fraction"] <= 0.06


def test_load_refuses_folders_that_are_not_task_vectors(llama_pair, tmp_path) -> None:
    with pytest.raises(InputError, match="not a task vector"):
        TaskVector.load(llama_pair[0])
    (tmp_path / "omotool.json").write_text('{"kind": "merge"}')
    with pytest.raises(InputError, match="does not describe a task vector"):
        TaskVector.load(tmp_path)


def test_nonfinite_task_vector_entry_is_refused() -> None:
    tv = TaskVector.from_mapping({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(InputError, match="w holds NaN or inf"):
        tv.get("w")


def test_flat_delta_sparse_and_dense_round_trip() -> None:
    sparse_source = torch.zeros(10, 10)
    sparse_source[3, 4], sparse_source[9, 9] = 2.0, -1.0
    sparse = FlatDelta.from_dense(sparse_source)
    assert sparse.indices is not None and sparse.indices.dtype == torch.int32
    assert sparse.nbytes == 2 * 4 + 2 * 4
    assert torch.equal(sparse.to_dense().view(10, 10), sparse_source)
    dense_source = torch.randn(4, 4)
    dense = FlatDelta.from_dense(dense_source)
    assert dense.indices is None and torch.equal(dense.to_dense().view(4, 4), dense_source)
    assert torch.equal(dense.flat_indices(), torch.arange(16))
