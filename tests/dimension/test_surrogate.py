"""The smooth surrogate as a function of eigenvalues: gradcheck, convergence, the default
temperature's bias on a battery of spectra (against independent exact Kaplan–Yorke numbers),
exponent maps, and the estimate/sketch entry point."""

from __future__ import annotations

import pytest
import torch

from sdopt import sharpness_dimension, smooth_sharpness_dimension
from sdopt.dimension import weighted_kaplan_yorke
from sdopt.dimension.exponents import edge_of_stability, lyapunov_exponents
from sdopt.dimension.sketch import sd_from_spectrum
from sdopt.dimension.surrogate import (
    smooth_sharpness_dimension_from_estimate,
    surrogate_temperature,
    surrogate_weights,
)


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


# --------------------------------------------------------------------------- default temperature
# Ground truth: sdopt.sharpness_dimension (sort + cumulative sums) for the GD map, and
# weighted_kaplan_yorke of sdopt's library exponents (heavy_ball_exponents) for the others;
# the surrogate computes its own exponents and never sorts.

MAPS = [("gd", 0.0), ("momentum", 0.5), ("momentum", 0.9), ("adam", 0.9)]


def exact_sd(
    ev: torch.Tensor, lr: float, exponent_map: str, beta: float, w: torch.Tensor | None = None
) -> tuple[float, float]:
    """``(SD, D)`` of the measure ``Σ w δ_α`` under the map (``D`` = exponent mass)."""
    if exponent_map == "gd" and w is None:
        return sharpness_dimension(ev, lr), float(ev.numel())
    z = lyapunov_exponents(ev, lr, map=exponent_map, momentum=beta)
    weights = torch.ones_like(ev) if w is None else w
    wz = torch.cat([weights] * (z.numel() // ev.numel()))
    return weighted_kaplan_yorke(z, wz), float(wz.sum())


def battery(exponent_map: str, beta: float) -> dict[str, tuple[torch.Tensor, float]]:
    """Test spectra in units of the map's edge ``e = edge/η`` (so each one is where it says)."""
    lr = 0.5
    e = edge_of_stability(exponent_map, beta) / lr
    g = torch.Generator().manual_seed(0)

    def u(n: int) -> torch.Tensor:
        return torch.rand(n, generator=g, dtype=torch.float64)

    cases = {
        # negative eigenvalues + near-zero bulk of both signs: SD near d
        "negative+bulk": (
            torch.cat(
                [
                    e * torch.tensor([2.5, 2.2, 1.5], dtype=torch.float64),
                    e * (0.5 + 0.45 * u(15)),
                    -0.2 * u(60),
                    1e-3 + 2e-3 * torch.randn(1900, generator=g, dtype=torch.float64),
                    e * (0.95 + 0.04 * u(22)),
                ]
            ),
            lr,
        ),
        # PSD below the edge with a near-zero bulk (d = 10,000): SD = 0
        "psd-below-edge": (torch.cat([e * (0.5 + 0.49 * u(20)), 1e-6 + 1e-3 * u(9980)]), lr),
        # the top eigenvalue just beyond the edge, the rest PSD below it
        "just-beyond-edge": (
            torch.cat(
                [
                    e * torch.tensor([1.01], dtype=torch.float64),
                    e * (0.25 + 0.7 * u(10)),
                    0.002 + 0.02 * u(300),
                ]
            ),
            lr,
        ),
        # exactly at the edge: top exponent 0
        "at-edge": (
            torch.cat(
                [
                    e * torch.tensor([1.0], dtype=torch.float64),
                    e * (0.25 + 0.7 * u(10)),
                    0.002 + 0.02 * u(300),
                ]
            ),
            lr,
        ),
    }
    if exponent_map == "gd":  # THEORY §2: (3, 0.5, 0.01, 0) at η = 1 (for the heavy ball α = 0
        # has exponent exactly 0, the jump of SD, decided by rounding)
        cases["worked"] = (torch.tensor([3.0, 0.5, 0.01, 0.0], dtype=torch.float64), 1.0)
    return cases


CASES = [(m, b, name) for m, b in MAPS for name in battery(m, b)]


@pytest.mark.parametrize(("exponent_map", "beta", "name"), CASES)
def test_default_temperature_is_within_one_percent_of_exact(
    exponent_map: str, beta: float, name: str
) -> None:
    ev, lr = battery(exponent_map, beta)[name]
    sd, mass = exact_sd(ev, lr, exponent_map, beta)
    s = float(smooth_sharpness_dimension(ev, lr, exponent_map=exponent_map, momentum=beta))
    ref = min(sd, mass - sd)
    print(
        f"{exponent_map}({beta}) {name}: D={mass:.0f} SD={sd:.4f} S={s:.4f} bias={s - sd:.2e}"
        + (f" bias/min(SD,D-SD)={(s - sd) / ref:.2e}" if ref > 0 else "")
    )
    assert s >= sd - 1e-9  # softplus >= plus: an upper bound
    if 0 < sd < mass:
        # the criterion is 5 %; the rule guarantees 1 % (+ rounding)
        assert s - sd <= 0.01 * min(sd, mass - sd) * (1 + 1e-6) + 1e-9
    elif sd == 0:
        assert s <= 0.01 + 1e-9  # ≈ 0, not ≈ d
    else:
        assert s == mass


def test_psd_below_the_edge_default_is_zero_where_the_old_default_was_d() -> None:
    ev, lr = battery("gd", 0.0)["psd-below-edge"]
    assert sharpness_dimension(ev, lr) == 0.0
    old = float(smooth_sharpness_dimension(ev, lr, temperature=0.1))
    assert old > 0.99 * ev.numel()  # the defect of a fixed absolute temperature
    value, grad = surrogate_weights(ev, lr)
    print(
        f"psd-below-edge d={ev.numel()}: S(τ=0.1)={old:.2f}, S(default)={float(value):.2e}, "
        f"‖∂S/∂α‖₁={float(grad.abs().sum()):.2e}"
    )
    assert float(value) <= 0.01
    # flat: ‖∂S/∂z‖₁ <= 0.01, and |∂z/∂α| = η/|1 − ηα| <= η/0.01 here (ηα <= 0.99)
    assert float(grad.abs().sum()) <= 0.01 * lr / 0.01


@pytest.mark.parametrize(("exponent_map", "beta"), MAPS)
def test_exact_plus_weighted_bulk_nodes(exponent_map: str, beta: float) -> None:
    """Exact ends + weighted bulk nodes (a deflated-SLQ-like measure) vs its exact KY number."""
    g = torch.Generator().manual_seed(3)
    lr = 0.5
    e = edge_of_stability(exponent_map, beta) / lr
    exact = torch.cat(
        [
            e * torch.tensor([1.6, 1.3, 1.1, 0.7, 0.5], dtype=torch.float64),
            torch.tensor([-0.3, -0.1], dtype=torch.float64),
        ]
    )
    nodes = torch.cat(
        [
            -0.02 * torch.rand(30, generator=g, dtype=torch.float64),
            0.01 + 0.4 * torch.rand(50, generator=g, dtype=torch.float64),
        ]
    )
    w = torch.rand(80, generator=g, dtype=torch.float64)
    w = w * (393 / w.sum())  # d = 400
    sd, mass = exact_sd(
        torch.cat([exact, nodes]), lr, exponent_map, beta, torch.cat([torch.ones(7), w]).double()
    )
    s = smooth_sharpness_dimension(
        exact, lr, bulk_nodes=nodes, bulk_weights=w, exponent_map=exponent_map, momentum=beta
    )
    assert 0 < sd < mass
    assert 0 <= float(s) - sd <= 0.01 * min(sd, mass - sd) * (1 + 1e-6) + 1e-9


def test_bulk_nodes_see_bulk_structure_that_the_trace_misses() -> None:
    """A bulk with a negative part: deflated SLQ nodes track SD, the trace-only bulk does not."""
    from sdopt.spectrum import EigenResult, stochastic_lanczos_quadrature

    g = torch.Generator().manual_seed(0)
    d, lr = 400, 0.5
    ends = torch.tensor([4.6, 4.3, 4.1, 3.0, 2.5, 2.2, 2.0, 1.8, -0.3, -0.2, -0.1]).double()
    bulk = torch.cat(
        [
            -0.02 * torch.rand(150, generator=g, dtype=torch.float64),
            0.01 + 0.4 * torch.rand(d - 161, generator=g, dtype=torch.float64),
        ]
    )
    ev = torch.cat([ends, bulk])
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    hess = q @ torch.diag(ev) @ q.T
    known = EigenResult(ends, q[:, :11], torch.zeros(11), 0, True, 0, "LA")
    dens = stochastic_lanczos_quadrature(
        0.5 * (hess + hess.T), 4, 40, generator=torch.Generator().manual_seed(1), deflate=known
    )
    nodes, weights = dens.nodes.reshape(-1), dens.weights.reshape(-1) * (d - 11) / 4
    truth = sharpness_dimension(ev, lr)  # 203.0
    with_nodes = float(smooth_sharpness_dimension(ends, lr, bulk_nodes=nodes, bulk_weights=weights))
    trace_only = float(
        smooth_sharpness_dimension(ends, lr, bulk_dim=d - 11, bulk_trace=float(bulk.sum()))
    )
    print(f"bulk structure: SD={truth:.1f}, nodes={with_nodes:.1f}, trace only={trace_only:.1f}")
    assert abs(with_nodes - truth) < 0.05 * truth  # measured 200.3 vs 203.0
    assert abs(trace_only - truth) > 0.5 * truth  # measured 17.3


# --------------------------------------------------------------------------- gradients
def test_default_temperature_gradient_is_the_fixed_temperature_gradient() -> None:
    ev = spectrum(0)
    tau = surrogate_temperature(ev, 0.1)
    _, g_default = surrogate_weights(ev, 0.1)
    _, g_fixed = surrogate_weights(ev, 0.1, temperature=tau)
    assert torch.allclose(g_default, g_fixed, rtol=1e-12, atol=0)
    assert 0 < tau <= 1.0


@pytest.mark.parametrize(("exponent_map", "beta"), [("momentum", 0.9), ("adam", 0.5)])
def test_gradcheck_heavy_ball_maps(exponent_map: str, beta: float) -> None:
    lr = 0.5
    e = edge_of_stability(exponent_map, beta) / lr
    # eigenvalues on the real side, inside the complex region and negative
    ev = torch.tensor([1.3 * e, 1.1 * e, 0.6 * e, 0.2 * e, 0.3, 0.05, 0.01, -0.05, -0.2])
    ev = ev.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: smooth_sharpness_dimension(
            a, lr, temperature=0.05, exponent_map=exponent_map, momentum=beta
        ),
        (ev,),
    )


def test_heavy_ball_exponents_match_the_library_and_have_finite_gradients() -> None:
    from sdopt.dimension.exponents import heavy_ball_exponents
    from sdopt.dimension.surrogate import _heavy_ball_exponents

    lr = 0.5
    for beta in (0.0, 0.5, 0.9):
        # a grid through both boundaries of the complex region, ηα = (1 ± √β)², and 1/η
        marks = [(1 - beta**0.5) ** 2 / lr, (1 + beta**0.5) ** 2 / lr, 1 / lr]
        grid = torch.cat(
            [
                torch.linspace(-2.0, 10.0, 241, dtype=torch.float64),
                torch.tensor(marks, dtype=torch.float64),
            ]
        )
        grid.requires_grad_(True)
        ours = _heavy_ball_exponents(grid, lr, beta, 0.0)
        ref = heavy_ball_exponents(grid.detach(), lr, beta)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours.detach()), finite)
        assert torch.allclose(ours.detach()[finite], ref[finite], rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(torch.where(finite, ours, 0.0).sum(), grid)
        assert bool(torch.isfinite(g).all())
        if beta > 0:  # inside the complex region both moduli are √β: zero derivative
            lo, hi = marks[0], marks[1]
            inside = (grid.detach() > lo * 1.01) & (grid.detach() < hi * 0.99)
            assert bool((g[inside] == 0).all())


def test_what_the_gradient_pushes() -> None:
    """Descent on S moves exponents above the crossing toward 1/η; below it, (almost) nothing."""
    lr = 0.5
    ev = torch.tensor(
        [5.0, 4.4, 2.6, 2.1, 1.9, 0.02, 0.01, 0.001, -0.05, -0.3], dtype=torch.float64
    )
    value, grad = surrogate_weights(ev, lr)
    # exponents 0.41, 0.18, −1.20, −3.0, −3.0, −0.01, −0.005, −0.0005, 0.025, 0.14: the crossing
    # is at α = 2.6 (SD = 7 + 0.736/1.204 = 7.61)
    sd = sharpness_dimension(ev, lr)
    assert 0 <= float(value) - sd <= 0.01 * min(sd, ev.numel() - sd)
    # α beyond the edge (> 2/η = 4) and the crossing one (> 1/η): pushed down toward 1/η
    assert bool((grad[:3] > 0).all())
    # negative and near-zero α: pushed up toward 1/η
    assert bool((grad[5:] < 0).all())
    # α = 2.1 and 1.9 (exponent −3.0, below the crossing): no push
    assert float(grad[3:5].abs().max()) < 1e-12 * float(grad.abs().max())


def test_saturated_default_is_d_and_flat() -> None:
    ev = torch.tensor([30.0, -2.0, -0.5], dtype=torch.float64)
    value, grad = surrogate_weights(ev, 0.1)
    assert float(value) == 3.0 and torch.equal(grad, torch.zeros(3, dtype=torch.float64))


# --------------------------------------------------------------------------- from an estimate
def test_from_sketch_pools_groups_as_a_mixture() -> None:
    from sdopt.dimension.sketch import SpectrumSketch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        exact = torch.tensor([5.0, 4.2, -0.1], dtype=torch.float64) + 0.1 * torch.rand(
            3, generator=g, dtype=torch.float64
        )
        bulk = 0.02 * torch.randn(5, generator=g, dtype=torch.float64)
        rows.append((exact, bulk))
    nodes = torch.stack([torch.cat(r) for r in rows])
    weights = torch.cat([torch.ones(2, 3), torch.full((2, 5), 9.4)], dim=1).double()
    sketch = SpectrumSketch(nodes, weights, 50, pooling="mixture")
    value, grad = smooth_sharpness_dimension_from_estimate(sketch, lr=0.5, num_exact=3)
    assert grad.shape == (2, 3)
    manual_value, manual_grad = surrogate_weights(
        torch.cat([rows[0][0], rows[1][0]]),
        0.5,
        weights=torch.full((6,), 0.5).double(),
        bulk_nodes=torch.cat([rows[0][1], rows[1][1]]),
        bulk_weights=torch.full((10,), 4.7),
    )
    assert float(value) == pytest.approx(float(manual_value), rel=1e-12)
    assert torch.allclose(grad.reshape(-1), manual_grad)
    sd = sd_from_spectrum(sketch, 0.5, uncertainty=False)[0]
    assert 0 <= float(value) - sd <= 0.01 * min(sd, 50 - sd) + 1e-9
    with pytest.raises(ValueError, match="Invalid lr: None"):
        smooth_sharpness_dimension_from_estimate(sketch, num_exact=3)
    with pytest.raises(ValueError, match="Invalid num_exact: None"):
        smooth_sharpness_dimension_from_estimate(sketch, lr=0.5)
    kde = SpectrumSketch(nodes, weights, 50, kind="kde")
    with pytest.raises(ValueError, match="Invalid estimate: spectrum kind 'kde'"):
        smooth_sharpness_dimension_from_estimate(kde, lr=0.5, num_exact=3)


def test_from_an_estimate_like_object() -> None:
    """The attributes read from a SharpnessDimensionEstimate: spectrum, lr, eigenvalues, map."""
    from types import SimpleNamespace

    from sdopt.dimension.sketch import SpectrumSketch

    exact = torch.tensor([1.3, 1.1, 0.2, -0.05], dtype=torch.float64)
    bulk = torch.tensor([0.01, 0.002, -0.001], dtype=torch.float64)
    sketch = SpectrumSketch(
        torch.cat([exact, bulk])[None], torch.tensor([[1, 1, 1, 1, 20, 40, 6.0]]).double(), 70
    )
    est = SimpleNamespace(
        spectrum=sketch,
        lr=1.0,
        eigenvalues=exact[None],
        exponent_map="momentum",
        momentum=0.5,
        eps=0.0,
    )
    value, grad = smooth_sharpness_dimension_from_estimate(est)
    ref_value, ref_grad = surrogate_weights(
        exact,
        1.0,
        bulk_nodes=bulk,
        bulk_weights=torch.tensor([20, 40, 6.0]).double(),
        exponent_map="momentum",
        momentum=0.5,
    )
    assert float(value) == float(ref_value) and torch.equal(grad[0], ref_grad)
    sd = sd_from_spectrum(sketch, 1.0, exponent_map="momentum", momentum=0.5)[0]
    assert 0 < sd < 140
    assert 0 <= float(value) - sd <= 0.01 * min(sd, 140 - sd) + 1e-9


# --------------------------------------------------------------------------- invalid input
def test_invalid_exponent_map() -> None:
    with pytest.raises(ValueError, match="Invalid exponent_map: 'sgd'"):
        smooth_sharpness_dimension(torch.ones(3), 0.1, exponent_map="sgd")


def test_momentum_with_the_gd_map_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"Invalid momentum: 0\.9"):
        smooth_sharpness_dimension(torch.ones(3), 0.1, momentum=0.9)


def test_bulk_nodes_without_weights() -> None:
    with pytest.raises(ValueError, match="Invalid bulk_nodes/bulk_weights"):
        smooth_sharpness_dimension(torch.ones(3), 0.1, bulk_nodes=torch.zeros(2))


def test_invalid_bulk_weights() -> None:
    with pytest.raises(ValueError, match=r"Invalid bulk_weights: shape \(3,\)"):
        smooth_sharpness_dimension(
            torch.ones(3), 0.1, bulk_nodes=torch.zeros(2), bulk_weights=torch.ones(3)
        )
