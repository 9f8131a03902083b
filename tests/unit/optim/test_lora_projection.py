"""The LoRA tangent-space merge (omotool/optim/lora_projection.py) against dense solves."""

from __future__ import annotations

import pytest
import torch

from omotool.optim.functional import MergeContext, MergeOptions, StepStats, reference_tensor
from omotool.optim.lora_projection import (
    damping,
    lora_merge_step,
    lora_update,
    merged_update,
    tangent_correction,
    tangent_projection,
)
from omotool.optim.task_vector import FlatDelta

D, K, R, S = 7, 9, 3, 2.5


def factors(seed: int = 0, dtype: torch.dtype = torch.float64, b_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, K, generator=g, dtype=dtype)
    b = b_scale * torch.randn(D, R, generator=g, dtype=dtype)
    da = 1e-3 * torch.randn(R, K, generator=g, dtype=dtype)
    db = 1e-3 * torch.randn(D, R, generator=g, dtype=dtype)
    error = torch.randn(D, K, generator=g, dtype=dtype)
    return a, b, da, db, error


def tangent_operator(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The matrix of (X, Y) ↦ vec(s·(X·A + B·Y)), row-major vec, unknowns vec(X) then vec(Y)."""
    d, r = b.shape
    k = a.shape[1]
    eye_d, eye_k = torch.eye(d, dtype=a.dtype), torch.eye(k, dtype=a.dtype)
    # vec(X·A) = (I_d ⊗ Aᵀ)·vec(X); vec(B·Y) = (B ⊗ I_k)·vec(Y)  (row-major)
    return scale * torch.cat([torch.kron(eye_d, a.mT.contiguous()), torch.kron(b, eye_k)], dim=1)


def context(method: str, step: int = 1, name: str = "layer.weight", **options) -> MergeContext:
    return MergeContext(name, step, MergeOptions(method=method, **options), StepStats())


def test_update_is_the_exact_change_of_the_product() -> None:
    a, b, da, db, _ = factors()
    expected = S * ((b + db) @ (a + da) - b @ a)  # float64: the difference is exact enough
    torch.testing.assert_close(lora_update(a, b, da, db, S), expected)


def test_update_in_float32_keeps_the_digits_a_difference_of_products_loses() -> None:
    a, b, da, db, _ = factors()
    da, db = da * 1e-4, db * 1e-4  # a late, small step
    exact = lora_update(a, b, da, db, S)
    written_out = lora_update(*(t.float() for t in (a, b, da, db)), S).double()
    a32, b32, da32, db32 = (t.float() for t in (a, b, da, db))
    difference = (S * ((b32 + db32) @ (a32 + da32) - b32 @ a32)).double()
    error_written, error_difference = (exact - written_out).norm(), (exact - difference).norm()
    assert error_written < 1e-3 * exact.norm()
    assert error_written * 100 < error_difference


def test_exact_projection_with_no_damping() -> None:
    a, b, _, _, error = factors()
    delta_b, delta_a = tangent_correction(error, a, b, S, lam=0.0, max_a_change=None)
    realised = S * (delta_b @ a + b @ delta_a)
    p_a = a.mT @ torch.linalg.inv(a @ a.mT) @ a
    p_b = b @ torch.linalg.inv(b.mT @ b) @ b.mT
    torch.testing.assert_close(realised, p_b @ error + error @ p_a - p_b @ error @ p_a)
    torch.testing.assert_close(realised, tangent_projection(error, a, b))
    torch.testing.assert_close(delta_a @ a.mT, torch.zeros(R, R, dtype=a.dtype))  # ΔA ⟂ rows of A


@pytest.mark.parametrize("seed", range(4))
def test_linear_correction_equals_a_dense_least_squares_solve(seed) -> None:
    a, b, _, _, error = factors(seed)
    delta_b, delta_a = tangent_correction(error, a, b, S, lam=0.0, max_a_change=None)
    operator = tangent_operator(a, b, S)
    solution = torch.linalg.lstsq(operator, error.reshape(-1, 1), driver="gelsd").solution
    dense_fit = (operator @ solution).reshape(D, K)  # unique, though (X, Y) is not (gauge)
    torch.testing.assert_close(S * (delta_b @ a + b @ delta_a), dense_fit)
    # and the residual is orthogonal to the tangent space: nothing left that it could express
    residual = (error - dense_fit).reshape(-1, 1)
    torch.testing.assert_close(operator.mT @ residual, torch.zeros(D * R + R * K, 1, dtype=a.dtype))


def test_damped_correction_equals_dense_ridge_solves() -> None:
    a, b, _, _, error = factors(1)
    lam = 0.3
    delta_b, delta_a = tangent_correction(error, a, b, S, lam=lam, max_a_change=None)
    # ΔB: least squares of s·X·A = E (row space part); ΔA: ridge of s·B·Y = E(I − P_A)
    eye_d, eye_k = torch.eye(D, dtype=a.dtype), torch.eye(K, dtype=a.dtype)
    x = torch.linalg.lstsq(S * torch.kron(eye_d, a.mT.contiguous()), error.reshape(-1, 1)).solution
    torch.testing.assert_close(delta_b, x.reshape(D, R))
    p_a = a.mT @ torch.linalg.inv(a @ a.mT) @ a
    residual = (error @ (eye_k - p_a)).reshape(-1, 1) / S
    stacked = torch.cat([torch.kron(b, eye_k), lam**0.5 * torch.eye(R * K, dtype=a.dtype)])
    target = torch.cat([residual, torch.zeros(R * K, 1, dtype=a.dtype)])
    y = torch.linalg.lstsq(stacked, target).solution
    torch.testing.assert_close(delta_a, y.reshape(R, K))


def test_damping_is_zero_for_a_well_conditioned_b_and_lifts_a_flat_one() -> None:
    assert float(damping(torch.tensor([1.0, 2.0, 4.0]))) == 0.0
    assert float(damping(torch.tensor([0.0, 2.0, 4.0]), rho=0.01)) == pytest.approx(0.04)
    lifted = torch.tensor([1e-6, 2.0, 4.0]) + damping(torch.tensor([1e-6, 2.0, 4.0]), rho=0.01)
    assert float(lifted.min()) == pytest.approx(0.04)


def test_zero_b_keeps_only_the_row_space_part_and_leaves_a_alone() -> None:
    a, _, _, _, error = factors()
    b = torch.zeros(D, R, dtype=a.dtype)
    delta_b, delta_a = tangent_correction(error, a, b, S)
    assert torch.equal(delta_a, torch.zeros_like(delta_a))
    p_a = a.mT @ torch.linalg.inv(a @ a.mT) @ a
    torch.testing.assert_close(S * delta_b @ a, error @ p_a)


def test_a_small_b_cannot_throw_a_far() -> None:
    a, b, _, _, error = factors(2, b_scale=1e-8)
    _, free = tangent_correction(error, a, b, S, max_a_change=None)
    assert free.norm() > 1e3 * a.norm()  # the unbounded step: far beyond A itself
    _, capped = tangent_correction(error, a, b, S, max_a_change=0.01)
    assert capped.norm() <= 0.01 * a.norm() * (1 + 1e-12)
    torch.testing.assert_close(capped / capped.norm(), free / free.norm())  # same direction


@pytest.mark.parametrize(("method", "options"), [("dare", {"reserve_p": 0.3}), ("ties", {})])
def test_whole_step_matches_the_merge_to_first_order(method, options) -> None:
    """Realised change of s·B·A = δW + s(ΔB·A + B·ΔA) + s(dB·ΔA + ΔB·dA + ΔB·ΔA): the first two
    are M's tangent part exactly (λ = 0, full-rank B), the rest is bounded by the norms."""
    a, b, da, db, _ = factors(3)
    g = torch.Generator().manual_seed(9)
    tau = 1e-3 * torch.randn(D, K, generator=g, dtype=a.dtype)
    opts = MergeOptions(method=method, alpha=0.1, **options)
    reference = FlatDelta.from_dense(reference_tensor(tau, "layer.weight", opts).to(a.dtype))
    ctx = MergeContext("layer.weight", 1, opts, StepStats())
    update = lora_update(a, b, da, db, S)
    merged = merged_update(update, reference, ctx)
    error = merged - update
    assert error.norm() > 0
    delta_b, delta_a = tangent_correction(error, a, b, S, lam=0.0, max_a_change=None)
    new_b, new_a = b + db + delta_b, a + da + delta_a
    realised = S * (new_b @ new_a - b @ a)
    target = update + tangent_projection(error, a, b)
    bound = S * (
        db.norm() * delta_a.norm() + delta_b.norm() * da.norm() + delta_b.norm() * delta_a.norm()
    )
    assert (realised - target).norm() <= bound * (1 + 1e-9) + 1e-12


def test_merged_update_is_the_optimizers_rule_on_a_zero_matrix() -> None:
    a, b, da, db, _ = factors()
    update = lora_update(a, b, da, db, S)
    merged = merged_update(update, None, context("dare", reserve_p=0.25, alpha=0.0))
    kept = merged != 0
    torch.testing.assert_close(merged[kept], update[kept] / 0.25)  # DARE: kept and rescaled
    again = merged_update(update, None, context("dare", reserve_p=0.25, alpha=0.0))
    assert torch.equal(merged, again)  # keyed by (seed, "update", step, name): ranks agree
    other = merged_update(update, None, context("dare", step=2, reserve_p=0.25, alpha=0.0))
    assert not torch.equal(merged, other)


def test_dare_reserve_1_alpha_0_is_exact_lora_adamw() -> None:
    """E = 0 exactly: the correction runs and adds exact zeros."""
    a, b, da, db, _ = factors(dtype=torch.float32)
    ctx = context("dare", reserve_p=1.0, alpha=0.0)
    step = lora_merge_step(a, b, da, db, S, None, ctx)
    assert float(step.error_norm) == 0.0 and float(step.kept_share) == 1.0
    assert torch.equal(step.delta_a, torch.zeros_like(a))
    assert torch.equal(step.delta_b, torch.zeros_like(b))
    assert torch.equal(a + da + step.delta_a, a + da)  # adding them changes no bit
    assert torch.equal(b + db + step.delta_b, b + db)
    assert ctx.stats.kept == ctx.stats.entries == D * K  # the rule ran over every entry


def test_ties_at_alpha_0_is_not_the_identity() -> None:
    """OnTIES elects signs against T even at α = 0 (unweighted election), and trims Δθ."""
    a, b, da, db, _ = factors()
    tau = torch.randn(D, K, generator=torch.Generator().manual_seed(4), dtype=a.dtype)
    opts = MergeOptions(method="ties", alpha=0.0, reserve_p=0.5, election="unweighted")
    reference = FlatDelta.from_dense(reference_tensor(tau, "w", opts).to(a.dtype))
    step = lora_merge_step(a, b, da, db, S, reference, MergeContext("w", 1, opts, StepStats()))
    assert float(step.error_norm) > 0


def test_kept_share_is_about_r_over_k_while_b_is_zero() -> None:
    d, k, r = 64, 256, 4
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)
    b = torch.zeros(d, r, dtype=torch.float64)
    da = torch.zeros_like(a)
    db = 1e-3 * torch.randn(d, r, generator=g, dtype=torch.float64)
    step = lora_merge_step(a, b, da, db, S, None, context("dare", reserve_p=0.1, alpha=0.0))
    assert float(step.kept_share) ** 2 == pytest.approx(r / k, rel=0.5)
