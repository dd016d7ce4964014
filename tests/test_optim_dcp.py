"""SDOptimizer as a ``torch.optim`` and ``torch.distributed.checkpoint`` citizen.

- construction goes through ``torch.optim.Optimizer.__init__`` (no rebuilt private state);
- ``state_dict()`` is torch's layout (the base optimizer's ``state`` / ``param_groups``) with
  sdopt's state under ``"sdopt"``, and the wrapper's state-dict hooks run;
- ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (no process group needed for a
  plain module) round-trip it: the resumed run is the uninterrupted one bit for bit, and DCP's
  state initialisation (a ``step()`` at lr 0 with zero gradients) is not counted as a step;
- checkpoints of the earlier ``{"base": ..., "sdopt": ...}`` layout (versions 2 and 1), built
  here explicitly as the earlier code wrote them, still load.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdopt.optim import SDOptimizer

dcp_state_dict = pytest.importorskip("torch.distributed.checkpoint.state_dict")
get_optimizer_state_dict = dcp_state_dict.get_optimizer_state_dict
set_optimizer_state_dict = dcp_state_dict.set_optimizer_state_dict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _make(mode: str, base: str = "adam", model: nn.Module | None = None):
    model = _model() if model is None else model
    if base == "adam":
        inner = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SDOptimizer(
        inner, model=model, loss_fn=F.cross_entropy, data=_data(), mode=mode, every=2, k=2,
        penalty_every=2,
    )  # fmt: skip
    return model, opt


def _train(model: nn.Module, opt: SDOptimizer, steps: int) -> None:
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _same_run(a_model, a_opt, b_model, b_opt) -> None:
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
    assert a_opt.step_count == b_opt.step_count and a_opt.lr_scale == b_opt.lr_scale
    assert len(a_opt.history) == len(b_opt.history)
    for r, s in zip(a_opt.history, b_opt.history):
        for key in ("step", "sharpness_dimension", "lambda_max", "lr_scale", "num_products"):
            u, v = getattr(r, key), getattr(s, key)
            assert u == v or (math.isnan(u) and math.isnan(v)), key


def test_construction_goes_through_optimizer_init(monkeypatch) -> None:
    calls = []
    original = torch.optim.Optimizer.__init__

    def spy(self, params, defaults):
        calls.append(type(self).__name__)
        original(self, params, defaults)

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", spy)
    _, opt = _make("monitor")
    assert calls.count("SDOptimizer") == 1
    # afterwards the groups, state and defaults are the base's own objects
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state and opt.defaults is opt.base_optimizer.defaults
    assert not any(name.startswith("_own_") for name in vars(opt))
    assert len(opt.param_groups) == 1 and "sdopt" not in opt.param_groups[0]


def test_state_dict_hooks_of_the_wrapper_run() -> None:
    _, opt = _make("monitor")
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, s: {**s, "tag": 1})
    opt.register_load_state_dict_pre_hook(lambda o, s: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    s = opt.state_dict()
    assert s["tag"] == 1 and set(s) == {"state", "param_groups", "sdopt", "tag"}
    opt.load_state_dict(s)
    assert seen == ["pre", "load-pre", "load-post"]


@pytest.mark.parametrize("mode", ["monitor", "lr", "penalty"])
def test_dcp_get_and_set_optimizer_state_dict_round_trip(mode: str) -> None:
    model, opt = _make(mode)
    _train(model, opt, 3)
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}  # DCP keeps torch's layout only
    assert set(osd["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert osd["param_groups"][0]["sdopt"]["step_count"] == 3
    assert opt.step_count == 3  # taking the checkpoint is not a step
    saved_model = copy.deepcopy(model.state_dict())
    osd = _roundtrip(osd)

    _train(model, opt, 4)  # the uninterrupted run

    fresh_model = _model()
    fresh_model.load_state_dict(saved_model)
    _, fresh = _make(mode, model=fresh_model)
    set_optimizer_state_dict(fresh_model, fresh, osd)
    assert fresh.step_count == 3 and len(fresh.history) == 2
    assert "sdopt" not in fresh.param_groups[0]  # sdopt's state is not left in the groups
    _train(fresh_model, fresh, 4)
    _same_run(model, opt, fresh_model, fresh)


def test_dcp_state_initialisation_of_a_stateless_base_is_not_a_step() -> None:
    """SGD has no state: DCP calls ``step()`` at lr 0 with zero gradients on every save."""
    model, opt = _make("lr", base="sgd")
    _train(model, opt, 3)
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    scale, history = opt.lr_scale, len(opt.history)
    for _ in range(3):
        get_optimizer_state_dict(model, opt)
    assert opt.step_count == 3 and opt.lr_scale == scale and len(opt.history) == history
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(g["lr"] == 0.1 for g in opt.param_groups)  # DCP restored the lr
    assert all(p.grad is None for p in model.parameters())


def test_a_real_step_at_lr_zero_is_still_a_step() -> None:
    """A warm-up from lr 0 has gradients: it is counted (only zero gradients are DCP's)."""
    model, opt = _make("monitor", base="sgd")
    for g in opt.param_groups:
        g["lr"] = 0.0
    with pytest.warns(RuntimeWarning, match="Invalid lr: 0.0"):  # SD needs lr > 0: skipped
        _train(model, opt, 1)
    assert opt.step_count == 1 and len(opt.history) == 1


def _old_layout(opt: SDOptimizer, version: int) -> dict:
    """The checkpoint the earlier code wrote: ``{"base": base.state_dict(), "sdopt": {...}}``
    (version 2); version 1 had no bottom vectors, no failure counts, no iterator cursor (only
    ``data_drawn``) and stored its bulk as two numbers."""
    sdopt_state = copy.deepcopy(opt.state_dict()["sdopt"])
    sdopt_state["version"] = version
    if version == 1:
        for key in ("bottom_vectors", "data_cursor", "failures", "failure_events", "deferred"):
            del sdopt_state[key]
        sdopt_state["bulk"] = (22.0, 1.5)  # (bulk_dim, bulk_trace)
    return {"base": copy.deepcopy(opt.base_optimizer.state_dict()), "sdopt": sdopt_state}


@pytest.mark.parametrize(("version", "mode"), [(2, "lr"), (2, "penalty"), (1, "monitor")])
def test_old_layout_checkpoints_still_load(version: int, mode: str) -> None:
    model, opt = _make(mode)
    _train(model, opt, 3)
    old = _roundtrip(_old_layout(opt, version))
    assert set(old) == {"base", "sdopt"}
    saved_model = copy.deepcopy(model.state_dict())
    _train(model, opt, 4)

    fresh_model = _model()
    fresh_model.load_state_dict(saved_model)
    _, fresh = _make(mode, model=fresh_model)
    fresh.load_state_dict(old)
    assert fresh.step_count == 3
    _train(fresh_model, fresh, 4)
    _same_run(model, opt, fresh_model, fresh)
    # and what it saves now is the new layout
    assert set(fresh.state_dict()) == {"state", "param_groups", "sdopt"}
