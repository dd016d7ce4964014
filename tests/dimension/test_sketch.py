"""Product-free SD from stored spectra: exact readings, density readings, jackknife."""

from __future__ import annotations

import math

import pytest
import torch

from sdopt import sharpness_dimension
from sdopt.dimension import kaplan_yorke_dimension, lyapunov_exponents
from sdopt.dimension.sketch import (
    SpectrumSketch,
    _interval_sd,
    equal_mass_quantiles,
    sd_from_spectrum,
)


def spectra(batches: int = 3, d: int = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ev = torch.randn(batches, d, generator=g, dtype=torch.float64) * 0.3 + 0.05
    ev[:, :5] = torch.tensor([25.0, 18.0, 9.0, 6.0, -1.0], dtype=torch.float64)
    return ev


def test_exact_spectra_reproduce_sharpness_dimension() -> None:
    ev = spectra()
    for lr in (0.02, 0.1, 0.3):
        value, se = sd_from_spectrum(ev, lr)
        assert value == pytest.approx(sharpness_dimension(ev, lr), abs=1e-9)
        assert se >= 0
    assert sd_from_spectrum(ev[0], 0.1)[0] == pytest.approx(sharpness_dimension(ev[0], 0.1))


def test_quantile_pooling_with_unequal_weights_matches_expansion() -> None:
    # group 0: eigenvalue 25 once and 0.1 three times, as one node of weight 3
    nodes = torch.tensor([[25.0, 0.1, 9.0], [22.0, 0.2, 0.2]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 3.0, 1.0], [1.0, 2.0, 2.0]], dtype=torch.float64)
    sk = SpectrumSketch(nodes, weights, 5)
    dense = torch.tensor(
        [[25.0, 0.1, 0.1, 0.1, 9.0], [22.0, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64
    )
    assert sd_from_spectrum(sk, 0.1)[0] == pytest.approx(sharpness_dimension(dense, 0.1))


def test_momentum_map_from_sketch() -> None:
    ev = spectra(1)[0]
    z = lyapunov_exponents(ev, 0.1, map="momentum", momentum=0.5)
    value, _ = sd_from_spectrum(ev, 0.1, exponent_map="momentum", momentum=0.5)
    assert value == pytest.approx(kaplan_yorke_dimension(z))


def test_uniform_density_matches_fine_point_discretisation() -> None:
    edges = torch.linspace(-1.0, 30.0, 101, dtype=torch.float64)
    masses = torch.full((100,), 100.0, dtype=torch.float64)
    pts = torch.linspace(-1.0, 30.0, 200_001, dtype=torch.float64)
    fine = sharpness_dimension(pts, 0.1) / pts.numel() * 10_000
    for eps in (0.0, 1e-3):
        got = _interval_sd(edges, masses, 0.1, eps, "gd", 0.0)
        ref = sharpness_dimension(pts, 0.1, eps=eps) / pts.numel() * 10_000
        assert got == pytest.approx(ref, rel=1e-4)
    assert _interval_sd(edges, masses, 0.1, 0.0, "gd", 0.0) == pytest.approx(fine, rel=1e-4)


def test_density_readings_approach_exact_for_fine_settings() -> None:
    ev = spectra(1, 400)[0]
    exact = sharpness_dimension(ev, 0.1)
    nodes, weights = ev[None, :], torch.ones_like(ev)[None, :]
    for kind, options in (
        ("quantiles", {"num_quantiles": 400}),
        ("histogram", {"bins": 4000}),
        ("kde", {"bandwidth": 1e-3, "grid": 40_000}),
    ):
        sk = SpectrumSketch(nodes, weights, 400, kind, "mixture", options)
        assert sd_from_spectrum(sk, 0.1)[0] == pytest.approx(exact, rel=0.02), kind


def test_below_edge_is_zero_for_every_reading() -> None:
    ev = torch.linspace(1.0, 15.0, 50, dtype=torch.float64)[None, :]  # KDE tails stay > 0
    for kind in ("points", "quantiles", "histogram", "kde"):
        sk = SpectrumSketch(ev, torch.ones_like(ev), 50, kind, "mixture", {"num_quantiles": 50})
        assert sd_from_spectrum(sk, 0.1)[0] == 0.0, kind


def test_equal_mass_quantiles() -> None:
    nodes = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    assert equal_mass_quantiles(nodes, weights, 4).tolist() == [1.0, 2.0, 2.0, 3.0]


def test_jackknife_is_zero_for_identical_groups_and_nan_for_one() -> None:
    ev = spectra(1)[0]
    same = torch.stack([ev, ev, ev])
    assert sd_from_spectrum(same, 0.1)[1] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(sd_from_spectrum(ev, 0.1)[1])
    assert math.isnan(sd_from_spectrum(same, 0.1, uncertainty=False)[1])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="Invalid lr"):
        sd_from_spectrum(spectra(), -0.1)
    with pytest.raises(ValueError, match="Invalid exponent_map: 'x'"):
        sd_from_spectrum(spectra(), 0.1, exponent_map="x")
    with pytest.raises(ValueError, match="Invalid spectrum: contains NaN or inf"):
        sd_from_spectrum(torch.tensor([1.0, float("nan")]), 0.1)
