"""``mode="lr"`` acts only on what a learning rate can change: the directions beyond the edge.

A BatchNorm CNN in train mode at initialisation with a negative trace (d = 694; on 128 digits:
tr H = −27.7, λ_min = −22.1, λ_max = 4.6, measured with ``method="exact"``): its negative
directions expand at every learning rate (THEORY.md §8), so SD is near d at every step size. The first release's controller, asked for SD ≤ 0, cut the scale to
its floor (0.001) and froze training at chance accuracy; it also climbed past the edge.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import sdopt
from sdopt.dimension import edge_of_stability

LOSS = nn.functional.cross_entropy


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(data.target)


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Tanh(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 16, 10),
    )  # fmt: skip


def _train(exponent_map: str, momentum: float, lr: float, steps: int = 60, **kw):
    x, y = _digits()
    model = _cnn()
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    opt = sdopt.SDOptimizer(
        base, model=model, loss_fn=LOSS, data=(x[:128], y[:128]), mode="lr", every=5,
        exponent_map=exponent_map, estimate_kwargs={"num_probes": 2, "num_steps": 8}, **kw,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            idx = torch.randint(0, 1400, (64,), generator=g)
            opt.zero_grad()
            LOSS(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[1400:]).argmax(1) == y[1400:]).float().mean())
    return opt, accuracy, [w for w in caught if issubclass(w.category, RuntimeWarning)]


MAPS = [("gd", 0.0), ("momentum", 0.9)]
START = {"gd": 0.04, "momentum": 0.08}  # about 1/10 of each map's edge learning rate


@pytest.mark.parametrize(("exponent_map", "momentum"), MAPS)
def test_negative_curvature_neither_overshoots_nor_collapses(exponent_map, momentum) -> None:
    edge = edge_of_stability(exponent_map, momentum)
    opt, accuracy, _ = _train(exponent_map, momentum, lr=START[exponent_map])
    records = [r for r in opt.history if r.ok]
    assert len(records) == 12
    first = records[0]
    assert first.n_neg > 5 and first.lambda_min < -first.lambda_max  # the negative side wins
    assert first.trace < 0
    assert first.edge_ratio < 0.3  # started well below the edge ...
    assert all(r.edge_ratio <= 1.3 for r in records)  # ... never overshoots ...
    # ... and climbs to it: the rule puts η·λ_max at 0.95 of the edge after each estimate; in
    # between, minibatch SGD moves λ_max (0.5–6 here), so a record can read lower
    assert max(r.edge_ratio for r in records) >= 0.7
    assert all(r.lr_scale > 1.0 for r in records[1:])  # the LR was raised, never cut
    assert opt.controller_state.feasible
    assert records[-1].lr * records[-1].lambda_max / edge == pytest.approx(records[-1].edge_ratio)
    assert accuracy > 0.5 and all(math.isfinite(r.loss) for r in records)


@pytest.mark.parametrize(("exponent_map", "momentum"), MAPS)
def test_sd_target_no_scale_can_meet_warns_once_and_keeps_training(exponent_map, momentum) -> None:
    opt, accuracy, caught = _train(exponent_map, momentum, lr=START[exponent_map], target_sd=0.0)
    messages = [str(w.message) for w in caught if "meets target_sd" in str(w.message)]
    assert len(messages) == 1 and "negative eigenvalues" in messages[0]
    assert not opt.controller_state.feasible
    records = [r for r in opt.history if r.ok]
    assert records[0].n_neg > 5 and records[0].sharpness_dimension > 0.5 * 694  # SD from n_neg
    assert min(r.lr_scale for r in records) > 0.05  # no collapse to min_scale = 0.001
    assert all(r.edge_ratio <= 1.3 for r in records)
    assert accuracy > 0.5  # training goes on (chance is 0.1)
