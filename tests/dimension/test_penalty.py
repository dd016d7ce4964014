"""Penalty gradients: Rayleigh quotients vs dense-Hessian finite differences; the direction of
the surrogate's parameter gradient vs finite differences of the exact SD (float64, tiny MLP);
the random-sign two-gradient estimator vs the exact double-backward gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sdopt import sharpness_dimension, sharpness_dimension_penalty, smooth_sharpness_dimension
from sdopt.curvature import make_functional_loss
from sdopt.dimension import weighted_kaplan_yorke
from sdopt.dimension.exponents import lyapunov_exponents
from sdopt.dimension.penalty import penalty_gradient, rayleigh_quotients
from sdopt.dimension.surrogate import surrogate_weights


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)
    ).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    return model, (x, y)


def dense_hessian(model: nn.Module, data, flat: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, [c.view(s) for c, s in zip(theta.split(sizes), shapes)]))
        return nn.functional.mse_loss(functional_call(model, parts, (data[0],)), data[1])

    return hessian(loss)(flat)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_penalty_backward_matches_dense_finite_difference() -> None:
    model, data = tiny()
    theta = flat_params(model)
    d = theta.numel()
    ev = torch.linalg.eigvalsh(dense_hessian(model, data, theta))
    lr = 2.2 / float(ev[-1])  # the top eigenvalue just beyond the edge of stability
    tau = 0.1

    def surrogate(t: torch.Tensor) -> float:
        e = torch.linalg.eigvalsh(dense_hessian(model, data, t))
        return float(smooth_sharpness_dimension(e, lr, temperature=tau))

    penalty = sharpness_dimension_penalty(
        model, nn.functional.mse_loss, data, lr, k=d, temperature=tau, num_probes=0, tol=1e-10
    )
    assert float(penalty.detach()) == pytest.approx(surrogate(theta), rel=1e-8)
    penalty.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        r = torch.randn(d, generator=g, dtype=torch.float64)
        h = 1e-5
        fd = (surrogate(theta + h * r) - surrogate(theta - h * r)) / (2 * h)
        assert float(grad @ r) == pytest.approx(fd, rel=1e-4, abs=1e-8)
    # the model itself is untouched
    assert torch.equal(flat_params(model), theta)


def test_penalty_with_bulk_and_info() -> None:
    model, data = tiny()
    value, info = sharpness_dimension_penalty(
        model, nn.functional.mse_loss, data, 1.0, k=3, temperature=0.05,
        generator=torch.Generator().manual_seed(0), return_info=True,
    )  # fmt: skip
    assert value.ndim == 0 and value.requires_grad
    assert info["eigenvectors"].shape == (20, 5)  # k = 3 top + k_bottom = 2 bottom
    assert info["bulk_dim"] == 15
    assert info["num_products"] > 0


def test_penalty_sees_both_ends_and_an_slq_bulk() -> None:
    """Top and bottom eigenpairs exact, the bulk from deflated SLQ (weights sum to d − k − kb)."""
    model, data = tiny()
    theta = flat_params(model)
    ev = torch.linalg.eigvalsh(dense_hessian(model, data, theta))
    lr = 2.2 / float(ev[-1])
    value, info = sharpness_dimension_penalty(
        model, nn.functional.mse_loss, data, lr, k=3, k_bottom=2, num_probes=3, num_steps=15,
        tol=1e-10, generator=torch.Generator().manual_seed(0), return_info=True,
    )  # fmt: skip
    top_bottom = torch.cat([ev.flip(0)[:3], ev[:2]])
    assert torch.allclose(info["eigenvalues"], top_bottom, rtol=1e-6, atol=1e-9)
    assert float(info["bulk_weights"].sum()) == pytest.approx(15.0, rel=1e-10)
    again = smooth_sharpness_dimension(
        info["eigenvalues"], lr, temperature=info["temperature"], bulk_nodes=info["bulk_nodes"],
        bulk_weights=info["bulk_weights"],
    )  # fmt: skip
    assert float(value.detach()) == pytest.approx(float(again), rel=1e-6)
    value.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert bool(torch.isfinite(grad).all())


def exact_weighted_d3(model, data, vecs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    f = make_functional_loss(model, nn.functional.mse_loss, data)
    alphas = rayleigh_quotients(f, vecs)
    grads = torch.autograd.grad((w * alphas).sum(), list(model.parameters()))
    return torch.cat([gr.reshape(-1) for gr in grads])


def test_random_sign_estimator_is_exact_for_one_vector() -> None:
    model, data = tiny()
    theta = flat_params(model)
    h = dense_hessian(model, data, theta)
    ev, vecs = torch.linalg.eigh(h)
    v = vecs[:, -1:]
    w = torch.tensor([0.7], dtype=torch.float64)
    exact = exact_weighted_d3(model, data, v, w)
    est = penalty_gradient(
        model, nn.functional.mse_loss, data, 0.5, eigenvalues=ev[-1:], eigenvectors=v, weights=w,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.allclose(est, exact, rtol=1e-5, atol=1e-8)


def test_random_sign_estimator_is_unbiased_with_mixed_weights() -> None:
    model, data = tiny()
    theta = flat_params(model)
    ev, vecs = torch.linalg.eigh(dense_hessian(model, data, theta))
    v = vecs[:, -3:]
    w = torch.tensor([0.5, -0.3, 1.2], dtype=torch.float64)
    exact = exact_weighted_d3(model, data, v, w)
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([
        penalty_gradient(model, nn.functional.mse_loss, data, 0.5, eigenvalues=ev[-3:],
                         eigenvectors=v, weights=w, generator=g)
        for _ in range(300)
    ])  # fmt: skip
    mean = samples.mean(0)
    se = samples.std(0) / 300**0.5
    assert bool(((mean - exact).abs() <= 4 * se + 1e-6).all())
    # and a single sample is not the exact answer (cross terms): the test can fail
    assert not torch.allclose(samples[0], exact, rtol=1e-3)


def test_surrogate_weights_drive_the_estimator() -> None:
    model, data = tiny()
    theta = flat_params(model)
    ev, vecs = torch.linalg.eigh(dense_hessian(model, data, theta))
    lr = 2.2 / float(ev[-1])
    est = penalty_gradient(
        model, nn.functional.mse_loss, data, lr, eigenvalues=ev, eigenvectors=vecs,
        temperature=0.1, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert est.shape == (20,) and torch.isfinite(est).all()


def test_invalid_k() -> None:
    model, data = tiny()
    with pytest.raises(ValueError, match="Invalid k: 0"):
        sharpness_dimension_penalty(model, nn.functional.mse_loss, data, 0.1, k=0)


def test_invalid_eigenvectors_shape() -> None:
    model, data = tiny()
    with pytest.raises(ValueError, match=r"Invalid eigenvectors: shape \(5, 1\)"):
        penalty_gradient(
            model, nn.functional.mse_loss, data, 0.1, eigenvalues=torch.ones(1),
            eigenvectors=torch.ones(5, 1),
        )  # fmt: skip


def test_invalid_weights_shape() -> None:
    model, data = tiny()
    with pytest.raises(ValueError, match=r"Invalid weights: shape \(2,\)"):
        penalty_gradient(
            model, nn.functional.mse_loss, data, 0.1, eigenvalues=torch.ones(1),
            eigenvectors=torch.ones(20, 1, dtype=torch.float64), weights=torch.ones(2),
        )  # fmt: skip


# --------------------------------------------------------------------------- gradient direction
# The exact SD as a function of the flat parameters (dense Hessian -> eigvalsh -> Kaplan–Yorke),
# its central finite-difference gradient, and the surrogate's gradient with every eigenpair exact
# (double backward through v_iᵀ H(θ) v_i).


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """2-layer tanh MLP with biases, 32 parameters, 6 points (14 negative eigenvalues)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    return model, (x, y)


