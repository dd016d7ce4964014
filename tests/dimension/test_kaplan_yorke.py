"""Exact Kaplan–Yorke and sharpness-dimension formulas against THEORY.md §2 and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdopt import kaplan_yorke_dimension, sharpness_dimension
from sdopt.dimension import weighted_kaplan_yorke


def reference_ky(exponents: list[float]) -> float:
    """Textbook loop, independent of the vectorised implementation."""
    z = sorted(exponents, reverse=True)
    if z[0] < 0:
        return 0.0
    s, j = 0.0, 0
    for i, v in enumerate(z):
        if s + v >= 0:
            s, j = s + v, i + 1
        else:
            break
    # partial sums are concave: once negative they stay negative
    return float(j) if j == len(z) else j + s / abs(z[j])


def test_worked_example_from_theory() -> None:
    sd = sharpness_dimension([3.0, 0.5, 0.01, 0.0], 1.0)
    z = [math.log(2.0), math.log(0.5), math.log(0.99), 0.0]
    expected = 3 + (math.log(2.0) + math.log(0.99)) / abs(math.log(0.5))
    assert sd == pytest.approx(expected, abs=1e-12)
    assert round(sd, 3) == 3.986
    assert kaplan_yorke_dimension(z) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ["list", "numpy", "torch32", "torch64"])
def test_accepts_lists_arrays_and_tensors(kind: str) -> None:
    ev = [3.0, 0.5, 0.01, 0.0]
    value = {
        "list": ev,
        "numpy": np.array(ev),
        "torch32": torch.tensor(ev, dtype=torch.float32),
        "torch64": torch.tensor(ev, dtype=torch.float64),
    }[kind]
    assert sharpness_dimension(value, 1.0) == pytest.approx(3.986, abs=1e-3)


def test_all_contracting_gives_zero() -> None:
    # every eigenvalue in (0, 2/lr): below the edge of stability
    assert sharpness_dimension([0.1, 0.5, 1.0, 1.9], 1.0) == 0.0
    assert kaplan_yorke_dimension([-0.1, -2.0, -0.3]) == 0.0


def test_all_expanding_gives_d() -> None:
    assert sharpness_dimension([3.0, 5.0, -1.0], 1.0) == 3.0
    assert kaplan_yorke_dimension([0.5, 0.1, 0.0]) == 3.0


def test_minus_infinity_exponent_at_one_over_lr() -> None:
    # α = 1/η exactly with ε = 0 gives log 0 = -inf: that direction adds nothing
    sd = sharpness_dimension([3.0, 1.0], 1.0)
    assert sd == 1.0
    assert kaplan_yorke_dimension([0.2, -math.inf]) == 1.0
    assert kaplan_yorke_dimension([-math.inf, -math.inf]) == 0.0
    # with ε > 0 the exponent is finite and the fraction appears
    sd_eps = sharpness_dimension([3.0, 1.0], 1.0, eps=1e-3)
    assert sd_eps == pytest.approx(1 + math.log(2.001) / abs(math.log(1e-3)), rel=1e-12)


def test_ties_and_order_do_not_matter() -> None:
    z = [0.3, -0.2, 0.3, -0.2, -0.2, -1.0]
    assert kaplan_yorke_dimension(z) == pytest.approx(reference_ky(z))
    assert kaplan_yorke_dimension(z[::-1]) == kaplan_yorke_dimension(z)
    # 0.6 - 0.2 - 0.2 - 0.2 = 0 exactly -> j* = 5 (partial sum >= 0 is inclusive)
    assert kaplan_yorke_dimension([0.5, 0.5, -0.5, -0.5, -1.0]) == pytest.approx(4.0)


def test_random_exponents_match_reference_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        z = (torch.randn(20, generator=g, dtype=torch.float64) - 0.2).tolist()
        assert kaplan_yorke_dimension(z) == pytest.approx(reference_ky(z), abs=1e-12)


def test_minibatch_spectra_are_sorted_then_averaged() -> None:
    lr = 0.5
    spectra = torch.tensor([[5.0, 0.1, 0.0, 2.0], [0.0, 4.5, 1.0, -0.3]], dtype=torch.float64)
    z = torch.log(torch.abs(1 - lr * spectra))
    averaged = torch.sort(z, dim=1, descending=True).values.mean(0)
    expected = reference_ky(averaged.tolist())
    assert sharpness_dimension(spectra, lr) == pytest.approx(expected, abs=1e-12)
    assert sharpness_dimension(spectra.numpy(), lr) == pytest.approx(expected, abs=1e-12)
    # one row equals the 1-D call
    assert sharpness_dimension(spectra[:1], lr) == sharpness_dimension(spectra[0], lr)


def test_weighted_ky_with_unit_weights_is_ky() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        z = torch.randn(15, generator=g, dtype=torch.float64) - 0.1
        assert weighted_kaplan_yorke(z, torch.ones(15, dtype=torch.float64)) == pytest.approx(
            kaplan_yorke_dimension(z), abs=1e-12
        )
    # a block of weight 3 equals three equal exponents
    z = torch.tensor([0.4, -0.3], dtype=torch.float64)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert weighted_kaplan_yorke(z, w) == pytest.approx(
        kaplan_yorke_dimension([0.4, -0.3, -0.3, -0.3])
    )


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, float("inf")], [float("-inf")]])
def test_non_finite_eigenvalues_raise(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="Invalid eigenvalues: contains NaN or inf"):
        sharpness_dimension(bad, 1.0)


def test_nan_exponent_raises() -> None:
    with pytest.raises(ValueError, match="Invalid exponents: contains NaN"):
        kaplan_yorke_dimension([0.1, float("nan")])


def test_plus_inf_exponent_raises() -> None:
    with pytest.raises(ValueError, match=r"Invalid exponents: contains \+inf"):
        kaplan_yorke_dimension([float("inf"), -1.0])


def test_empty_exponents_raise() -> None:
    with pytest.raises(ValueError, match="Invalid exponents: empty"):
        kaplan_yorke_dimension([])


def test_empty_eigenvalues_raise() -> None:
    with pytest.raises(ValueError, match="Invalid eigenvalues: empty"):
        sharpness_dimension([], 1.0)


def test_exponents_must_be_1d() -> None:
    with pytest.raises(ValueError, match=r"Invalid exponents: shape \(2, 2\)"):
        kaplan_yorke_dimension([[0.1, 0.2], [0.3, 0.4]])


def test_eigenvalues_must_be_1d_or_2d() -> None:
    with pytest.raises(ValueError, match=r"Invalid eigenvalues: shape \(1, 1, 2\)"):
        sharpness_dimension(torch.zeros(1, 1, 2), 1.0)


def test_non_numeric_eigenvalues_raise() -> None:
    with pytest.raises(ValueError, match="Invalid eigenvalues"):
        sharpness_dimension(["a", "b"], 1.0)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_lr_must_be_positive(lr: float) -> None:
    with pytest.raises(ValueError, match="Invalid lr"):
        sharpness_dimension([1.0], lr)


@pytest.mark.parametrize("eps", [-1e-3, float("nan")])
def test_eps_must_be_non_negative(eps: float) -> None:
    with pytest.raises(ValueError, match="Invalid eps"):
        sharpness_dimension([1.0], 1.0, eps=eps)
