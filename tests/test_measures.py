"""Neighbouring measures against closed forms on quadratic models and simple point clouds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdopt.curvature import HessianOperator, make_functional_loss
from sdopt.measures import (
    adaptive_sharpness,
    compute_measures,
    epsilon_sharpness,
    frobenius_norm,
    gradient_noise_scale,
    mst_energy,
    ph_dimension,
    rds_sharpness,
)


class Quadratic(nn.Module):
    """L(w) = ½ Σ a_i w_i² through loss_fn; the model returns its weight."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w + 0 * x.sum()


def quad_loss(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a * out * out).sum()


W = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
A = torch.tensor([4.0, 1.0, 0.5, 2.0], dtype=torch.float64)
DATA = (torch.zeros(1, dtype=torch.float64), A)


def loss(w: torch.Tensor) -> float:
    return float(0.5 * (A * w * w).sum())


def test_epsilon_sharpness_is_attained_at_the_outward_vertex() -> None:
    f = make_functional_loss(Quadratic(W), quad_loss, DATA)
    eps = 1e-2
    y = torch.sign(W) * eps * (W.abs() + 1)
    expected = (loss(W + y) - loss(W)) / (1 + loss(W)) * 100
    assert epsilon_sharpness(f, epsilon=eps) == pytest.approx(expected, rel=1e-10)


def test_adaptive_worst_case_linf_is_uniform_scaling() -> None:
    f = make_functional_loss(Quadratic(W), quad_loss, DATA)
    rho = 0.1
    # δ = ρ|w| sign(w) = ρ w maximises every term: L((1+ρ)w) − L(w)
    expected = ((1 + rho) ** 2 - 1) * loss(W)
    got = adaptive_sharpness(f, rho=rho, p="inf", kind="max")
    assert got == pytest.approx(expected, rel=1e-10)


def test_adaptive_worst_case_l2_in_one_dimension() -> None:
    w = torch.tensor([2.0], dtype=torch.float64)
    f = make_functional_loss(
        Quadratic(w), quad_loss, (DATA[0], torch.tensor([3.0], dtype=torch.float64))
    )
    rho = 0.2
    expected = 0.5 * 3.0 * 4.0 * ((1 + rho) ** 2 - 1)
    assert adaptive_sharpness(f, rho=rho, p=2, kind="max") == pytest.approx(expected, rel=1e-8)


def test_adaptive_average_case_converges_to_closed_form() -> None:
    f = make_functional_loss(Quadratic(W), quad_loss, DATA)
    rho = 0.1
    expected = 0.5 * rho**2 * float((A * W * W).sum())  # ½ρ² tr(A diag(c²))
    g = torch.Generator().manual_seed(0)
    got = adaptive_sharpness(f, rho=rho, kind="avg", num_samples=400, generator=g)
    assert got == pytest.approx(expected, rel=0.1)


def test_measures_do_not_mutate_the_model() -> None:
    model = Quadratic(W)
    before = model.w.detach().clone()
    out = compute_measures(
        model,
        quad_loss,
        DATA,
        0.1,
        which=("eps_sharpness", "adaptive_sharpness_max", "adaptive_sharpness_avg", "frobenius"),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(model.w.detach(), before)
    assert model.w.grad is None
    assert set(out) >= {"eps_sharpness", "adaptive_sharpness_max", "frobenius"}


def test_frobenius_of_diagonal_hessian() -> None:
    op = HessianOperator(Quadratic(W), quad_loss, DATA)
    # a diagonal H: ‖Hz‖² = Σ a_i² for every Rademacher z, zero variance
    value, se = frobenius_norm(op, 5, generator=torch.Generator().manual_seed(0))
    assert value == pytest.approx(float(A.norm()), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-12)


def test_rds_sharpness() -> None:
    assert rds_sharpness(30.0, -1.0, 0.1) == pytest.approx(math.log(2.0))
    assert rds_sharpness(5.0, 0.1, 0.1) == pytest.approx(math.log(0.99))


def test_rds_sharpness_of_a_map_contracting_to_a_point_is_minus_inf() -> None:
    # |1 - lr α| = 0 at both ends and eps = 0: log 0, not a "math domain error"
    assert rds_sharpness(10.0, 10.0, 0.1) == -math.inf


def test_a_single_measure_name_as_a_string() -> None:
    # a string is one name, not an iterable of one-letter names ("Invalid which: 'w'")
    out = compute_measures(Quadratic(W), quad_loss, DATA, 0.1, which="weight_norm")
    assert out == {"weight_norm": pytest.approx(float(W.norm()))}


def test_options_are_checked_before_any_work() -> None:
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        return quad_loss(outputs, targets)

    with pytest.raises(ValueError, match="Invalid ascent_steps: 0"):
        compute_measures(
            Quadratic(W), loss_fn, DATA, 0.1, which=("trace", "eps_sharpness"), ascent_steps=0
        )
    assert not calls  # the trace was not computed first


def test_weight_norm_and_noise_scale() -> None:
    out = compute_measures(
        Quadratic(W),
        quad_loss,
        DATA,
        0.1,
        which=("weight_norm", "gradient_noise_scale"),
        dataset_size=1000,
        batch_size=10,
    )
    assert out["weight_norm"] == pytest.approx(float(W.norm()))
    assert out["gradient_noise_scale"] == pytest.approx(0.1 * 99)
    assert gradient_noise_scale(0.5, 100, 100) == 0.0


def test_simple_noise_scale_of_identical_batches_is_zero() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1, dtype=torch.float64)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    out = compute_measures(
        model, nn.functional.mse_loss, [(x, y), (x, y)], 0.1, which=("simple_noise_scale",)
    )
    assert out["simple_noise_scale"] == pytest.approx(0.0, abs=1e-20)


