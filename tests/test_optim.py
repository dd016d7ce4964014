"""SDOptimizer: the torch.optim contract, monitor == base bit for bit, resume, modes, robustness."""

from __future__ import annotations

import copy
import gc
import io
import math
import tracemalloc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdopt.control import LRControllerConfig
from sdopt.optim import SDOptimizer

# --- fixtures ---------------------------------------------------------------------------------


def _model(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def _data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _train(model, opt, data, steps, *, closure=False, sched=None, start=0):
    """A loop that uses the global RNG (dropout, randn noise) between steps."""
    x, y = data
    losses = []
    for _ in range(start, start + steps):
        model.train()
        noise = 1e-3 * torch.randn_like(x)

        def loss_closure(noise=noise):
            opt.zero_grad()
            loss = F.cross_entropy(model(x + noise), y)
            loss.backward()
            return loss

        if closure:
            losses.append(float(opt.step(loss_closure).detach()))
        else:
            loss = loss_closure()
            opt.step()
            losses.append(float(loss.detach()))
        if sched is not None:
            sched.step()
    return losses


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _sd(model, base, **kw):
    kw.setdefault("every", 10)
    kw.setdefault("k", 2)
    return SDOptimizer(base, model=model, loss_fn=F.cross_entropy, data=_data(16, seed=5), **kw)


# --- monitor never changes training ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BASES))
def test_monitor_equals_base_bit_for_bit(name: str) -> None:
    data = _data()
    ref = _model()
    torch.manual_seed(123)
    _train(ref, BASES[name](ref.parameters()), data, 200)
    ref_rng = torch.get_rng_state()

    model = _model()
    opt = _sd(model, BASES[name](model.parameters()), every=10)
    torch.manual_seed(123)
    _train(model, opt, data, 200)
    _assert_equal(_params(model), _params(ref))
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert len(opt.history) == 20 and all(r.ok for r in opt.history)
    assert [r.step for r in opt.history] == list(range(0, 200, 10))


def test_monitor_with_closure_equals_base() -> None:
    data = _data()
    ref = _model()
    torch.manual_seed(7)
    ref_losses = _train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), data, 30, closure=True)
    model = _model()
    opt = _sd(model, torch.optim.Adam(model.parameters(), lr=1e-2), every=3)
    torch.manual_seed(7)
    losses = _train(model, opt, data, 30, closure=True)
    assert losses == ref_losses
    _assert_equal(_params(model), _params(ref))


# --- torch.optim contract ---------------------------------------------------------------------


def test_param_groups_state_defaults_are_shared() -> None:
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = _sd(model, base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state and opt.defaults is base.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("attach", ["wrapper", "base"])
def test_lr_scheduler_on_wrapper_or_base(attach: str) -> None:
    data = _data()
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5)
    torch.manual_seed(0)
    _train(ref, ref_opt, data, 20, sched=ref_sched)

    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = _sd(model, base, every=4)
    sched = torch.optim.lr_scheduler.StepLR(
        opt if attach == "wrapper" else base, step_size=5, gamma=0.5
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        _train(model, opt, data, 20, sched=sched)
    _assert_equal(_params(model), _params(ref))
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.1 * 0.5**4


def test_closure_runs_immediately_under_enable_grad() -> None:
    model = _model()
    opt = _sd(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.step_count == 1


@pytest.mark.parametrize("mode", ["monitor", "lr"])
def test_lbfgs_reevaluates_the_closure_and_monitor_equals_bare(mode: str) -> None:
    x, y = _data()

    def run(wrap: bool):
        model = _model(dropout=0.0)
        base = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        opt = _sd(model, base, every=2, mode=mode) if wrap else base
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses = [float(opt.step(closure)) for _ in range(5)]
        return losses, _params(model), len(calls), opt

    bare_losses, bare_params, bare_calls, _ = run(False)
    losses, params, calls, opt = run(True)
    assert calls > 5  # LBFGS re-evaluated the closure inside the steps
    assert [r.step for r in opt.history if r.ok] == [0, 2, 4]
    if mode == "monitor":  # the first evaluation is shared, not repeated: bit for bit
        assert losses == bare_losses and calls == bare_calls
        _assert_equal(params, bare_params)


def test_zero_grad_and_add_param_group_and_frozen_params() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[0].bias.requires_grad_(False)  # frozen: ignored by the curvature
    head = model[2]
    base = torch.optim.SGD([model[0].weight], lr=0.1)
    opt = _sd(model, base, every=1)
    opt.add_param_group({"params": list(head.parameters()), "lr": 0.01})
    assert len(base.param_groups) == 2 and opt.param_groups is base.param_groups
    frozen = model[0].bias.detach().clone()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].bias, frozen)
    assert opt.last_estimate.ok
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid param_group: a tensor of shape"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def test_several_param_groups_lr_mode_scales_every_group_and_restores() -> None:
    model = _model(dropout=0.0)
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.4}, {"params": model[3].parameters(), "lr": 0.2}]
    )
    opt = _sd(model, base, mode="lr", every=5)
    seen = []
    hook = base.register_step_pre_hook(
        lambda o, a, k: seen.append([g["lr"] for g in o.param_groups])
    )
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    hook.remove()
    assert [g["lr"] for g in base.param_groups] == [0.4, 0.2]  # user LRs untouched
    scale = opt.lr_scale
    assert seen[-1] == pytest.approx([0.4 * scale, 0.2 * scale])
    assert opt.last_estimate.base_lr == 0.4  # reference lr: the largest group lr


