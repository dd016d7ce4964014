"""``mode="lr"`` at its defaults rides the edge of stability of its exponent map.

The guarantee (docs/optimizer.md, "Riding the edge"): started anywhere from 1/30 to 3 times the
edge learning rate of its map (gd, heavy ball, Adam), the controller climbs or falls to the edge
— the edge ratio *in force* (the learning rate training actually used before each estimate,
times the λ_max measured there, over the map's edge) lies in [0.7, 1.0] within a bounded number
of estimates — never overshoots beyond 1.3, and does not diverge. The user's base learning rate
is never touched: schedulers compose with the logged scale.

The model is a tanh MLP on 600 of scikit-learn's digits with 30 % of the labels redrawn at
random (so the loss does not reach 0 within the run), full batch, trained on the same batch
the estimates use, so every λ_max the controller sees is the one the step experiences. The edge
learning rate of a map is read from a monitor run's first record (``lr / edge_ratio``: the
learning rate at which η·λ_max of the map's Hessian at initialisation equals its edge).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import sdopt

LOSS = nn.functional.cross_entropy
STEPS = 60
EVERY = 3  # 20 estimates
BAND = (0.7, 1.0)
MAX_ESTIMATES_TO_BAND = 10  # documented bounds (docs/optimizer.md)
MAX_IN_FORCE = 1.6


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data[:600], dtype=torch.float64) / 16.0
    y = torch.tensor(data.target[:600])
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(len(y), generator=g) < 0.3  # 30 % label noise: no quick zero loss
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def _base(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "gd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def _run(name: str, lr: float, mode: str, steps: int = STEPS, sched_gamma: float | None = None):
    x, y = _data()
    model = _model()
    base = _base(name, model.parameters(), lr)
    opt = sdopt.SDOptimizer(
        base, model=model, loss_fn=LOSS, data=(x, y), mode=mode, every=EVERY, k=3,
        exponent_map=name, seed=0,
    )  # fmt: skip
    sched = None
    if sched_gamma is not None:
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=sched_gamma)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            opt.zero_grad()
            loss = LOSS(model(x), y)
            losses.append(float(loss))
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return opt, losses


_EDGE_LR: dict[str, float] = {}


def _edge_lr(name: str) -> float:
    """``lr / edge_ratio`` of a monitor record: at initialisation for gd and heavy ball; for
    Adam after 15 steps (its preconditioner starts from one squared gradient, which makes the
    preconditioned λ_max of the first steps 5× its later value)."""
    if name not in _EDGE_LR:
        at = 15 if name == "adam" else 0
        opt, _ = _run(name, 1e-3, "monitor", steps=at + 1)
        record = next(r for r in opt.history if r.ok and r.step >= at)
        _EDGE_LR[name] = record.lr / record.edge_ratio
    return _EDGE_LR[name]


@pytest.mark.parametrize("factor", [1 / 30, 1.0, 3.0], ids=["1/30", "1", "3"])
@pytest.mark.parametrize("name", ["gd", "momentum", "adam"])
def test_lr_mode_rides_the_edge_from_any_start(name: str, factor: float) -> None:
    edge_lr = _edge_lr(name)
    opt, losses = _run(name, factor * edge_lr, "lr")
    records = [r for r in opt.history if r.ok]
    assert len(records) >= 19
    # the first record is at the user's own learning rate, before any step was taken with it
    in_force = [r.edge_ratio_in_force for r in records[1:]]
    assert all(math.isfinite(v) for v in in_force)
    # the new scale never sits past the edge; the ratio training experienced stays below
    # MAX_IN_FORCE (the first approach's sharpening bursts reach 1.5 with heavy ball, measured)
    assert max(in_force) <= MAX_IN_FORCE, in_force
    assert max(r.edge_ratio for r in records) <= 1.0 + 1e-9
    first = next((i for i, v in enumerate(in_force) if BAND[0] <= v <= BAND[1]), None)
    assert first is not None and first <= MAX_ESTIMATES_TO_BAND, in_force
    after = in_force[first:]
    assert sum(BAND[0] <= v <= BAND[1] for v in after) >= 0.6 * len(after), in_force
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]  # no divergence
    # the user's learning rate is untouched; the scale carries the change
    assert opt.param_groups[0]["lr"] == pytest.approx(factor * edge_lr, rel=0, abs=0)
    assert records[-1].lr == pytest.approx(records[-1].base_lr * records[-1].lr_scale)


def test_in_force_ratio_equals_the_record_ratio_outside_lr_mode() -> None:
    opt, _ = _run("momentum", _edge_lr("momentum"), "monitor", steps=10)
    for r in opt.history:
        assert r.edge_ratio_in_force == r.edge_ratio


def test_in_force_ratio_uses_the_scale_before_the_update() -> None:
    opt, _ = _run("gd", _edge_lr("gd") / 30, "lr", steps=12)
    records = [r for r in opt.history if r.ok]
    for prev, rec in itertools.pairwise(records):
        edge = rec.lr * rec.lambda_max / rec.edge_ratio
        assert rec.edge_ratio_in_force == pytest.approx(prev.lr * rec.lambda_max / edge)


def test_a_scheduler_composes_with_the_scale() -> None:
    edge_lr = _edge_lr("momentum")
    opt, _ = _run("momentum", edge_lr / 3, "lr", steps=30, sched_gamma=0.97)
    user_lr = edge_lr / 3 * 0.97**30
    assert opt.param_groups[0]["lr"] == pytest.approx(user_lr)  # the schedule, untouched
    for r in (r for r in opt.history if r.ok):
        assert r.base_lr == pytest.approx(edge_lr / 3 * 0.97**r.step)
        assert r.lr == pytest.approx(r.base_lr * r.lr_scale)
    # a decaying user LR is compensated by the scale: the step still sits at the edge
    late = [r.edge_ratio_in_force for r in opt.history if r.ok][-4:]
    assert all(0.5 <= v <= 1.3 for v in late), late  # one interval's decay (0.97**3) behind