def test_mst_energy_of_points_on_a_line() -> None:
    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert mst_energy(pts) == pytest.approx(3.0)
    assert mst_energy(pts, alpha=2.0) == pytest.approx(3.0)


@pytest.mark.parametrize(("dim", "expected"), [(1, 1.0), (2, 2.0)])
def test_ph_dimension_of_a_line_and_a_plane(dim: int, expected: float) -> None:
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(1000, dim, generator=g, dtype=torch.float64)
    # embed in 5-D with a random rotation
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    pts = torch.cat([flat, torch.zeros(1000, 5 - dim, dtype=torch.float64)], 1) @ q
    got = ph_dimension(pts, generator=g)
    assert got == pytest.approx(expected, abs=0.15 * expected)


def test_invalid_measure_name() -> None:
    with pytest.raises(ValueError, match="Invalid which: 'flatness'"):
        compute_measures(Quadratic(W), quad_loss, DATA, 0.1, which=("flatness",))


def test_invalid_option() -> None:
    with pytest.raises(ValueError, match="Invalid option: 'rhoo'"):
        compute_measures(Quadratic(W), quad_loss, DATA, 0.1, which=("weight_norm",), rhoo=1)


def test_missing_trajectory() -> None:
    with pytest.raises(ValueError, match="Invalid trajectory: None"):
        compute_measures(Quadratic(W), quad_loss, DATA, 0.1, which=("ph_dimension",))


def test_bad_trajectory_shape() -> None:
    with pytest.raises(ValueError, match=r"Invalid trajectory: shape \(5,\)"):
        mst_energy(torch.zeros(5))


def test_invalid_p() -> None:
    f = make_functional_loss(Quadratic(W), quad_loss, DATA)
    with pytest.raises(ValueError, match="Invalid p: 3"):
        adaptive_sharpness(f, p=3)


def test_invalid_epsilon() -> None:
    f = make_functional_loss(Quadratic(W), quad_loss, DATA)
    with pytest.raises(ValueError, match="Invalid epsilon: 0"):
        epsilon_sharpness(f, epsilon=0)


def test_spectral_measures_of_a_diagonal_hessian() -> None:
    out = compute_measures(
        Quadratic(W),
        quad_loss,
        DATA,
        0.6,
        which=("lambda_max", "trace", "rds_sharpness", "sharpness_dimension"),
        generator=torch.Generator().manual_seed(0),
        sd_method="exact",
    )
    assert out["lambda_max"] == pytest.approx(4.0, rel=1e-6)
    assert out["trace"] == pytest.approx(float(A.sum()), rel=1e-9)  # Rademacher: exact on diagonals
    assert out["rds_sharpness"] == pytest.approx(math.log(abs(1 - 0.6 * 4.0)), rel=1e-6)
    from sdopt import sharpness_dimension

    assert out["sharpness_dimension"] == pytest.approx(sharpness_dimension(A, 0.6))
