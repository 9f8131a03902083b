"""Where evaluation runs: the device the models are loaded onto and the dtype of their weights.

``--device`` (or a suite's ``device``):

- ``auto``: the current CUDA device when torch sees one, else the CPU;
- ``cpu``; ``cuda`` (the current CUDA device) or ``cuda:N``. Asking for CUDA where torch has
  none is a ``UsageError`` that says why (a CPU build of torch, or no device visible).

``--dtype`` (or a suite's ``dtype``):

- ``auto``: ``float32`` on the CPU; on CUDA ``bfloat16`` where the GPU supports it natively
  (Ampere and later), else ``float32``. ``auto`` never picks ``float16``: its range (largest
  value 65504) overflows the activations of many models trained in bfloat16, and a model whose
  log-probabilities overflow is reported as failed; ask for it with ``--dtype float16``.
- ``float32``, ``bfloat16``, ``float16``: the weights in that dtype, on any device.

Every batch goes to the model's device; log-probabilities and rewards are taken from the
logits upcast to float32 and summed in float32, whatever the weights' dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from omotool.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Placement:
    """The device models are loaded onto and their weights' dtype (both resolved)."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def is_default(self) -> bool:
        """On the CPU in float32: how every evaluation ran before devices could be chosen."""
        return self.device.type == "cpu" and self.dtype == torch.float32

    def as_dict(self) -> dict[str, Any]:
        """``device``, ``dtype`` and, on CUDA, ``device_name`` (the GPU), for the report."""
        report: dict[str, Any] = {"device": str(self.device), "dtype": self.dtype_name}
        if self.device.type == "cuda":
            report["device_name"] = torch.cuda.get_device_name(self.device)
        return report


def check_device(value: Any, name: str = "--device") -> str:
    """``value`` if it spells a device (see module docstring), else a ``UsageError``."""
    text = str(value) if isinstance(value, torch.device) else value
    if not isinstance(text, str) or not _DEVICE.fullmatch(text.strip().lower()):
        raise UsageError(f"{name} must be auto, cpu, cuda or cuda:N (e.g. cuda:1), not {value!r}.")
    return text.strip().lower()


def check_dtype(value: Any, name: str = "--dtype") -> str:
    """``value`` if it names a dtype of ``DTYPES``, else a ``UsageError``."""
    text = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if not isinstance(text, str) or text.strip().lower() not in DTYPES:
        raise UsageError(f"{name} must be one of {', '.join(DTYPES)}, not {value!r}.")
    return text.strip().lower()


def resolve_device(value: Any = "auto", name: str = "--device") -> torch.device:
    """The device ``value`` asks for, checked against what this machine has."""
    text = check_device("auto" if value is None else value, name)
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a build without CUDA"
        else:
            why = f"torch (built for CUDA {torch.version.cuda}) sees no CUDA device"
        raise UsageError(
            f"{name} {text}: CUDA is not available here: {why}. Use --device cpu (or auto)."
        )
    device = torch.device(text)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if device.index >= count:
        raise UsageError(
            f"{name} {text}: there is no such device; torch sees {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1})."
        )
    return device


def resolve_dtype(value: Any, device: torch.device, name: str = "--dtype") -> torch.dtype:
    """The dtype ``value`` asks for; ``auto`` chosen for ``device`` (see module docstring)."""
    chosen = DTYPES[check_dtype("auto" if value is None else value, name)]
    if chosen is not None:
        return chosen
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def resolve_placement(
    device: Any = None,
    dtype: Any = None,
    device_name: str = "--device",
    dtype_name: str = "--dtype",
) -> Placement:
    """The placement of ``device`` and ``dtype`` (``None``: ``auto``); errors use the names."""
    check_dtype("auto" if dtype is None else dtype, dtype_name)  # a typo before any device
    where = resolve_device(device, device_name)
    return Placement(where, resolve_dtype(dtype, where, dtype_name))


def load_options(placement: Placement) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` that load a model with ``placement``: its
    dtype and, on an accelerator, straight onto the device (no copy held on the CPU)."""
    options: dict[str, Any] = {"dtype": placement.dtype}
    if placement.device.type != "cpu":
        options["device_map"] = str(placement.device)
    return options


def placed(model: Any, placement: Placement) -> Any:
    """``model`` in evaluation mode on ``placement``'s device (a no-op where it is already)."""
    if next(model.parameters()).device != placement.device:
        model = model.to(placement.device)
    return model.eval()
