"""LoraOnlineMerging (omotool/optim/lora_merging.py) on a small PEFT-wrapped model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from omotool.errors import InputError, UsageError
from omotool.optim import OnlineMergingAdamW
from omotool.optim.lora_merging import SHARE, LoraOnlineMerging, peft_lora_modules
from omotool.optim.lora_projection import lora_update, merged_update


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(6, 10, bias=False)
        self.down = torch.nn.Linear(10, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def lora_net(seed: int = 0):
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], lora_dropout=0.0)
    model = get_peft_model(Net(), config)
    for module in peft_lora_modules(model):  # B away from 0, so A's correction is exercised
        module.b.data.normal_(0, 0.1)
    return model


def tau_of(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        m.name: 0.01 * torch.randn(m.weight.shape, generator=g) for m in peft_lora_modules(model)
    }


def optimizer(model, tau, **merge):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    inner = OnlineMergingAdamW([{"params": named}], None, lr=1e-2, method="none")
    return LoraOnlineMerging(inner, peft_lora_modules(model), tau, **merge)


def train_step(model, opt, seed: int = 0) -> None:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_modules_are_named_as_the_wrapped_models_weights() -> None:
    modules = peft_lora_modules(lora_net())
    assert sorted(m.name for m in modules) == ["down.weight", "up.weight"]
    up = next(m for m in modules if m.name == "up.weight")
    assert (tuple(up.a.shape), tuple(up.b.shape), up.scale) == ((2, 6), (10, 2), 2.0)


def test_the_step_applies_adams_factor_update_plus_the_merge_correction() -> None:
    model = lora_net()
    tau = tau_of(model)
    opt = optimizer(model, tau, method="ties", reserve_p=0.3, alpha=0.1)
    modules = peft_lora_modules(model)
    before = {m.name: (m.a.detach().clone(), m.b.detach().clone()) for m in modules}
    # the same step without merging, on a copy
    twin = lora_net()
    plain = OnlineMergingAdamW(
        [{"params": [(n, p) for n, p in twin.named_parameters() if p.requires_grad]}],
        None, lr=1e-2, method="none",
    )  # fmt: skip
    train_step(model, opt)
    train_step(twin, plain)
    for module, other in zip(modules, peft_lora_modules(twin), strict=True):
        a0, b0 = before[module.name]
        da, db = other.a.detach() - a0, other.b.detach() - b0  # Adam's factor update
        update = lora_update(a0, b0, da, db, module.scale)
        merged = merged_update(update, opt.references[module.name], _context(opt, module.name))
        realised = module.scale * (module.b @ module.a - b0 @ a0)
        # closer to the merged update than Adam's own update is
        assert (realised - merged).norm() < (update - merged).norm()
    assert 0 < opt.stats()[SHARE] < 1


def _context(opt, name):
    from omotool.optim.functional import MergeContext, StepStats

    return MergeContext(name, opt.merge_steps, opt.options, StepStats())


def test_state_dict_round_trip_continues_the_mask_count() -> None:
    model = lora_net()
    tau = tau_of(model)
    opt = optimizer(model, tau, method="dare", reserve_p=0.5, alpha=0.0)
    train_step(model, opt)
    saved = opt.state_dict()
    fresh = optimizer(model, tau, method="dare", reserve_p=0.5, alpha=0.0)
    fresh.load_state_dict(saved)
    assert fresh.merge_steps == 1
    with pytest.raises(InputError, match="other merge options"):
        optimizer(model, tau, method="dare", reserve_p=0.4, alpha=0.0).load_state_dict(saved)


def test_a_skipped_step_merges_nothing() -> None:
    model = lora_net()
    opt = optimizer(model, tau_of(model), method="dare", reserve_p=0.5, alpha=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan")) if p.requires_grad else None
    opt.step()
    assert opt.merge_steps == 0  # OnDARE would otherwise add α·T to a step that did not happen
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_refusals() -> None:
    model = lora_net()
    tau = tau_of(model)
    with pytest.raises(InputError, match="no entry for the adapted weight"):
        optimizer(model, {"up.weight": tau["up.weight"]}, method="ties")
    with pytest.raises(UsageError, match="online_step 1"):
        optimizer(model, tau, method="dare", online_step=2)
    with pytest.raises(UsageError, match="merges"):
        optimizer(model, tau, method="none")