# --- checkpoints --------------------------------------------------------------------------------


def _make(mode, seed=0):
    model = _model(seed, dropout=0.0)
    base = torch.optim.AdamW(model.parameters(), lr=5e-2)
    kw = {"mode": mode, "every": 4, "k": 2, "seed": 3}
    if mode == "lr":
        kw["controller"] = LRControllerConfig(max_scale=4.0, smoothing=0.5, hysteresis=0.0)
        base.param_groups[0]["lr"] = 1.0
    if mode == "penalty":
        kw.update(penalty_strength=0.05, penalty_every=2)
    return model, SDOptimizer(base, model=model, loss_fn=F.cross_entropy, data=_data(16, 5), **kw)


@pytest.mark.parametrize("mode", ["monitor", "lr", "penalty"])
def test_resume_from_checkpoint_equals_uninterrupted(mode: str) -> None:
    data = _data()
    model, opt = _make(mode)
    torch.manual_seed(11)
    _train(model, opt, data, 22)
    full = _params(model)
    full_history = [r.to_dict() for r in opt.history]

    model, opt = _make(mode)
    torch.manual_seed(11)
    _train(model, opt, data, 13)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer
    )
    del model, opt
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    model, opt = _make(mode, seed=99)  # different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    _train(model, opt, data, 9, start=13)
    _assert_equal(_params(model), full)
    resumed = [r.to_dict() for r in opt.history]
    assert len(resumed) == len(full_history)
    for a, b in zip(resumed, full_history):
        for key in a:
            if key in ("sdopt/seconds", "sdopt/overhead_fraction"):
                continue
            assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    if mode == "lr":
        assert len({r.lr_scale for r in opt.history}) > 1  # the scale did move


def test_state_dict_contains_everything() -> None:
    model, opt = _make("penalty")
    _train(model, opt, _data(), 5)
    s = opt.state_dict()
    # torch's layout (the base's state and param_groups) with sdopt's state under "sdopt"
    assert set(s) == {"state", "param_groups", "sdopt"}
    plain = opt.base_optimizer.state_dict()
    assert s["state"].keys() == plain["state"].keys()
    assert [{k: v for k, v in g.items() if k != "sdopt"} for g in s["param_groups"]] == (
        plain["param_groups"]
    )
    assert s["param_groups"][0]["sdopt"] is s["sdopt"]  # where DCP carries it
    inner = s["sdopt"]
    assert inner["version"] == 3
    assert inner["step_count"] == 5
    assert inner["eigenvectors"].shape == (sum(p.numel() for p in model.parameters()), 2)
    assert inner["penalty_grad"] is not None and isinstance(inner["generator"], torch.Tensor)
    assert len(inner["history"]) == 2


def test_load_state_dict_rejects_plain_optimizer_state() -> None:
    _, opt = _make("monitor")
    with pytest.raises(ValueError, match=r"Invalid state_dict: keys \['param_groups', 'state'\]"):
        opt.load_state_dict(opt.base_optimizer.state_dict())


