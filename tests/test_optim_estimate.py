"""What SDOptimizer records is the public estimator, on a realistic state with negative curvature.

The state is ``examples/quickstart.py``'s (digits MLP 64 → 32 → 10, tanh, d = 2,410, SGD with
η = 0.5, 20 steps): its curvature-batch Hessian has hundreds of negative eigenvalues and an
exact SD of ≈ 2,314 (THEORY.md §8), where the first release recorded 0.00 ± 0.0.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sdopt

LR = 0.5


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


@pytest.fixture(scope="module")
def state():
    """The quickstart model after 20 SGD steps, its curvature batch and the exact SD."""
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.functional.cross_entropy
    base = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(1400, (128,), generator=g)
        base.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        base.step()
    batch = (x[:512], y[:512])
    exact = sdopt.estimate_sharpness_dimension(
        copy.deepcopy(model).double(), loss_fn, (batch[0].double(), batch[1]), LR, "exact"
    )
    return model, loss_fn, batch, exact


def _wrapped(model, loss_fn, batch, **kw):
    base = torch.optim.SGD(model.parameters(), lr=LR)
    return sdopt.SDOptimizer(base, model=model, loss_fn=loss_fn, data=batch, every=1, **kw)


def _step(opt, model, loss_fn, batch) -> None:
    opt.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    opt.step()


def test_the_state_has_negative_curvature_and_sd_near_d(state) -> None:
    _, _, _, exact = state
    ev = exact.eigenvalues[0]
    assert exact.dim == 2410 and int((ev < 0).sum()) > 400
    assert 2250 < exact.value < 2350  # THEORY.md §8: 2,313.7 (float32-trained state)
    assert exact.n_edge == 0 and exact.n_neg > 100 and exact.total_exponent < 0


def test_record_is_estimate_sharpness_dimension_at_defaults(state) -> None:
    model, loss_fn, batch, exact = state
    model = copy.deepcopy(model)
    opt = _wrapped(model, loss_fn, batch)
    by_hand = sdopt.estimate_sharpness_dimension(model, loss_fn, batch, LR)
    _step(opt, model, loss_fn, batch)
    rec = opt.last_estimate
    assert rec.ok and rec.method == "deflated" == by_hand.method
    # the first estimate: same defaults, same seed, no warm start -> the same numbers
    assert rec.sharpness_dimension == by_hand.value
    assert rec.uncertainty == by_hand.uncertainty and rec.uncertainty > 0
    assert (rec.sd_low, rec.sd_high) == (by_hand.low, by_hand.high)
    assert rec.n_neg == by_hand.n_neg and rec.n_edge == by_hand.n_edge == 0
    assert rec.total_exponent == by_hand.total_exponent < 0
    assert rec.j_star == math.floor(rec.sharpness_dimension)
    assert rec.lambda_max == by_hand.lambda_max and rec.lambda_min == by_hand.lambda_min < 0
    assert rec.num_products == by_hand.num_products
    # ... and both are right: within the accuracy target of the battery
    tolerance = max(0.1 * min(exact.value, exact.dim - exact.value), 2 * rec.uncertainty)
    assert abs(rec.sharpness_dimension - exact.value) <= tolerance
    assert rec.sd_low <= exact.value <= rec.sd_high


def test_warm_started_records_agree_with_the_estimator_within_uncertainties(state) -> None:
    model, loss_fn, batch, exact = state
    model = copy.deepcopy(model)
    opt = _wrapped(model, loss_fn, batch)
    for _ in range(3):  # no gradients: the base step leaves the parameters where they are
        opt.zero_grad()
        opt.step()
    cold, warm = opt.history[0], opt.history[-1]
    assert warm.num_products < cold.num_products  # the cached eigenvectors pay
    by_hand = sdopt.estimate_sharpness_dimension(
        model, loss_fn, batch, LR, generator=torch.Generator().manual_seed(5)
    )
    spread = 2 * math.hypot(warm.uncertainty, by_hand.uncertainty)
    assert abs(warm.sharpness_dimension - by_hand.value) <= spread
    assert abs(warm.sharpness_dimension - exact.value) <= max(
        0.1 * (exact.dim - exact.value), 2 * warm.uncertainty
    )


def test_record_at_the_users_learning_rate_matches_the_estimator(state) -> None:
    model, loss_fn, batch, _ = state
    model = copy.deepcopy(model)
    opt = _wrapped(model, loss_fn, batch, seed=3)
    estimates = []
    for seed in range(3):
        estimates.append(
            sdopt.estimate_sharpness_dimension(
                model, loss_fn, batch, LR, generator=torch.Generator().manual_seed(10 + seed)
            )
        )
    _step(opt, model, loss_fn, batch)
    rec = opt.last_estimate
    for est in estimates:
        spread = 2 * math.hypot(rec.uncertainty, est.uncertainty)
        assert abs(rec.sharpness_dimension - est.value) <= spread
