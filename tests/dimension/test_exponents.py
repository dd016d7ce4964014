"""Exponent maps: the paper's GD map, heavy ball and Adam's frozen preconditioner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdopt import lyapunov_exponents, sharpness_dimension
from sdopt.dimension import (
    adam_preconditioner,
    kaplan_yorke_dimension,
    preconditioned_operator,
)


def test_gd_map_is_log_abs_one_minus_lr_alpha() -> None:
    ev = torch.tensor([3.0, 0.5, -1.0, 0.0], dtype=torch.float64)
    z = lyapunov_exponents(ev, 0.5, eps=1e-3)
    assert torch.allclose(z, torch.log(torch.abs(1 - 0.5 * ev) + 1e-3))


def test_momentum_roots_match_numpy_roots() -> None:
    lr, beta = 0.3, 0.9
    ev = torch.tensor([-2.0, 0.0, 0.1, 1.0, 5.0, 12.0, 30.0], dtype=torch.float64)
    z = lyapunov_exponents(ev, lr, map="momentum", momentum=beta)
    assert z.shape == (14,)
    for i, a in enumerate(ev.tolist()):
        roots = np.roots([1.0, -(1 + beta - lr * a), beta])
        expected = sorted(np.log(np.abs(roots)).tolist())
        got = sorted([float(z[i]), float(z[i + 7])])
        assert got == pytest.approx(expected, abs=1e-10)


def test_momentum_two_d_input_keeps_batches() -> None:
    ev = torch.rand(3, 5, dtype=torch.float64)
    z = lyapunov_exponents(ev, 0.1, map="momentum", momentum=0.5)
    assert z.shape == (3, 10)


def test_momentum_zero_reduces_to_gd_dimension() -> None:
    ev = [5.0, 0.3, 0.01, -0.05, 0.0]
    z = lyapunov_exponents(ev, 0.5, map="momentum", momentum=0.0)
    assert kaplan_yorke_dimension(z) == pytest.approx(sharpness_dimension(ev, 0.5))


def test_momentum_stability_edge() -> None:
    # heavy ball is stable iff 0 < ηα < 2(1 + β): the top exponent changes sign there
    lr, beta = 0.1, 0.5
    edge = 2 * (1 + beta) / lr
    inside = lyapunov_exponents([edge * 0.99], lr, map="momentum", momentum=beta)
    outside = lyapunov_exponents([edge * 1.01], lr, map="momentum", momentum=beta)
    assert inside.max() < 0 < outside.max()


def test_adam_map_uses_effective_step() -> None:
    ev = torch.tensor([1.0, 50.0], dtype=torch.float64)
    z0 = lyapunov_exponents(ev, 0.01, map="adam")
    assert torch.allclose(z0, lyapunov_exponents(ev, 0.01))
    z1 = lyapunov_exponents(ev, 0.01, map="adam", momentum=0.9)
    assert torch.allclose(z1, lyapunov_exponents(ev, 0.001, map="momentum", momentum=0.9))
    # Adam's edge of stability (2 + 2β₁)/((1 − β₁)η) (Cohen et al.)
    edge = (2 + 2 * 0.9) / (0.1 * 0.01)
    assert lyapunov_exponents([edge * 0.99], 0.01, map="adam", momentum=0.9).max() < 0
    assert lyapunov_exponents([edge * 1.01], 0.01, map="adam", momentum=0.9).max() > 0


def test_adam_preconditioner_from_optimizer_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    p = adam_preconditioner(opt)
    assert p.shape == (8,)
    w = model.weight
    v_hat = opt.state[w]["exp_avg_sq"] / (1 - 0.99**3)
    assert torch.allclose(p[:6], (v_hat.sqrt() + 1e-6).reshape(-1).double())


def test_adam_preconditioner_requires_state() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="Invalid optimizer: a parameter has no Adam state"):
        adam_preconditioner(opt)


def test_adam_preconditioner_marks_never_stepped_parameters_frozen() -> None:
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.Adam([*used.parameters(), *unused.parameters()])
    opt.zero_grad()
    used(torch.randn(4, 3)).sum().backward()
    opt.step()  # `unused` never gets a gradient, so Adam keeps no state for it
    with pytest.raises(ValueError, match="a parameter has no Adam state"):
        adam_preconditioner(opt)
    p = adam_preconditioner(opt, missing="frozen")
    assert torch.isfinite(p[:8]).all() and (p[:8] > 0).all()
    assert torch.isinf(p[8:]).all() and p.shape == (14,)
    with pytest.raises(ValueError, match="Invalid missing: 'skip'"):
        adam_preconditioner(opt, missing="skip")
    fresh = torch.optim.Adam(unused.parameters())
    with pytest.raises(ValueError, match="no parameter has Adam state"):
        adam_preconditioner(fresh, missing="frozen")


def test_preconditioned_dense_matrix_has_spectrum_of_p_inverse_h() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = a @ a.T
    p = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    m = preconditioned_operator(h, p)
    assert torch.allclose(m, m.T)
    expected = torch.sort(torch.linalg.eigvals(torch.diag(1 / p) @ h).real).values
    assert torch.allclose(torch.linalg.eigvalsh(m), expected)


def test_invalid_map_raises() -> None:
    with pytest.raises(ValueError, match="Invalid map: 'sgd'"):
        lyapunov_exponents([1.0], 0.1, map="sgd")


@pytest.mark.parametrize("beta", [-0.1, 1.0])
def test_invalid_momentum_raises(beta: float) -> None:
    with pytest.raises(ValueError, match="Invalid momentum"):
        lyapunov_exponents([1.0], 0.1, map="momentum", momentum=beta)


def test_gd_map_rejects_momentum() -> None:
    with pytest.raises(ValueError, match=r"Invalid momentum: 0.9 \(the 'gd' map has no momentum"):
        lyapunov_exponents([1.0], 0.1, momentum=0.9)


def test_exponents_reject_bad_lr() -> None:
    with pytest.raises(ValueError, match="Invalid lr: 0"):
        lyapunov_exponents([1.0], 0)


def test_complex_pair_modulus_is_sqrt_beta() -> None:
    z = lyapunov_exponents([10.0], 0.1, map="momentum", momentum=0.81)
    assert z.tolist() == pytest.approx([math.log(0.9)] * 2)


@pytest.mark.parametrize(
    ("map", "momentum", "edge"),
    [("gd", 0.0, 2.0), ("momentum", 0.9, 3.8), ("momentum", 0.5, 3.0), ("adam", 0.9, 38.0),
     ("adam", 0.0, 2.0)],
)  # fmt: skip
def test_edge_of_stability_is_where_the_top_exponent_turns_positive(
    map: str, momentum: float, edge: float
) -> None:
    from sdopt.dimension import edge_of_stability

    assert edge_of_stability(map, momentum) == pytest.approx(edge, rel=1e-12)
    lr = 0.01
    for factor, sign in ((0.99, -1), (1.01, 1)):
        alpha = torch.tensor([factor * edge / lr], dtype=torch.float64)
        top = lyapunov_exponents(alpha, lr, map=map, momentum=momentum).max()
        assert torch.sign(top) == sign


def test_edge_of_stability_rejects_bad_input() -> None:
    from sdopt.dimension import edge_of_stability

    with pytest.raises(ValueError, match="Invalid map: 'sgd'"):
        edge_of_stability("sgd")
    with pytest.raises(ValueError, match=r"Invalid momentum: 1\.0"):
        edge_of_stability("momentum", 1.0)