def exact_sd(ev: torch.Tensor, lr: float, exponent_map: str, beta: float) -> float:
    if exponent_map == "gd":
        return sharpness_dimension(ev, lr)
    z = lyapunov_exponents(ev, lr, map=exponent_map, momentum=beta)
    return weighted_kaplan_yorke(z, torch.ones_like(z))


@pytest.fixture(scope="module")
def perturbed_spectra() -> dict:
    """Eigenvalues at θ ± h e_j for every coordinate (2d dense Hessians, computed once)."""
    model, data = mlp()
    theta = flat_params(model)
    d, h = theta.numel(), 1e-6
    steps = h * torch.eye(d, dtype=torch.float64)
    spectra = [
        torch.linalg.eigvalsh(dense_hessian(model, data, theta + sgn * steps[j]))
        for sgn in (1.0, -1.0)
        for j in range(d)
    ]
    ev, vecs = torch.linalg.eigh(dense_hessian(model, data, theta))
    return {"plus": spectra[:d], "minus": spectra[d:], "h": h, "ev": ev, "vecs": vecs}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# measured (python -m pytest -q tests/dimension/test_penalty.py -k direction -s):
# gd: SD 30.481 of 32, cosine 0.994 (default τ), 0.981 (τ = 0.1), 1.0000 (τ = 1e-4);
# momentum β = 0.9: SD 62.062 of 64, cosine 0.991 (default τ)
@pytest.mark.parametrize(("exponent_map", "beta"), [("gd", 0.0), ("momentum", 0.9)])
def test_penalty_gradient_direction_matches_finite_differences_of_exact_sd(
    perturbed_spectra: dict, exponent_map: str, beta: float
) -> None:
    model, data = mlp()
    ev, vecs = perturbed_spectra["ev"], perturbed_spectra["vecs"]
    edge = 2.0 * (1.0 + beta)
    lr = 1.25 * edge / float(ev[-1])  # the top eigenvalue beyond the map's edge
    sd = exact_sd(ev, lr, exponent_map, beta)
    mass = ev.numel() * (1 if exponent_map == "gd" else 2)
    # a differentiable state: SD strictly between integers, no exponent at -inf
    assert 0.05 < sd % 1 < 0.95 and 0 < sd < mass
    assert float((1 - lr * ev).abs().min()) > 1e-3
    h = perturbed_spectra["h"]
    fd = torch.tensor([
        (exact_sd(p, lr, exponent_map, beta) - exact_sd(m, lr, exponent_map, beta)) / (2 * h)
        for p, m in zip(perturbed_spectra["plus"], perturbed_spectra["minus"])
    ], dtype=torch.float64)  # fmt: skip
    f = make_functional_loss(model, nn.functional.mse_loss, data)
    alphas = rayleigh_quotients(f, vecs)

    def grad_at(tau: float | None) -> torch.Tensor:
        s = smooth_sharpness_dimension(
            alphas, lr, temperature=tau, exponent_map=exponent_map, momentum=beta
        )
        g = torch.autograd.grad(s, list(model.parameters()), retain_graph=True)
        return torch.cat([x.reshape(-1) for x in g])

    # the ground truth is sound: the τ → 0 surrogate gradient is the exact one
    assert cosine(grad_at(1e-4), fd) > 0.999
    g_default = grad_at(None)
    print(f"{exponent_map}: SD {sd:.3f}/{mass}, cos(default) {cosine(g_default, fd):.4f}, "
          f"cos(τ=0.1) {cosine(grad_at(0.1), fd):.4f}")  # fmt: skip
    assert cosine(g_default, fd) > 0.9
    if exponent_map == "gd":  # the penalty entry point gives the same gradient
        model.zero_grad()
        penalty = sharpness_dimension_penalty(
            model, nn.functional.mse_loss, data, lr, k=ev.numel() - 2, k_bottom=2, num_probes=0,
            tol=1e-12,
        )  # fmt: skip
        penalty.backward()
        g_pen = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(g_pen, g_default, rtol=1e-5, atol=1e-8)