# --- robustness ---------------------------------------------------------------------------------


def test_non_finite_loss_skips_estimate_and_leaves_base_behaviour() -> None:
    model = _model(dropout=0.0)
    ref = copy.deepcopy(model)
    opt = _sd(model, torch.optim.SGD(model.parameters(), lr=0.1), every=1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _data()
    for m, o in ((model, opt), (ref, ref_opt)):

        def closure(m=m, o=o):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss * float("nan")

        if o is opt:
            with pytest.warns(
                RuntimeWarning, match="estimate at step 0 skipped \\(non-finite loss\\)"
            ):
                o.step(closure)
        else:
            o.step(closure)
    _assert_equal(_params(model), _params(ref))
    rec = opt.last_estimate
    assert rec.status == "skipped" and rec.reason == "non-finite loss"
    assert opt.state_dict()["sdopt"]["eigenvectors"] is None


def test_failed_estimate_is_skipped_and_training_goes_on() -> None:
    model = _model(dropout=0.0)
    bad = (torch.randn(8, 5, dtype=torch.float64), torch.zeros(8, dtype=torch.long))  # wrong width
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=lambda: bad,  # a fixed batch this wrong is refused at construction
        every=1,
    )
    x, y = _data()
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="estimate failed: RuntimeError"):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.last_estimate.status == "skipped"
    assert opt.last_estimate.reason.startswith("estimate failed: RuntimeError")
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(model)))  # base step done


def test_non_finite_curvature_loss_is_skipped() -> None:
    model = _model(dropout=0.0)
    x, y = _data(8)
    bad = (x * float("inf"), y)
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=bad,
        every=1,
    )
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.last_estimate.status == "skipped"
    assert opt.last_estimate.reason == "non-finite loss on the curvature batch"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_on_cpu() -> None:
    GradScaler = getattr(torch.amp, "GradScaler", None)
    if GradScaler is None:  # pragma: no cover
        pytest.skip("torch.amp.GradScaler unavailable")
    data = _data()

    def run(wrap: bool):
        model = _model(dropout=0.0)
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = _sd(model, base, every=2) if wrap else base
        scaler = GradScaler("cpu", init_scale=2.0**8)
        x, y = data
        for t in range(6):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if t == 3:
                loss = loss * float("inf")  # an overflow: the scaler skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return model, opt, scaler

    model, opt, scaler = run(True)
    ref, _, ref_scaler = run(False)
    _assert_equal(_params(model), _params(ref))
    assert scaler.get_scale() == ref_scaler.get_scale() < 2.0**8
    assert opt.step_count == 5  # the overflowed step never reached the optimizer
    assert all(r.ok for r in opt.history)


def test_cpu_autocast_bf16() -> None:
    model = _model(dropout=0.0).float()
    x, y = _data()
    x = x.float()
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=(x, y),
        every=1,
        k=2,
    )
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert all(r.ok for r in opt.history) and len(opt.history) == 3
    assert all(math.isfinite(r.lambda_max) for r in opt.history)


@pytest.mark.slow
def test_no_graph_retained_and_memory_flat() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model=model,
        loss_fn=F.cross_entropy,
        data=(x, y),
        mode="penalty",
        every=25,
        k=2,
        penalty_every=5,
        max_history=10,
    )

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    run(500)  # warm up caches
    gc.collect()
    tracemalloc.start()
    snap = tracemalloc.take_snapshot()
    run(4500)
    gc.collect()
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap, "filename"))
    tracemalloc.stop()
    assert growth < 200_000, growth  # bytes, over 4,500 steps and 180 estimates
    assert len(opt.history) == 10
    # no autograd graph hangs off any tensor sdopt keeps
    for t in (opt._eigenvectors, opt._penalty_grad, *(p.grad for p in model.parameters())):
        assert t is None or (t.grad_fn is None and not t.requires_grad)
    old = weakref.ref(opt._eigenvectors)
    run(25)
    gc.collect()
    assert old() is None  # the previous estimate's eigenvectors are freed


# --- validation ---------------------------------------------------------------------------------


