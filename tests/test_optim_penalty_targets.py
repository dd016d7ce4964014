"""``penalty_target="edge"`` and ``"negative"``: the gradients they add, against ground truth.

A tanh MLP in float64 at initialisation, whose dense Hessian (``torch.autograd.functional``)
has negative eigenvalues. With one direction selected the random-sign estimator is
deterministic (its sign squares away), so the penalty gradient must equal, up to the central
difference's ``O(h²)``, the gradient of the selected eigenvalue itself — computed here by finite
differences of the dense Hessian's eigenvalue over the parameters.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sdopt import SDOptimizer


def _problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, (x, y)


def _hessian(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    theta = parameters_to_vector(model.parameters()).detach()

    def loss(t: torch.Tensor) -> torch.Tensor:
        clone = _problem()[0]
        params = dict(zip((n for n, _ in clone.named_parameters()), _split(t, model)))
        return F.cross_entropy(torch.func.functional_call(clone, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)


def _split(t: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    out, i = [], 0
    for p in model.parameters():
        out.append(t[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _eig_gradient(model: nn.Module, batch, which: int, h: float = 1e-5) -> torch.Tensor:
    """d λ_which / dθ by central differences of the dense Hessian's eigenvalue."""
    theta = parameters_to_vector(model.parameters()).detach().clone()
    grad = torch.zeros_like(theta)
    for i in range(len(theta)):
        vals = []
        for sign in (1.0, -1.0):
            t = theta.clone()
            t[i] += sign * h
            vector_to_parameters(t, model.parameters())
            vals.append(torch.linalg.eigvalsh(_hessian(model, batch))[which])
        grad[i] = (vals[0] - vals[1]) / (2 * h)
    vector_to_parameters(theta, model.parameters())
    return grad


def _penalty_grad(target: str, lr: float) -> tuple[torch.Tensor, SDOptimizer]:
    model, batch = _problem()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), model=model, loss_fn=F.cross_entropy,
        data=batch, mode="penalty", every=1, k=1, estimator="exact", penalty_target=target,
        penalty_every=1, estimate_kwargs={"k_bottom": 1},
    )  # fmt: skip
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()
    return opt._penalty_grad, opt


def test_edge_penalty_is_the_gradient_of_lambda_max_beyond_the_edge() -> None:
    model, batch = _problem()
    eig = torch.linalg.eigvalsh(_hessian(model, batch))
    lr = 2.0 / float(eig[-1])  # at the edge: the top direction is selected
    grad, opt = _penalty_grad("edge", lr)
    truth = _eig_gradient(model, batch, -1)
    assert torch.allclose(grad, truth, rtol=1e-3, atol=1e-6 * truth.abs().max())
    assert opt.last_estimate.penalty == pytest.approx(1e-3 * float(eig[-1]), rel=1e-6)
    # below 0.9 of the edge nothing is selected: no gradient, no products spent
    grad_low, _ = _penalty_grad("edge", 0.5 * lr)
    assert not bool(grad_low.any())


def test_negative_penalty_raises_the_most_negative_eigenvalue() -> None:
    model, batch = _problem()
    eig = torch.linalg.eigvalsh(_hessian(model, batch))
    assert eig[0] < -0.01 * eig.abs().max()  # negative curvature at initialisation
    grad, opt = _penalty_grad("negative", 0.1)
    truth = -_eig_gradient(model, batch, 0)  # descending on -λ_min raises it
    assert torch.allclose(grad, truth, rtol=1e-3, atol=1e-6 * truth.abs().max())
    assert opt.last_estimate.penalty == pytest.approx(-1e-3 * float(eig[0]), rel=1e-6)


def test_invalid_penalty_target_is_named() -> None:
    model, batch = _problem()
    with pytest.raises(ValueError, match="Invalid penalty_target: 'flat'"):
        SDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=F.cross_entropy,
            data=batch, mode="penalty", penalty_target="flat",
        )  # fmt: skip


@pytest.mark.parametrize("ratio", [1.0, 0.25, None])
def test_the_penalty_never_outweighs_the_loss_gradient(ratio: float | None) -> None:
    model, batch = _problem()
    eig = torch.linalg.eigvalsh(_hessian(model, batch))
    lr = 2.0 / float(eig[-1])
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), model=model, loss_fn=F.cross_entropy,
        data=batch, mode="penalty", every=1, k=1, estimator="exact", penalty_target="edge",
        penalty_every=1, penalty_strength=100.0, penalty_max_ratio=ratio,
    )  # fmt: skip
    theta = parameters_to_vector(model.parameters()).detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    opt.step()
    step = (theta - parameters_to_vector(model.parameters()).detach()) / lr
    added = step - grad
    pen = 100.0 * opt._penalty_grad
    if ratio is None:  # uncapped: the full strength, here 100 x the penalty gradient
        assert torch.allclose(added, pen, rtol=1e-10, atol=1e-12)
        assert added.norm() > 10 * grad.norm()
    else:  # capped at ratio x the loss gradient's norm, same direction
        assert float(added.norm()) == pytest.approx(ratio * float(grad.norm()), rel=1e-9)
        assert torch.allclose(added / added.norm(), pen / pen.norm(), atol=1e-10)


def test_invalid_penalty_max_ratio_is_named() -> None:
    model, batch = _problem()
    with pytest.raises(ValueError, match="Invalid penalty_max_ratio: 0"):
        SDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=F.cross_entropy,
            data=batch, mode="penalty", penalty_max_ratio=0,
        )  # fmt: skip
