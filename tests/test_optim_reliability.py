"""SDOptimizer under failure (issue 11): loggers that raise, interrupts, resumes, pickling.

Each test pins a promise of the "failure behaviour" list: a failing hook never changes
training, a Ctrl-C inside an estimate replays exactly, a shuffling loader resumes exactly in
any pass, the optimizer pickles, and a checkpoint of another mode or model is refused.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdopt.optim import SDOptimizer


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _train(model, opt, steps, *, data=None):
    x, y = data if data is not None else _data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _bare(steps: int) -> list[torch.Tensor]:
    model = _model()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps)
    return _params(model)


class AlwaysRaises:
    def __init__(self):
        self.calls = 0

    def log(self, record):
        self.calls += 1
        raise OSError("disk full")


class RaisesOnce:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)
        if len(self.records) == 1:
            raise ConnectionError("network down")


# --- item 1: loggers never change training ------------------------------------------------------


def test_a_logger_that_always_raises_never_changes_training() -> None:
    model = _model()
    bad = AlwaysRaises()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=_data(),
        every=2,
        k=2,
        loggers=[bad],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, 6)
    assert opt.step_count == 6
    assert [p for p in _params(model)] and all(
        torch.equal(a, b) for a, b in zip(_params(model), _bare(6))
    )
    assert [r.step for r in opt.history] == [0, 2, 4]  # not redone at every call
    assert bad.calls == 3
    assert opt.failures["logger"] == 3
    assert [e["kind"] for e in opt.failure_events] == ["logger"] * 3
    logger_warnings = [w for w in caught if "logger" in str(w.message)]
    assert len(logger_warnings) == 1 and "OSError: disk full" in str(logger_warnings[0].message)


def test_a_logger_that_raises_once_loses_no_step_and_the_others_still_log() -> None:
    model = _model()
    once = RaisesOnce()
    records = []

    class Sink:
        def log(self, record):
            records.append(record)

    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=_data(),
        every=2,
        k=2,
        loggers=[once, Sink()],
    )
    with pytest.warns(RuntimeWarning, match="ConnectionError"):
        _train(model, opt, 5)
    assert opt.step_count == 5
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _bare(5)))
    assert [r.step for r in records] == [0, 2, 4] and len(once.records) == 3
    assert opt.failures["logger"] == 1


def test_a_failing_logger_close_does_not_stop_the_others_closing() -> None:
    closed = []

    class BadClose:
        def log(self, record):
            pass

        def close(self):
            raise RuntimeError("already closed")

    class GoodClose(BadClose):
        def close(self):
            closed.append(True)

    model = _model()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=_data(),
        every=2,
        k=2,
        loggers=[BadClose(), GoodClose()],
    )
    with pytest.warns(RuntimeWarning, match="close"):
        opt.close()
    assert closed == [True] and opt.failures["logger"] == 1


def test_an_internal_sdopt_failure_still_takes_the_base_step(monkeypatch) -> None:
    model = _model()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=_data(),
        every=1,
        k=2,
    )

    def broken(*args, **kwargs):
        raise RuntimeError("controller bug")

    monkeypatch.setattr(opt, "_estimate", broken)
    with pytest.warns(RuntimeWarning, match="controller bug"):
        _train(model, opt, 3)
    assert opt.step_count == 3 and opt.failures["sdopt"] == 3
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _bare(3)))


# --- item 10: penalty dropped at a non-finite loss is said -------------------------------------


def test_non_finite_loss_at_a_penalty_step_warns_and_is_recorded() -> None:
    model = _model()
    x, y = _data()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=(x, y),
        mode="penalty",
        every=4,
        k=2,
        penalty_every=2,
        penalty_strength=0.1,
    )
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt._penalty_grad is not None
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="penalty failure at step 2.*non-finite loss"):
        opt.step(lambda: torch.tensor(float("nan")))
    assert opt.failures["penalty"] == 1
    assert opt.failure_events[-1] == {
        "step": 2,
        "kind": "penalty",
        "message": "non-finite loss: the penalty is not applied",
    }


# --- item 10: pickling and load_state_dict checks ------------------------------------------------


def _loader(seed: int = 3) -> torch.utils.data.DataLoader:
    x, y = _data(24, seed=9)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("source", ["batch", "loader"])
def test_pickle_round_trip_after_estimates(source: str) -> None:
    model = _model()
    data = _data() if source == "batch" else _loader()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=data,
        mode="penalty",
        every=2,
        k=2,
    )
    _train(model, opt, 4)
    blob = pickle.dumps((model, opt))
    model2, opt2 = pickle.loads(blob)
    # the copy continues exactly as the original
    _train(model, opt, 4)
    _train(model2, opt2, 4)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(model2)))
    assert [r.sharpness_dimension for r in opt.history] == [
        r.sharpness_dimension for r in opt2.history
    ]


def _penalty_opt(model, mode="penalty", **kw):
    return SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=_data(),
        mode=mode,
        every=2,
        k=2,
        **kw,
    )


def test_load_state_dict_refuses_another_mode() -> None:
    model = _model()
    opt = _penalty_opt(model, "penalty")
    _train(model, opt, 2)
    other = _penalty_opt(_model(), "lr")
    with pytest.raises(ValueError, match=r"mode 'penalty'.*mode='lr'"):
        other.load_state_dict(opt.state_dict())
    assert other.step_count == 0  # nothing loaded


def test_load_state_dict_refuses_eigenvectors_of_another_model() -> None:
    model = _model()
    opt = _penalty_opt(model, "monitor")
    _train(model, opt, 2)
    state = opt.state_dict()
    state["sdopt"]["eigenvectors"] = torch.zeros(7, 2, dtype=torch.float64)
    fresh = _penalty_opt(_model(), "monitor")
    with pytest.raises(ValueError, match="eigenvectors of size 7"):
        fresh.load_state_dict(state)


# --- item 10: LBFGS with a closure survives a checkpoint ---------------------------------------


def test_lbfgs_with_a_closure_resumes_exactly() -> None:
    x, y = _data()

    def run(steps, model, opt):
        for _ in range(steps):

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)

    def make():
        model = _model()
        base = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        opt = SDOptimizer(
            base, model=model, loss_fn=F.cross_entropy, data=(x, y), mode="lr", every=2, k=2
        )
        return model, opt

    model, opt = make()
    run(6, model, opt)
    model2, opt2 = make()
    run(3, model2, opt2)
    blob = {"model": model2.state_dict(), "opt": opt2.state_dict()}
    model3, opt3 = make()
    model3.load_state_dict(blob["model"])
    opt3.load_state_dict(blob["opt"])
    run(3, model3, opt3)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(model3)))
    assert opt3.step_count == 6 and len(opt3.history) == 3


# --- item 7: resume exactness -----------------------------------------------------------------


@pytest.mark.parametrize("own_generator", [False, True])
def test_shuffling_loader_resumed_in_its_second_pass_is_exact(own_generator: bool) -> None:
    """Penalty mode with a shuffling DataLoader (3 batches a pass, an estimate every 2 steps):
    checkpointed in the second pass and resumed in a fresh process state (other global RNG),
    the run continues bit for bit as the uninterrupted one."""

    def loader():
        x, y = _data(24, seed=9)
        kwargs = {"generator": torch.Generator().manual_seed(4)} if own_generator else {}
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True, **kwargs
        )

    def make():
        model = _model()
        opt = SDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            loss_fn=F.cross_entropy,
            data=loader(),
            mode="penalty",
            every=2,
            k=2,
            penalty_every=1,
            penalty_strength=0.5,
        )
        return model, opt

    torch.manual_seed(11)
    model, opt = make()
    _train(model, opt, 16)

    torch.manual_seed(11)
    model2, opt2 = make()
    _train(model2, opt2, 9)  # 5 draws: in the second pass
    assert opt2.data.passes == 2 and opt2.data.drawn == 2
    checkpoint = {"model": model2.state_dict(), "opt": opt2.state_dict()}

    torch.manual_seed(12345)  # the resumed process: another global RNG state
    model3, opt3 = make()
    model3.load_state_dict(checkpoint["model"])
    opt3.load_state_dict(checkpoint["opt"])
    _train(model3, opt3, 7)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(model3)))
    assert [r.loss for r in opt.history] == [r.loss for r in opt3.history]


@pytest.mark.parametrize("where", ["estimate", "logger"])
def test_keyboard_interrupt_inside_an_estimate_replays_exactly(where: str) -> None:
    """Ctrl-C inside an estimate (after its products drew from the generator, or while its
    record is logged): the step is undone on sdopt's side (generator, caches, history, the
    curvature batch) and propagates; a checkpoint taken then and resumed gives the
    uninterrupted run bit for bit, and so does calling step() again."""
    armed = {"on": False}

    class Interrupting:
        def log(self, record):
            if armed["on"] and where == "logger":
                raise KeyboardInterrupt

    def make():
        model = _model()
        opt = SDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            loss_fn=F.cross_entropy,
            data=_loader(),
            mode="penalty",
            every=2,
            k=2,
            penalty_every=1,
            loggers=[Interrupting()],
        )
        compute = opt._compute_estimate

        def compute_then_interrupt(*args, **kwargs):
            est = compute(*args, **kwargs)
            if armed["on"] and where == "estimate":
                raise KeyboardInterrupt
            return est

        opt._compute_estimate = compute_then_interrupt
        return model, opt

    x, y = _data()

    def one_step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    model, opt = make()
    for _ in range(8):
        one_step(model, opt)

    for resume in ("checkpoint", "retry"):
        model2, opt2 = make()
        for _ in range(4):
            one_step(model2, opt2)
        generator = opt2.generator.get_state()
        cursor = opt2.data.cursor()
        history = list(opt2.history)
        armed["on"] = True
        with pytest.raises(KeyboardInterrupt):
            one_step(model2, opt2)
        armed["on"] = False
        assert torch.equal(opt2.generator.get_state(), generator)  # not advanced
        assert opt2.data.cursor()["drawn"] == cursor["drawn"] and opt2.history == history
        assert opt2.step_count == 4
        if resume == "checkpoint":
            checkpoint = {"model": model2.state_dict(), "opt": opt2.state_dict()}
            model2, opt2 = make()
            model2.load_state_dict(checkpoint["model"])
            opt2.load_state_dict(checkpoint["opt"])
        for _ in range(4):
            one_step(model2, opt2)
        assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(model2))), resume
        assert [r.loss for r in opt.history] == [r.loss for r in opt2.history]


# --- item 4: the construction-time check leaves the model and the RNG alone ---------------------


def test_the_dry_run_at_construction_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    model.train()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    calls = []

    def loss_fn(outputs, targets):
        calls.append(torch.is_grad_enabled())
        return F.cross_entropy(outputs, targets)

    SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=loss_fn,
        data=(x, y),
        every=2,
        k=2,
    )
    assert calls == [False]  # evaluated once, without autograd
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # BatchNorm running statistics untouched
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