def _ok_kwargs():
    model = _model()
    return {
        "base_optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "model": model,
        "loss_fn": F.cross_entropy,
        "data": _data(),
    }


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"base_optimizer": "sgd"}, "Invalid base_optimizer: str"),
        ({"model": "net"}, "Invalid model: str"),
        ({"loss_fn": 3}, "Invalid loss_fn: 3"),
        ({"data": None}, "Invalid data: None"),
        ({"data": []}, "Invalid data: a list of length 0"),
        ({"data": 5}, "Invalid data: int"),
        ({"mode": "sam"}, "Invalid mode: 'sam'"),
        ({"every": 0}, "Invalid every: 0"),
        ({"every": 2.5}, "Invalid every: 2.5"),
        ({"k": 0}, "Invalid k: 0"),
        ({"estimator": "slq"}, "Invalid estimator: 'slq'"),
        ({"exponent_map": "rmsprop"}, "Invalid exponent_map: 'rmsprop'"),
        ({"target_sd": -1.0}, "Invalid target_sd: -1.0"),
        ({"controller": 3}, "Invalid controller: 3"),
        ({"controller": {"min_scale": -1}}, "Invalid min_scale: -1"),
        ({"penalty_strength": -0.1}, "Invalid penalty_strength: -0.1"),
        ({"penalty_temperature": 0.0}, "Invalid penalty_temperature: 0.0"),
        ({"penalty_every": 0}, "Invalid penalty_every: 0"),
        ({"penalty_warmup": -1}, "Invalid penalty_warmup: -1"),
        ({"loggers": [object()]}, "Invalid loggers: <object"),
        ({"seed": -1}, "Invalid seed: -1"),
        ({"tol": 0.0}, "Invalid tol: 0.0"),
        ({"dropout": "on"}, "Invalid dropout: 'on'"),
        ({"max_history": 0}, "Invalid max_history: 0"),
        ({"estimate_kwargs": [1]}, r"Invalid estimate_kwargs: \[1\]"),
        ({"estimate_kwargs": {"bogus": 1}}, r"Invalid estimate_kwargs: unknown key 'bogus'"),
        ({"k": 1000}, r"Invalid k: 1000 \(the model has only 67 trainable parameters\)"),
        ({"estimator": "slq"}, r"Invalid estimator: 'slq'"),
    ],
)
def test_invalid_arguments(override: dict, match: str) -> None:
    kwargs = {**_ok_kwargs(), **override}
    base = kwargs.pop("base_optimizer")
    with pytest.raises(ValueError, match=match):
        SDOptimizer(base, **kwargs)


def test_invalid_base_optimizer_foreign_params() -> None:
    model = _model()
    with pytest.raises(ValueError, match="Invalid base_optimizer: it optimizes a tensor of shape"):
        SDOptimizer(
            torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1),
            model=model,
            loss_fn=F.cross_entropy,
            data=_data(),
        )


def test_invalid_model_without_trainable_parameters() -> None:
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="Invalid model: it has no parameters with requires_grad"):
        SDOptimizer(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
            model=model,
            loss_fn=F.cross_entropy,
            data=_data(),
        )


def test_cannot_wrap_itself() -> None:
    kwargs = _ok_kwargs()
    base = kwargs.pop("base_optimizer")
    opt = SDOptimizer(base, **kwargs)
    with pytest.raises(ValueError, match="Invalid base_optimizer: SDOptimizer"):
        SDOptimizer(opt, **kwargs)


# --- lr mode on a quadratic with a known Hessian -----------------------------------------------


class _Quadratic(nn.Module):
    """``L(w) = ½ wᵀ A w`` with ``A = Q diag(α) Qᵀ``: the Hessian is ``A`` everywhere."""

    def __init__(self, alphas: list[float], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = len(alphas)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(torch.tensor(alphas, dtype=torch.float64)) @ q.T)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.A @ self.w + 0.0 * x.sum()


