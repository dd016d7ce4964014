"""Layer-wise learning rates: SD, edge_ratio and the controller use the map ``I - diag(η) H``.

Ground truth in float64: the dense Hessian by ``torch.autograd.functional.hessian`` on a tiny
tanh MLP (d = 26, no LayerNorm), ``η`` the per-coordinate ``lr`` of the param groups, and the
eigenvalues of ``I - diag(η) H`` computed directly (``torch.linalg.eigvals``, not symmetric).
SD is the Kaplan–Yorke dimension of ``log |eig|`` (THEORY.md §2); the edge ratio of the GD map
is ``max eig(diag(η) H) / 2``. Using the largest group LR everywhere (the old behaviour) gives
SD 22.3 instead of 18.4 on this state.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import sdopt
from sdopt.optim import SDOptimizer

LRS = (2.0, 0.5)  # first layer, second layer


def _problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    return model, (x, y)


def _hessian(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    numels = [p.numel() for p in params]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = [c.view(p.shape) for c, p in zip(flat.split(numels), params)]
        return F.mse_loss(functional_call(model, dict(zip(names, pieces)), (batch[0],)), batch[1])

    h = torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params]))
    return 0.5 * (h + h.T)


def _etas(model: nn.Module, lrs: tuple[float, float]) -> torch.Tensor:
    params = list(model.parameters())
    return torch.cat(
        [torch.full((p.numel(),), lrs[0] if i < 2 else lrs[1]) for i, p in enumerate(params)]
    ).double()


def _map_eigenvalues(h: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``I - diag(η) H`` (real: similar to a symmetric matrix)."""
    m = torch.linalg.eigvals(torch.eye(h.shape[0], dtype=h.dtype) - eta[:, None] * h)
    assert m.imag.abs().max() < 1e-10
    return m.real


def _true_sd(h: torch.Tensor, eta: torch.Tensor) -> float:
    return sdopt.kaplan_yorke_dimension(torch.log(_map_eigenvalues(h, eta).abs()))


def _groups(model: nn.Module, lrs: tuple[float, float], cls=torch.optim.SGD, **kw):
    params = list(model.parameters())
    return cls([{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}], **kw)


def _step(opt: SDOptimizer, model: nn.Module, batch) -> None:
    opt.zero_grad()
    F.mse_loss(model(batch[0]), batch[1]).backward()
    opt.step()


@pytest.fixture(scope="module")
def truth():
    model, batch = _problem()
    h = _hessian(model, batch)
    eta = _etas(model, LRS)
    return h, eta


def test_ground_truth_differs_from_the_largest_lr_everywhere(truth) -> None:
    h, eta = truth
    sd = _true_sd(h, eta)
    old = sdopt.sharpness_dimension(torch.linalg.eigvalsh(h), max(LRS))
    assert 0 < sd < h.shape[0] and abs(sd - old) > 2.0  # 18.4 against 22.3
    # the preconditioned route: I - η_ref D^{1/2} H D^{1/2} has the same spectrum
    d = (eta / max(LRS)).sqrt()
    mu = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])
    assert sdopt.sharpness_dimension(mu, max(LRS)) == pytest.approx(sd, abs=1e-9)


@pytest.mark.parametrize("estimator", ["exact", "deflated"])
def test_record_is_the_sd_and_edge_ratio_of_the_layerwise_map(truth, estimator) -> None:
    h, eta = truth
    model, batch = _problem()
    opt = SDOptimizer(
        _groups(model, LRS), model=model, loss_fn=F.mse_loss, data=batch, every=1,
        estimator=estimator,
    )  # fmt: skip
    _step(opt, model, batch)
    rec = opt.last_estimate
    assert rec.ok, rec.reason
    sd = _true_sd(h, eta)
    top = torch.linalg.eigvals(eta[:, None] * h).real.max().item()  # η_ref λ_max of the map
    if estimator == "exact":
        assert rec.sharpness_dimension == pytest.approx(sd, abs=1e-8)
    else:
        assert abs(rec.sharpness_dimension - sd) <= max(2 * rec.uncertainty, 0.1)
    assert rec.lr == max(LRS) and rec.base_lr == max(LRS)
    assert rec.lambda_max == pytest.approx(top / max(LRS), rel=1e-6)
    assert rec.edge_ratio == pytest.approx(top / 2, rel=1e-6)
    # the Hessian's own λ_max would give another edge ratio
    assert abs(max(LRS) * torch.linalg.eigvalsh(h).max().item() / 2 - rec.edge_ratio) > 0.1


