"""``--device``/``--dtype`` of ``omotool eval``: spelling, ``auto``, refusals without CUDA."""

from __future__ import annotations

import pytest
import torch

from omotool.errors import UsageError
from omotool.eval.device import (
    Placement,
    load_options,
    resolve_device,
    resolve_dtype,
    resolve_placement,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


def fake_cuda(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    """This process believes it has ``count`` CUDA devices (only resolution is tested)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


@no_cuda
def test_auto_is_the_cpu_in_float32_without_cuda() -> None:
    placement = resolve_placement()
    assert placement == Placement(torch.device("cpu"), torch.float32)
    assert resolve_placement("auto", "auto") == placement
    assert placement.is_default
    assert placement.as_dict() == {"device": "cpu", "dtype": "float32"}
    # the CPU in float32 loads exactly as before the options existed
    assert load_options(placement) == {"dtype": torch.float32}


def test_dtypes_by_name_on_any_device() -> None:
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                        ("float16", torch.float16), ("BFloat16", torch.bfloat16)):  # fmt: skip
        placement = resolve_placement("cpu", name)
        assert placement.dtype == dtype and placement.device == torch.device("cpu")
    bf16 = resolve_placement("cpu", "bfloat16")
    assert not bf16.is_default and bf16.as_dict() == {"device": "cpu", "dtype": "bfloat16"}
    assert resolve_placement(torch.device("cpu"), torch.bfloat16) == bf16


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "CUDA:0"])
def test_cuda_without_cuda_is_refused_by_name(device) -> None:
    with pytest.raises(UsageError, match=rf"--device {device.lower()}: CUDA is not available"):
        resolve_placement(device, "auto")
    with pytest.raises(UsageError, match="Use --device cpu"):
        resolve_device(device)


def test_bad_spellings_are_refused() -> None:
    with pytest.raises(UsageError, match=r"--device must be auto, cpu, cuda or cuda:N .* 'gpu'"):
        resolve_placement("gpu", "float32")
    with pytest.raises(UsageError, match="--device must be .* 'cuda:'"):
        resolve_placement("cuda:", "float32")
    with pytest.raises(UsageError, match="--dtype must be one of auto, float32, bfloat16, fl"):
        resolve_placement("cpu", "fp16")
    with pytest.raises(UsageError, match="--dtype"):  # the dtype's typo first, whatever the device
        resolve_placement("cuda:7", "half")


def test_auto_on_cuda_is_bfloat16_where_supported_else_float32(monkeypatch) -> None:
    fake_cuda(monkeypatch, count=2, bf16=True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cuda", 0)) == torch.float16
    with pytest.raises(UsageError, match=r"--device cuda:2: there is no such device; .* 2 CUDA"):
        resolve_device("cuda:2")
    fake_cuda(monkeypatch, count=1, bf16=False)  # a pre-Ampere GPU: never float16 by itself
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32
    placement = Placement(torch.device("cuda", 0), torch.bfloat16)
    assert load_options(placement) == {"dtype": torch.bfloat16, "device_map": "cuda:0"}