def _quadratic_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_lr_mode_keeps_lr_times_lambda_max_below_the_bound(momentum: float) -> None:
    alphas = [10.0, 5.0, 2.0, 1.0, 0.5, 0.1]
    batch = (torch.zeros(1), torch.zeros(1))

    def train(wrap: bool):
        model = _Quadratic(alphas)
        base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=momentum)
        opt = base
        if wrap:
            opt = SDOptimizer(
                base,
                model=model,
                loss_fn=_quadratic_loss,
                data=batch,
                mode="lr",
                every=5,
                k=3,
                exponent_map="momentum" if momentum else "gd",
            )
        effective = []
        base.register_step_pre_hook(lambda o, a, k: effective.append(o.param_groups[0]["lr"]))
        losses = []
        for _ in range(60):
            opt.zero_grad()
            loss = model(batch[0])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, effective, opt

    bare_losses, _, _ = train(False)
    assert bare_losses[-1] > 1e6  # the user's lr = 1 is far beyond the edge 2/λmax = 0.2
    losses, effective, opt = train(True)
    # the bound: GD is stable iff η λmax < 2; heavy ball iff η λmax < 2 (1 + β)
    bound = 2.0 * (1.0 + momentum)
    assert all(lr * max(alphas) < bound for lr in effective)
    assert max(effective) * max(alphas) > 0.9 * bound  # ... and sits at the edge (target 0.95)
    # at the edge the top direction neither grows nor decays (|z| -> 1): bounded, not divergent
    assert max(losses) < 10 * losses[0] and all(math.isfinite(x) for x in losses)
    if momentum == 0.0:
        assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == 1.0  # the user's lr is untouched
    assert opt.last_estimate.lambda_max == pytest.approx(10.0, rel=1e-2)  # default tol 1e-2


# --- curvature data and loggers ---------------------------------------------------------------


def test_shuffling_loader_as_curvature_data_keeps_monitor_bit_for_bit() -> None:
    data = _data()
    ref = _model()
    torch.manual_seed(5)
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data, 12)

    model = _model()
    x, y = _data(24, seed=9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )  # shuffling draws from the global RNG when a new pass starts
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=loader,
        every=2,
        k=2,
    )
    torch.manual_seed(5)
    _train(model, opt, data, 12)
    _assert_equal(_params(model), _params(ref))
    assert len(opt.history) == 6 and all(r.ok for r in opt.history)
    assert opt.data.drawn == 3  # 6 draws from 3 batches per pass: two passes


def test_callable_curvature_data_is_called_per_estimate() -> None:
    model = _model(dropout=0.0)
    calls = []

    def draw():
        calls.append(1)
        return _data(8, seed=len(calls))

    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=draw,
        every=3,
        k=2,
    )
    _train(model, opt, _data(), 7)
    assert len(calls) == 3 and len(opt.history) == 3


def test_records_go_to_every_logger() -> None:
    class Sink:
        def __init__(self):
            self.records, self.closed = [], False

        def log(self, record):
            self.records.append(record)

        def close(self):
            self.closed = True

    a, b = Sink(), Sink()
    model = _model(dropout=0.0)
    opt = _sd(model, torch.optim.SGD(model.parameters(), lr=0.1), every=2, loggers=[a, b])
    _train(model, opt, _data(), 5)
    opt.close()
    assert [r.step for r in a.records] == [0, 2, 4] and a.records == b.records == opt.history
    assert a.closed and b.closed
    rec = opt.last_estimate
    assert rec.mode == "monitor" and rec.lr == rec.base_lr == 0.1 and rec.lr_scale == 1.0
    assert rec.num_products > 0 and rec.seconds > 0 and 0 < rec.overhead_fraction < 1
    assert rec.edge_ratio == pytest.approx(0.1 * rec.lambda_max / 2)
    assert rec.eigenvalues[0] == rec.lambda_max and len(rec.eigenvalues) == 2


@pytest.mark.parametrize("estimator", ["topk", "exact"])
def test_estimate_matches_closed_form_spectrum(estimator: str) -> None:
    from sdopt.dimension import sharpness_dimension

    alphas = [10.0, 5.0, 2.0, 1.0, 0.5, -0.1]
    model = _Quadratic(alphas)
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.35),
        model=model,
        loss_fn=_quadratic_loss,
        data=(torch.zeros(1), torch.zeros(1)),
        every=1,
        k=6,
        estimator=estimator,
        tol=1e-10,
    )
    opt.zero_grad()
    model(torch.zeros(1)).backward()
    opt.step()
    rec = opt.last_estimate
    assert rec.eigenvalues == pytest.approx(alphas, rel=1e-8, abs=1e-10)
    assert rec.trace == pytest.approx(sum(alphas), rel=1e-8)
    expected = sharpness_dimension(torch.tensor(alphas, dtype=torch.float64), 0.35)
    assert 0 < expected < 6
    assert rec.sharpness_dimension == pytest.approx(expected, rel=1e-6)
    assert rec.edge_ratio == pytest.approx(0.35 * 10 / 2)