def test_equal_group_lrs_are_the_plain_map_bit_for_bit() -> None:
    model, batch = _problem()
    opt = SDOptimizer(
        _groups(model, (0.5, 0.5)), model=model, loss_fn=F.mse_loss, data=batch, every=1, k=2
    )
    assert opt._preconditioner() is None
    by_hand = sdopt.estimate_sharpness_dimension(model, F.mse_loss, batch, 0.5, k=2)
    _step(opt, model, batch)
    assert opt.last_estimate.sharpness_dimension == by_hand.value


def test_a_group_with_lr_zero_is_left_where_it_is(truth) -> None:
    h, _ = truth
    model, batch = _problem()
    lrs = (2.0, 0.0)
    opt = SDOptimizer(
        _groups(model, lrs), model=model, loss_fn=F.mse_loss, data=batch, every=1,
        estimator="exact",
    )  # fmt: skip
    precond = opt._preconditioner()
    assert torch.isinf(precond[16:]).all() and (precond[:16] == 1.0).all()
    _step(opt, model, batch)
    eta = _etas(model, lrs)
    sd = _true_sd(h, eta)  # the frozen coordinates: map eigenvalue 1, exponent 0
    assert opt.last_estimate.ok and opt.last_estimate.sharpness_dimension == pytest.approx(
        sd, abs=1e-8
    )
    top = torch.linalg.eigvals(eta[:, None] * h).real.max().item()
    assert opt.last_estimate.edge_ratio == pytest.approx(top / 2, rel=1e-6)


def test_adam_map_combines_its_preconditioner_with_the_group_lrs() -> None:
    model, batch = _problem()
    lrs = (0.2, 0.05)
    base = _groups(model, lrs, torch.optim.Adam, betas=(0.0, 0.999))  # β₁ = 0: the GD map of P
    opt = SDOptimizer(
        base, model=model, loss_fn=F.mse_loss, data=batch, every=1, estimator="exact",
        exponent_map="adam",
    )  # fmt: skip
    _step(opt, model, batch)  # the estimate is deferred to the first step with Adam state
    assert not opt.history
    h = _hessian(model, batch)
    adam = sdopt.dimension.adam_preconditioner(base, list(model.parameters()))
    _step(opt, model, batch)
    rec = opt.last_estimate
    assert rec.ok, rec.reason
    eta = _etas(model, lrs)
    sd = _true_sd(h, eta / adam)  # I - diag(η / (sqrt(v̂) + ε)) H
    assert rec.sharpness_dimension == pytest.approx(sd, abs=1e-8)
    top = torch.linalg.eigvals((eta / adam)[:, None] * h).real.max().item()
    assert rec.lambda_max == pytest.approx(top / max(lrs), rel=1e-6)
    assert rec.edge_ratio == pytest.approx(top / 2, rel=1e-6)


def test_lr_controller_steers_the_layerwise_map_to_its_edge(truth) -> None:
    h, eta = truth
    model, batch = _problem()
    opt = SDOptimizer(
        _groups(model, LRS), model=model, loss_fn=F.mse_loss, data=batch, every=1,
        estimator="exact", mode="lr", controller={"anticipate": False},
    )  # fmt: skip
    _step(opt, model, batch)
    rec = opt.last_estimate
    top = torch.linalg.eigvals(eta[:, None] * h).real.max().item()
    # edge ratio 0.95 of the map I - s diag(η) H: s = 0.95 · 2 / max eig(diag(η) H)
    # (1.40 here; the largest group LR everywhere gave 0.54: it saw the edge 2.6 times nearer)
    assert opt.lr_scale == pytest.approx(0.95 * 2 / top, rel=1e-6) and opt.lr_scale > 1.3
    assert rec.lr_scale == opt.lr_scale and rec.edge_ratio == pytest.approx(0.95, rel=1e-6)
    assert rec.sharpness_dimension == pytest.approx(_true_sd(h, opt.lr_scale * eta), abs=1e-8)
    # the user's learning rates are untouched
    assert [g["lr"] for g in opt.param_groups] == list(LRS)
    assert math.isfinite(rec.sharpness_dimension)
