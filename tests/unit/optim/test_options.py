"""The merge options, declared once (``omotool.optim.options.MergeFields``): each is a field
of ``MergeOptions``, checked by its ``validate``, and a keyword argument of both optimizers."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
import torch

from omotool.config import declared, default_of
from omotool.errors import InputError, UsageError
from omotool.optim import MergeOptions, OnlineMerging, OnlineMergingAdamW
from omotool.optim.options import MergeFields

DECLARED = declared(MergeFields)


def params_and_tau() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return {"w": torch.zeros(8, requires_grad=True)}, {"w": torch.ones(8)}


def out_of_range(name: str) -> object:
    """A value the declaration refuses: below its bounds, or none of its choices."""
    bounds = DECLARED[name].bounds
    if bounds is None:
        return "no-such-choice"
    if bounds.low is None:
        return bounds.high + 1
    low = type(default_of(MergeFields, name))(bounds.low)
    return low if bounds.low_open else low - 1


def test_every_declared_option_is_a_merge_options_field() -> None:
    fields = {f.name: f for f in dataclasses.fields(MergeOptions)}
    assert list(fields) == list(DECLARED)
    options = MergeOptions()
    for name in DECLARED:
        assert getattr(options, name) == default_of(MergeFields, name)
    options.validate()  # the defaults are valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.alpha = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", [n for n, o in DECLARED.items() if o.bounds or o.choices])
def test_validate_refuses_what_the_declaration_refuses(name) -> None:
    bad = out_of_range(name)
    with pytest.raises(UsageError, match=f"{name}|method"):
        MergeOptions(**{name: bad}).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", [OnlineMergingAdamW, OnlineMerging])
def test_every_declared_option_is_an_optimizer_keyword(optimizer) -> None:
    """Named in the signature with its declared default, accepted, and range-checked."""
    signature = inspect.signature(optimizer).parameters
    for name in DECLARED:
        assert signature[name].default == default_of(MergeFields, name)
        assert signature[name].kind is inspect.Parameter.KEYWORD_ONLY

    def make(**options):
        params, tau = params_and_tau()
        if optimizer is OnlineMerging:
            return OnlineMerging(torch.optim.SGD(list(params.items()), lr=0.1), tau, **options)
        return OnlineMergingAdamW(params.items(), tau, **options)

    for name in DECLARED:
        value = default_of(MergeFields, name)
        assert getattr(make(**{name: value}).options, name) == value
        if DECLARED[name].bounds or DECLARED[name].choices:
            with pytest.raises(UsageError):
                make(**{name: out_of_range(name)})
    with pytest.raises(UsageError, match="has no argument 'reserve'. Did you mean 'reserve_p'"):
        make(reserve=0.1)


def test_library_messages_name_the_keyword_and_its_value() -> None:
    params, tau = params_and_tau()
    for options, message in [
        (dict(reserve_p=0.0), r"^reserve_p=0.0 must be in \(0, 1\] \(the fraction kept\)\.$"),
        (dict(rescale="l2"), r"^rescale='l2': choose one of none, inverse, l1\.$"),
        (dict(online_step=1.5), r"^online_step must be int, got 1.5\.$"),
        (dict(method="tie"), "Did you mean 'ties'"),
    ]:
        with pytest.raises(UsageError, match=message):
            OnlineMergingAdamW(params.items(), tau, **options)


def test_saved_options_of_older_versions_load() -> None:
    """``dare_draw`` (retired) is dropped; ``missing`` (not saved before) is the resuming
    optimizer's, so that resuming compares only what was saved."""
    old = {k: v for k, v in dataclasses.asdict(MergeOptions()).items() if k != "missing"}
    assert MergeOptions.from_saved({**old, "dare_draw": "generator"}) == MergeOptions()
    resuming = MergeOptions(missing="adamw")
    assert MergeOptions.from_saved(old, resuming) == resuming
    assert MergeOptions.from_saved({**old, "missing": "error"}, resuming) != resuming


def test_an_old_state_without_missing_resumes() -> None:
    params, tau = params_and_tau()
    opt = OnlineMergingAdamW(params.items(), tau, missing="adamw", reserve_p=0.5, lr=1e-2)
    params["w"].grad = torch.ones(8)
    opt.step()
    state = opt.state_dict()
    del state["online_merging"]["options"]["missing"]  # as older versions saved it
    again = OnlineMergingAdamW(params.items(), tau, missing="adamw", reserve_p=0.5, lr=1e-2)
    again.load_state_dict(state)
    other = OnlineMergingAdamW(params.items(), tau, reserve_p=0.3, lr=1e-2)
    with pytest.raises(InputError, match="merge options"):
        other.load_state_dict(state)


def test_the_declaration_does_not_import_torch() -> None:
    code = "import sys, omotool.optim.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
