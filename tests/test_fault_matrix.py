"""Fault injection: mode × base optimizer × fault (issue 11).

Faults: a NaN or an infinite loss in the curvature data at one estimate, a ``loss_fn`` that
raises at one estimate, a logger that always raises. For every combination: the parameters and
the optimizer state stay finite, ``step_count`` advances, the event is warned about and
counted in ``optimizer.failures`` (and a skipped estimate leaves a ``"skipped"`` record); in
monitor mode the parameters equal a bare run of the base optimizer bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdopt.optim import SDOptimizer

STEPS = 6
EVERY = 2
FAULT_AT_DRAW = 2  # the estimate of step 2 (the second draw) meets the fault

BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}
MODES = ("monitor", "lr", "penalty")
FAULTS = ("nan_data", "inf_loss", "raising_loss_fn", "raising_logger")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (12,), generator=g
    )


def _run(base_name: str, mode: str | None, fault: str | None):
    model = _model()
    base = BASES[base_name](model.parameters())
    x, y = _batch()
    if mode is None:
        opt = base
    else:
        draws = []

        def data():
            draws.append(1)
            if fault == "nan_data" and len(draws) == FAULT_AT_DRAW:
                return x * float("nan"), y
            return x, y

        def loss_fn(outputs, targets):
            loss = F.cross_entropy(outputs, targets)
            at_fault = len(draws) == FAULT_AT_DRAW
            if fault == "raising_loss_fn" and at_fault:
                raise RuntimeError("user loss_fn failed")
            if fault == "inf_loss" and at_fault:
                return loss * float("inf")
            return loss

        class Broken:
            def log(self, record):
                raise OSError("logger down")

        opt = SDOptimizer(
            base,
            model=model,
            loss_fn=loss_fn,
            data=data,
            mode=mode,
            every=EVERY,
            k=2,
            penalty_every=1,
            penalty_strength=0.1,
            loggers=[Broken()] if fault == "raising_logger" else [],
            estimate_kwargs={"num_probes": 2, "num_steps": 6},
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, opt, [str(w.message) for w in caught]


def _finite_state(opt) -> bool:
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                return False
    return True


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("mode", MODES)
def test_fault_is_isolated_and_recorded(mode: str, base_name: str, fault: str) -> None:
    model, opt, messages = _run(base_name, mode, fault)
    assert opt.step_count == STEPS
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _finite_state(opt)
    if mode == "monitor":
        bare, _, _ = _run(base_name, None, None)
        for a, b in zip(model.parameters(), bare.parameters()):
            assert torch.equal(a, b)
    if fault == "raising_logger":
        assert opt.failures["logger"] == STEPS // EVERY
        assert all(r.ok for r in opt.history) and len(opt.history) == STEPS // EVERY
        assert sum("logger down" in m for m in messages) == 1  # warned once
    else:
        statuses = [(r.step, r.status) for r in opt.history]
        assert statuses == [(0, "ok"), (2, "skipped"), (4, "ok")], statuses
        assert opt.failures["estimate"] == 1
        reason = opt.history[1].reason
        if fault == "raising_loss_fn":
            assert "user loss_fn failed" in reason
        else:
            assert "non-finite loss" in reason
        assert any("estimate at step 2 skipped" in m for m in messages)


@pytest.mark.parametrize("mode", MODES)
def test_closure_error_propagates_unchanged(mode: str) -> None:
    """An exception from the user's closure is theirs: raised as is, and no step is counted."""
    model = _model()
    x, y = _batch()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=F.cross_entropy,
        data=(x, y), mode=mode, every=EVERY, k=2, estimate_kwargs={"num_probes": 2, "num_steps": 6},
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        raise KeyError("closure bug")

    with pytest.raises(KeyError, match="closure bug"):
        opt.step(closure)
    assert opt.step_count == 0 and sum(opt.failures.values()) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
