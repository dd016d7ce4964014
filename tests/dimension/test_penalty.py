"""Penalty gradients: Rayleigh quotients vs dense-Hessian finite differences; the random-sign
two-gradient estimator vs the exact double-backward gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sdopt import sharpness_dimension_penalty, smooth_sharpness_dimension
from sdopt.curvature import make_functional_loss
from sdopt.dimension.penalty import penalty_gradient, rayleigh_quotients


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
    assert info["eigenvectors"].shape == (20, 3)
    assert info["bulk_dim"] == 17
    assert info["num_products"] > 0


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
