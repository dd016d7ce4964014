"""The smooth surrogate as a function of eigenvalues: gradcheck, convergence, bounds."""

from __future__ import annotations

import pytest
import torch

from sdopt import sharpness_dimension, smooth_sharpness_dimension
from sdopt.dimension.surrogate import surrogate_weights


def spectrum(seed: int = 0, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ev = torch.randn(n, generator=g, dtype=torch.float64) * 0.3 + 0.05
    ev[:5] = torch.tensor([25.0, 18.0, 9.0, 6.0, -1.0], dtype=torch.float64)
    return ev


def test_gradcheck_in_eigenvalues() -> None:
    ev = spectrum().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: smooth_sharpness_dimension(a, 0.1, temperature=0.05), (ev,)
    )


def test_gradcheck_with_weights_eps_and_bulk_trace() -> None:
    ev = spectrum(1, 10).requires_grad_(True)
    w = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    bt = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: smooth_sharpness_dimension(
            a, 0.1, temperature=0.1, weights=w, bulk_dim=30.0, bulk_trace=b, eps=1e-3
        ),
        (ev, bt),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_to_exact_sd_as_temperature_vanishes(seed: int) -> None:
    ev = spectrum(seed)
    exact = sharpness_dimension(ev, 0.1)
    errors = [
        float(smooth_sharpness_dimension(ev, 0.1, temperature=t)) - exact
        for t in (1e-1, 1e-2, 1e-3, 1e-4)
    ]
    assert all(e >= -1e-9 for e in errors)  # softplus >= plus: an upper bound
    assert errors == sorted(errors, reverse=True)
    assert abs(errors[-1]) < 1e-3 * exact


def test_worked_example_limit() -> None:
    ev = torch.tensor([3.0, 0.5, 0.01, 0.0], dtype=torch.float64)
    s = smooth_sharpness_dimension(ev, 1.0, temperature=1e-5)
    assert float(s) == pytest.approx(sharpness_dimension(ev, 1.0), abs=1e-4)


def test_all_expanding_is_d_and_below_edge_is_small() -> None:
    assert float(smooth_sharpness_dimension(torch.tensor([30.0, -2.0]), 0.1, temperature=0.01)) == 2
    low = smooth_sharpness_dimension(torch.tensor([1.0, 5.0, 12.0]), 0.1, temperature=0.01)
    assert 0 <= float(low) < 0.1


def test_bulk_equals_repeated_mean_eigenvalue() -> None:
    top = torch.tensor([25.0, 9.0], dtype=torch.float64)
    full = torch.cat([top, torch.full((20,), 0.05, dtype=torch.float64)])
    a = smooth_sharpness_dimension(full, 0.1, temperature=0.01)
    b = smooth_sharpness_dimension(top, 0.1, temperature=0.01, bulk_dim=20, bulk_trace=1.0)
    assert float(a) == pytest.approx(float(b), rel=1e-10)


def test_weights_are_nonnegative_exponent_sensitivities() -> None:
    value, grad = surrogate_weights(spectrum(), 0.1, temperature=0.05)
    assert grad.shape == (40,)
    # α = 25 > 2/η: raising it expands more, SD grows; α = 9 < 1/η... contracting side
    assert grad[0] > 0 and grad[4] < 0
    assert float(value) > 0


def test_invalid_temperature() -> None:
    with pytest.raises(ValueError, match="Invalid temperature: 0"):
        smooth_sharpness_dimension(torch.ones(3), 0.1, temperature=0)


def test_invalid_eigenvalue_shape() -> None:
    with pytest.raises(ValueError, match=r"Invalid eigenvalues: shape \(2, 2\)"):
        smooth_sharpness_dimension(torch.ones(2, 2), 0.1, temperature=0.1)


def test_non_finite_eigenvalues() -> None:
    with pytest.raises(ValueError, match="Invalid eigenvalues: contains NaN or inf"):
        smooth_sharpness_dimension(torch.tensor([1.0, float("nan")]), 0.1, temperature=0.1)


def test_invalid_weights() -> None:
    with pytest.raises(ValueError, match="Invalid weights"):
        smooth_sharpness_dimension(
            torch.ones(3), 0.1, temperature=0.1, weights=torch.tensor([1.0, -1.0, 1.0])
        )


def test_invalid_bulk_dim() -> None:
    with pytest.raises(ValueError, match="Invalid bulk_dim: -1"):
        smooth_sharpness_dimension(torch.ones(3), 0.1, temperature=0.1, bulk_dim=-1)


def test_saturated_surrogate_keeps_a_zero_gradient() -> None:
    ev = torch.tensor([30.0, -2.0], dtype=torch.float64)
    value, grad = surrogate_weights(ev, 0.1, temperature=0.01)
    assert float(value) == 2.0
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))
