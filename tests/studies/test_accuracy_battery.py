"""The accuracy battery (issue 10, item 4): its ground truth, its facts, and the targets.

(a) The ground truth itself: the library's exact SD agrees with an independent computation
(``torch.func.hessian`` of the loss as a function of one flat float64 parameter vector,
``eigvalsh``, then :func:`sdopt.sharpness_dimension`, or the exponent maps and Kaplan–Yorke for
the heavy-ball and Adam maps), and every fact a state claims (negative curvature, the edge,
SD = 0, grokked) holds. (b) The targets of the issue for the default estimator, on the quick
battery in the default run and on the full battery under ``-m slow``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import sdopt
from sdopt.dimension import edge_of_stability, kaplan_yorke_dimension, lyapunov_exponents
from sdopt.studies.accuracy import (
    COVERAGE_SLACK,
    STATE_NAMES,
    ZERO_TOL,
    BatteryState,
    battery_states,
    evaluate,
    exact_sharpness_dimension,
    summarize,
    target_checks,
)

QUICK = ("tanh-gd20", "tanh-eos", "relu-minibatch", "softmax-stable", "softmax-eos",
         "grok-grokked", "tanh-heavy-ball")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread in this module: on a loaded 2-core machine two are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_battery() -> dict[str, BatteryState]:
    return {s.name: s for s in battery_states(quick=True)}


@pytest.fixture(scope="module")
def full_battery() -> dict[str, BatteryState]:
    return {s.name: s for s in battery_states()}


# ---------------------------------------------------------------------------------------------
# an independent ground truth


def _flat_loss(state: BatteryState, batch):
    """``θ ↦ loss(model(x; θ), y)`` on one flat float64 vector, via ``functional_call``."""
    model = copy.deepcopy(state.model).to(torch.float64)
    named = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    buffers = {n: b for n, b in model.named_buffers()}
    x, y = batch
    x = x.to(torch.float64) if x.is_floating_point() else x

    def loss(flat):
        params, i = {}, 0
        for name, shape in named:
            params[name] = flat[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return state.loss_fn(functional_call(model, {**params, **buffers}, (x,)), y)

    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    return loss, flat0


def _independent_spectra(state: BatteryState) -> torch.Tensor:
    """``(batches, d)`` eigenvalues from ``torch.func.hessian`` (preconditioned for Adam)."""
    batches = state.data if state.protocol == "minibatch" else [state.data]
    rows = []
    for batch in batches:
        loss, flat0 = _flat_loss(state, batch)
        h = torch.func.hessian(loss)(flat0)
        h = 0.5 * (h + h.T)
        if state.preconditioner is not None:
            s = state.preconditioner.to(torch.float64).rsqrt()
            h = s[:, None] * h * s[None, :]
        rows.append(torch.linalg.eigvalsh(h))
    return torch.stack(rows)


def _independent_sd(state: BatteryState, ev: torch.Tensor) -> float:
    if state.exponent_map == "gd":
        arg = ev[0] if state.protocol == "full-batch" else ev
        return sdopt.sharpness_dimension(arg, state.lr)
    z = lyapunov_exponents(ev, state.lr, map=state.exponent_map, momentum=state.momentum)
    z = torch.sort(z, dim=1, descending=True).values.mean(dim=0)
    return kaplan_yorke_dimension(z)


@pytest.mark.parametrize(
    "name", ["softmax-eos", "softmax-stable", "relu-minibatch", "tanh-eos", "tanh-heavy-ball",
             "grok-grokked"],
)  # fmt: skip
def test_exact_sd_agrees_with_an_independent_hessian(quick_battery, name):
    state = quick_battery[name]
    ev = _independent_spectra(state)
    assert ev.shape == (len(state.data) if state.protocol == "minibatch" else 1, state.dim)
    independent = _independent_sd(state, ev)
    print(f"{name}: library {state.exact_sd:.6f}, independent {independent:.6f}")
    assert independent == pytest.approx(state.exact_sd, abs=1e-6 * state.dim)
    # the stored facts are those of the position-averaged spectrum
    avg = torch.sort(ev, dim=1, descending=True).values.mean(dim=0)
    scale = float(avg.abs().max())
    # eigenvalues at the noise level near 0 may take either sign in another computation
    assert int((avg < -10 * ZERO_TOL * scale).sum()) <= state.n_neg
    assert state.n_neg <= int((avg < -0.1 * ZERO_TOL * scale).sum())
    assert state.n_edge == int((avg > state.edge / state.lr).sum())
    assert state.lambda_max == pytest.approx(float(avg[0]), rel=1e-8, abs=1e-10)
    assert state.lambda_min == pytest.approx(float(avg[-1]), rel=1e-6, abs=1e-10)


def test_exact_sharpness_dimension_recomputes_the_stored_value(quick_battery):
    state = quick_battery["softmax-eos"]
    before = [p.detach().clone() for p in state.model.parameters()]
    assert exact_sharpness_dimension(state) == pytest.approx(state.exact_sd, abs=1e-9)
    after = list(state.model.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # the float64 copy, not the model
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------------
# the states' facts


def _check_facts(states: dict[str, BatteryState]) -> None:
    for s in states.values():
        d = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
        assert s.dim == d and 300 <= d <= 2_500, s.name
        exponents = s.dim if s.exponent_map == "gd" or s.momentum == 0 else 2 * s.dim
        assert 0.0 <= s.exact_sd <= exponents, s.name  # heavy ball: 2d exponents
        assert math.isfinite(s.lambda_max) and s.lambda_min <= s.lambda_max, s.name
        assert s.edge == edge_of_stability(s.exponent_map, s.momentum)
        assert s.protocol in ("full-batch", "minibatch")
        if s.protocol == "minibatch":
            assert isinstance(s.data, list) and 2 <= len(s.data) <= 4, s.name
            assert all(32 <= len(b[1]) <= 64 for b in s.data), s.name
        if s.exponent_map == "adam":
            assert s.preconditioner is not None and s.preconditioner.shape == (s.dim,)
            assert s.preconditioner.dtype == torch.float64 and (s.preconditioner > 0).all()
        else:
            assert s.preconditioner is None
        if s.exponent_map == "gd":
            assert s.momentum == 0.0
        assert all(p.dtype == torch.float32 for p in s.model.parameters()), s.name
    # what the battery must cover
    assert {s.exponent_map for s in states.values()} == {"gd", "momentum", "adam"}
    assert {s.protocol for s in states.values()} == {"full-batch", "minibatch"}
    assert any(s.exact_sd < 0.1 * s.dim for s in states.values())
    assert any(0.9 <= s.edge_ratio <= 1.2 for s in states.values())
    assert sum(s.n_neg > 0 for s in states.values()) >= 3


def _check_named_facts(states: dict[str, BatteryState]) -> None:
    if "tanh-gd20" in states:  # THEORY.md §8: negative curvature puts SD near d
        s = states["tanh-gd20"]
        assert s.n_neg > 100 and s.lambda_min < 0 and s.n_edge == 0
        assert s.exact_sd > 0.9 * s.dim
    if "tanh-eos" in states:
        s = states["tanh-eos"]
        assert 0.95 <= s.edge_ratio <= 1.15 and s.n_edge >= 1
    if "softmax-stable" in states:  # positive definite below the edge: SD is exactly 0
        s = states["softmax-stable"]
        assert s.n_neg == 0 and s.lambda_min > 1e-4 and s.edge_ratio < 0.9
        assert s.exact_sd == 0.0
    if "softmax-eos" in states:  # positive definite, just beyond the edge: small SD
        s = states["softmax-eos"]
        assert s.n_neg == 0 and s.lambda_min > 1e-4 and s.n_edge >= 1
        assert 0.95 <= s.edge_ratio <= 1.15
        assert 0.0 < s.exact_sd < 0.1 * s.dim
    if "grok-grokked" in states:
        s = states["grok-grokked"]
        assert s.info["train_accuracy"] == 1.0 and s.info["val_accuracy"] >= 0.95
        assert s.exact_sd < 0.1 * s.dim
    if "grok-memorising" in states:
        s = states["grok-memorising"]
        assert s.info["train_accuracy"] >= 0.95 and s.info["val_accuracy"] < 0.3
    if "tanh-init" in states:
        assert states["tanh-init"].n_neg > 0
    if "cnn-bn-momentum" in states:
        s = states["cnn-bn-momentum"]
        assert s.model.training and any(
            isinstance(m, torch.nn.BatchNorm2d) and m.training for m in s.model.modules()
        )


def test_quick_battery_facts(quick_battery):
    assert tuple(quick_battery) == QUICK
    assert len(quick_battery) >= 6
    for s in quick_battery.values():
        print(
            f"{s.name:20s} d={s.dim:5d} SD={s.exact_sd:9.2f} n_neg={s.n_neg:4d} "
            f"n_edge={s.n_edge:2d} edge ratio={s.edge_ratio:.3f} build {s.build_seconds:.1f}s "
            f"exact {s.exact_seconds:.1f}s"
        )
    _check_facts(quick_battery)
    _check_named_facts(quick_battery)


@pytest.mark.slow
def test_full_battery_facts(full_battery):
    assert tuple(full_battery) == STATE_NAMES
    assert len(full_battery) >= 12
    _check_facts(full_battery)
    _check_named_facts(full_battery)


def test_build_is_deterministic_and_leaves_the_global_state_alone():
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    first = battery_states(names=["softmax-eos", "tanh-eos"], threads=None)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    second = battery_states(names=["softmax-eos", "tanh-eos"])
    for a, b in zip(first, second):
        assert a.exact_sd == pytest.approx(b.exact_sd, rel=1e-9, abs=1e-9)
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(p, q)


def test_unknown_state_names_are_refused():
    with pytest.raises(ValueError, match="Invalid names"):
        battery_states(names=["no-such-state"])


# ---------------------------------------------------------------------------------------------
# evaluation and targets


def test_target_checks_on_hand_made_numbers():
    # within 10 % of min(SD, d - SD) = 100, covered by 2σ = 10
    assert target_checks(900.0, 905.0, 5.0, 1000) == {
        "error_ok": True, "covered": True, "nonvacuous": True, "gross_miss": False,
        "meets_target": True,
    }  # fmt: skip
    # error 20 > max(10, 2σ = 8): fails, not covered
    flags = target_checks(900.0, 920.0, 4.0, 1000)
    assert not flags["error_ok"] and not flags["covered"] and not flags["meets_target"]
    # a vacuous uncertainty (σ = 60 > max(10 % of 100, 2)) covers, but misses the target
    flags = target_checks(900.0, 950.0, 60.0, 1000)
    assert flags["covered"] and flags["error_ok"] and not flags["nonvacuous"]
    assert not flags["meets_target"]
    # THEORY.md §8: "0.00 ± 0.0" where the exact SD is most of d
    flags = target_checks(2313.7, 0.0, 0.0, 2410)
    assert flags["gross_miss"] and not flags["meets_target"]
    assert target_checks(0.0, 500.0, 1.0, 1000)["gross_miss"]  # the reverse
    # an order of magnitude low where SD is most of d (the old top-k estimator on tanh-eos)
    assert target_checks(1366.5, 77.2, 4.8, 1482)["gross_miss"]
    assert not target_checks(150.0, 90.0, 5.0, 1000)["gross_miss"]  # wrong, but not ≈ 0
    # no uncertainty at all: not covered, vacuous
    flags = target_checks(10.0, 10.0, math.nan, 1000)
    assert not flags["covered"] and not flags["nonvacuous"]
    # float32 rounding against a claimed σ = 0
    assert target_checks(5.0, 5.0 + COVERAGE_SLACK / 2, 0.0, 333)["covered"]


def test_evaluate_exact_on_the_float32_model(quick_battery):
    state = quick_battery["softmax-eos"]
    row = evaluate(state, "exact")
    assert row["state"] == "softmax-eos" and row["method"] == "exact"
    assert row["dim"] == state.dim and row["exact"] == state.exact_sd
    assert row["products"] == state.dim
    assert abs(row["error"]) < COVERAGE_SLACK and row["meets_target"] and row["covered"]
    expected = {
        "estimate", "uncertainty", "low", "high", "abs_error", "rel_error", "rel_error_sd",
        "rel_error_codim", "in_interval", "error_ok", "nonvacuous", "gross_miss", "seconds",
    }  # fmt: skip
    assert expected <= set(row)
    assert summarize([row])["passes"]


def _report(rows) -> str:
    lines = [
        f"{r['state']:20s} exact {r['exact']:9.2f}  est {r['estimate']:9.2f} ± "
        f"{r['uncertainty']:7.2f}  err/min {r['rel_error']:.3f}  covered {r['covered']:d}  "
        f"error ok {r['error_ok']:d}  non-vacuous {r['nonvacuous']:d}  "
        f"gross miss {r['gross_miss']:d}  target {r['meets_target']:d}  products {r['products']}"
        for r in rows
    ]
    return "\n".join([*lines, str(summarize(rows))])


def _assert_targets(battery: dict[str, BatteryState], *, allowed_misses: int) -> None:
    """The issue's targets, with the states the default estimator is known to miss counted:
    on the full battery at seed 0 (docs/sharpness-dimension.md#accuracy-battery) ``tanh-init``
    (error 4.3 against d − SD = 22.7, but σ = 5.6: the probes cannot resolve a co-dimension
    that small at 8 × 40 products) and ``grok-grokked`` (error 19.4 against a target of 18.2)."""
    rows = [evaluate(s) for s in battery.values()]
    report = _report(rows)
    print(report)
    failing = [r["state"] for r in rows if not r["meets_target"]]
    assert len(failing) <= allowed_misses, f"per-state target missed on {failing}\n{report}"
    assert not [r["state"] for r in rows if r["gross_miss"]], report  # never ≈ 0 vs most of d
    assert summarize(rows)["coverage"] >= 0.85, report
    assert summarize(rows)["in_interval"] >= len(rows) - allowed_misses, report


def test_default_estimator_meets_the_targets_on_the_quick_battery(quick_battery):
    _assert_targets(quick_battery, allowed_misses=1)  # grok-grokked


@pytest.mark.slow
def test_default_estimator_meets_the_targets_on_the_full_battery(full_battery):
    _assert_targets(full_battery, allowed_misses=2)  # tanh-init, grok-grokked