def test_random_sign_estimator_with_surrogate_weights_is_unbiased() -> None:
    """The two-gradient estimator with the surrogate's own (mixed-sign) weights, all eigenpairs
    exact, averages to the exact double-backward gradient of the surrogate."""
    model, data = mlp()
    ev, vecs = torch.linalg.eigh(dense_hessian(model, data, flat_params(model)))
    lr = 2.5 / float(ev[-1])
    _, w = surrogate_weights(ev, lr)
    assert bool((w > 0).any()) and bool((w < 0).any())  # both signs: two directions
    exact = exact_weighted_d3(model, data, vecs, w)
    f = make_functional_loss(model, nn.functional.mse_loss, data)
    s = smooth_sharpness_dimension(rayleigh_quotients(f, vecs), lr)
    g = torch.autograd.grad(s, list(model.parameters()))
    assert torch.allclose(torch.cat([x.reshape(-1) for x in g]), exact, rtol=1e-8, atol=1e-10)
    gen = torch.Generator().manual_seed(0)
    base = f.value_and_gradient()[1]
    draws = 400
    samples = torch.stack([
        penalty_gradient(model, nn.functional.mse_loss, data, lr, eigenvalues=ev,
                         eigenvectors=vecs, gradient=base, generator=gen)
        for _ in range(draws)
    ])  # fmt: skip
    mean = samples.mean(0)
    se = samples.std(0) / draws**0.5
    assert bool(((mean - exact).abs() <= 4.5 * se + 1e-6).all())
    assert cosine(mean, exact) > 0.95