def test_topk_bulk_model_uses_the_deflated_trace() -> None:
    from sdopt.dimension import sharpness_dimension

    alphas = [10.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # bulk exactly at its mean: only the trace is noisy
    model = _Quadratic(alphas)
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.25),
        model=model,
        loss_fn=_quadratic_loss,
        data=(torch.zeros(1), torch.zeros(1)),
        every=1,
        k=1,
        estimator="topk",
        tol=1e-10,
        # 1 + 0 + 4 products < d = 6: not the whole spectrum, a Hutchinson mean of the bulk
        estimate_kwargs={"k_bottom": 0, "num_probes": 4},
    )
    opt.zero_grad()
    model(torch.zeros(1)).backward()
    opt.step()
    rec = opt.last_estimate
    assert rec.lambda_max == pytest.approx(10.0, rel=1e-8)
    assert rec.trace == pytest.approx(20.0, rel=5e-2)  # unbiased: 30 probes of 2 (I - vvᵀ)
    expected = sharpness_dimension(torch.tensor(alphas, dtype=torch.float64), 0.25)
    assert 1 < expected < 6
    # normalised probes of the deflated 2·(I − vvᵀ) all read 2: the mean, hence SD, is exact
    assert rec.uncertainty == pytest.approx(0.0, abs=1e-9)
    assert rec.sharpness_dimension == pytest.approx(expected, rel=1e-8)


def _dense_hessian(model: nn.Module, data) -> torch.Tensor:
    from torch.func import functional_call, hessian

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    return hessian(loss)(flat)


def _adam_map_opt(model: nn.Module, base, data, **kw) -> SDOptimizer:
    kw.setdefault("estimator", "exact")
    return SDOptimizer(
        base, model=model, loss_fn=F.cross_entropy, data=data, every=4, k=3,
        exponent_map="adam", **kw,
    )  # fmt: skip


def _preconditioned_spectrum(model: nn.Module, base, data, params, steps: int):
    """Dense ``eigvalsh(P^{-1/2} H P^{-1/2})`` (decreasing) over the leading ``params`` of
    ``model`` (Adam with β₂ = 0.99, ε = 1e-8 after ``steps`` steps) and the plain ``H``."""
    n = sum(p.numel() for p in params)
    h = _dense_hessian(model, data)[:n, :n]
    v_hat = torch.cat([base.state[p]["exp_avg_sq"].reshape(-1) / (1 - 0.99**steps) for p in params])
    scale = (v_hat.sqrt() + 1e-8).rsqrt()
    return torch.linalg.eigvalsh(scale[:, None] * h * scale[None, :]).flip(0), h


@pytest.mark.parametrize("estimator", ["topk", "exact"])
def test_adam_exponent_map_reads_the_preconditioned_dense_hessian(estimator: str) -> None:
    from sdopt.dimension import sd_from_spectrum

    model = _model(dropout=0.0)
    data = _data()
    base = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    opt = _adam_map_opt(model, base, data, estimator=estimator, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the estimate due at step 0 is deferred ...
        _train(model, opt, data, 4)
    first = opt.history[0]  # ... to step 1, once Adam's preconditioner exists
    assert len(opt.history) == 1 and first.step == 1 and first.ok
    assert opt.state_dict()["sdopt"]["deferred"] is False

    # ground truth at the parameters and optimizer state the estimate at step 4 will read
    expected, h = _preconditioned_spectrum(model, base, data, list(model.parameters()), 4)
    _train(model, opt, data, 1)
    rec = opt.last_estimate
    assert rec.step == 4 and rec.ok, rec.reason
    assert rec.eigenvalues == pytest.approx(expected[:3].tolist(), rel=1e-7)
    assert rec.edge_ratio == pytest.approx(0.05 * rec.lambda_max / 38.0)  # Adam's edge, β₁ = 0.9
    # the preconditioned map sits at Adam's edge: far above the plain Hessian's λ_max
    assert expected[0] > 10 * torch.linalg.eigvalsh(h)[-1]
    if estimator == "exact":
        sd, _ = sd_from_spectrum(expected, 0.05, exponent_map="adam", momentum=0.9)
        assert rec.sharpness_dimension == pytest.approx(sd, rel=1e-8)


def test_adam_map_with_a_parameter_that_never_gets_a_gradient() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(dropout=0.0)
            self.spare = nn.Linear(2, 2).double()  # in the optimizer, never in the loss

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = WithSpare()
    data = _data()
    base = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.99))
    opt = _adam_map_opt(model, base, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, data, 4)
    used = [p for n, p in model.named_parameters() if not n.startswith("spare")]
    expected, _ = _preconditioned_spectrum(model, base, data, used, 4)
    _train(model, opt, data, 1)
    rec = opt.last_estimate
    assert rec.step == 4 and rec.ok, rec.reason
    assert rec.eigenvalues == pytest.approx(expected[:3].tolist(), rel=1e-7)
    # the frozen coordinates add zero eigenvalues (identity map, exponent 0), nothing else
    assert rec.trace == pytest.approx(float(expected.sum()), rel=1e-7)


def test_compiled_model_is_measured_eagerly_on_the_same_parameters() -> None:
    from sdopt.curvature import CurvatureFallbackWarning

    data = _data()

    def run(compiled: bool):
        model = _model(dropout=0.0)
        net = torch.compile(model) if compiled else model
        opt = SDOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            model=net,
            loss_fn=F.cross_entropy,
            data=data,
            every=3,
            k=2,
            exponent_map="adam",
            tol=1e-8,
        )
        for _ in range(7):
            opt.zero_grad()
            F.cross_entropy(net(data[0]), data[1]).backward()
            opt.step()
        return opt.history

    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)  # no fallback: eager products
        compiled = run(True)
    eager = run(False)
    assert [r.step for r in compiled] == [1, 3, 6] and all(r.ok for r in compiled)
    for a, b in zip(compiled, eager):
        assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-6)


# --- penalty mode lowers the sharpness dimension ------------------------------------------------


def test_penalty_lowers_the_edge_directions_compared_with_monitor() -> None:
    """Deep linear regression from an unbalanced initialisation (sharp minima): GD alone
    settles at the edge (η·λ_max ≈ 2); the penalty steers it to a flatter minimum. SD itself
    stays ≈ 26 of d = 30 in both runs: it is set by the near-zero eigenvalues of the deep
    linear net, of both signs (λ_min ≈ −0.02 against λ_max ≈ 20: below the 1 % resolution of
    n_neg), which no step size removes (THEORY.md §8)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-1.0], [0.5], [2.0]], dtype=torch.float64)

    def run(mode: str):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 1, bias=False)).double()
        with torch.no_grad():
            model[0].weight.mul_(3.0)
            model[1].weight.mul_(0.3)
        opt = SDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            loss_fn=F.mse_loss,
            data=(x, y),
            mode=mode,
            every=5,
            k=3,
            estimator="exact",
            penalty_strength=0.003,
            penalty_every=1,
        )
        for _ in range(100):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        late = opt.history[len(opt.history) // 2 :]
        sd = sum(r.sharpness_dimension for r in late) / len(late)
        lam = sum(r.lambda_max for r in late) / len(late)
        return sd, lam, float(loss.detach()), opt

    sd_monitor, lam_monitor, loss_monitor, mon = run("monitor")
    sd_penalty, lam_penalty, loss_penalty, opt = run("penalty")
    assert 0.1 * lam_monitor / 2 > 0.95  # monitor sits at the edge of stability
    assert lam_penalty < 0.96 * lam_monitor
    assert loss_penalty < 1e-3 and loss_monitor < 1e-3  # both still fit the data
    assert mon.last_estimate.lambda_min < 0 and sd_monitor > 20 and sd_penalty > 20
    assert all(math.isfinite(r.penalty) and r.penalty > 0 for r in opt.history)
