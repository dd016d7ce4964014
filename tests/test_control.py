"""The pure control rules: admissible scale, asymmetric smoothing, hysteresis, clamps."""

from __future__ import annotations

import math

import pytest
import torch

from sdopt.control import (
    LRControllerConfig,
    LRControllerState,
    admissible_scale,
    penalty_weight,
    update_lr_scale,
)


def _exact_sd(eigenvalues: torch.Tensor, lr: float) -> float:
    """Kaplan–Yorke dimension of the GD map, written out independently for the tests."""
    z = torch.log(torch.abs(1 - lr * eigenvalues.double())).sort(descending=True).values
    if z[0] < 0:
        return 0.0
    c = torch.cumsum(z, 0)
    j = int((c >= 0).nonzero().max()) + 1
    if j == len(z):
        return float(len(z))
    return j + float(c[j - 1]) / abs(float(z[j]))


def _predictor(eigenvalues: torch.Tensor, lr: float):
    return lambda s: _exact_sd(eigenvalues, s * lr)


def test_admissible_scale_is_edge_of_stability_for_psd_spectrum() -> None:
    eig = torch.tensor([10.0, 4.0, 1.0, 0.1])
    scale, feasible = admissible_scale(_predictor(eig, 0.5), 0.0, 1e-3, 10.0, rtol=1e-6)
    assert feasible
    # SD = 0 iff lr * s * 10 < 2  ->  s* = 0.4
    assert scale == pytest.approx(0.4, rel=1e-5)
    assert scale <= 0.4


def test_admissible_scale_returns_high_when_never_violated() -> None:
    eig = torch.tensor([1.0, 0.5])
    scale, feasible = admissible_scale(_predictor(eig, 0.01), 0.0, 1e-3, 1.0)
    assert (scale, feasible) == (1.0, True)


def test_admissible_scale_positive_target_allows_crossing_the_edge() -> None:
    eig = torch.tensor([10.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    s0, _ = admissible_scale(_predictor(eig, 1.0), 0.0, 1e-3, 1.0, rtol=1e-6)
    s1, _ = admissible_scale(_predictor(eig, 1.0), 2.0, 1e-3, 1.0, rtol=1e-6)
    assert s1 > s0
    assert _exact_sd(eig, s1) <= 2.0


def test_admissible_scale_relaxes_infeasible_target() -> None:
    eig = torch.tensor([10.0, 1.0, -0.5])  # negative curvature: SD > 0 at every lr
    predict = _predictor(eig, 1.0)
    assert predict(1e-3) > 0
    scale, feasible = admissible_scale(predict, 0.0, 1e-3, 1.0, rtol=1e-6)
    assert not feasible
    assert predict(scale) <= predict(1e-3) + 1e-12
    assert predict(scale * 1.01) > predict(1e-3)  # the bracket is tight
    assert scale < 0.2  # the positive part's edge of stability is never passed


def test_update_decreases_immediately_and_increases_smoothly() -> None:
    config = LRControllerConfig(
        target_sd=0.0, smoothing=0.5, hysteresis=0.0, max_scale=4.0, max_growth=10.0
    )
    lam = {"value": 20.0}
    predict = lambda s: _exact_sd(torch.tensor([lam["value"], 0.1]), s * 0.1)  # noqa: E731
    scale, state = update_lr_scale(predict, LRControllerState(), config)
    assert scale == pytest.approx(1.0, rel=2e-3) and scale <= 1.0  # 2 / (0.1 * 20)
    lam["value"] = 40.0  # sharper: must drop at once
    scale, state = update_lr_scale(predict, state, config)
    assert scale == pytest.approx(0.5, rel=2e-3) and scale <= 0.5
    lam["value"] = 5.0  # flatter: admissible 4.0, approached by an EMA in log-scale
    scale, state = update_lr_scale(predict, state, config)
    assert scale == pytest.approx(math.sqrt(0.5 * 4.0), rel=2e-3)
    scale, state = update_lr_scale(predict, state, config)
    assert scale == pytest.approx(2.0**1.25, rel=2e-3)
    assert state.updates == 4
    assert state.predicted_sd == 0.0


def test_hysteresis_ignores_small_increases() -> None:
    config = LRControllerConfig(target_sd=0.0, smoothing=0.0, hysteresis=0.1, max_scale=1.0)
    state = LRControllerState(scale=0.5, updates=3)
    eig = torch.tensor([2.0 / 0.52])  # admissible ~0.52: +4 % < 10 % band
    scale, state = update_lr_scale(_predictor(eig, 1.0), state, config)
    assert scale == 0.5
    eig = torch.tensor([2.0 / 0.8])
    scale, state = update_lr_scale(_predictor(eig, 1.0), state, config)
    assert scale == pytest.approx(0.8, rel=2e-3)


def test_max_growth_caps_an_increase() -> None:
    config = LRControllerConfig(smoothing=0.0, hysteresis=0.0, max_scale=100.0, max_growth=1.5)
    scale, _ = update_lr_scale(lambda s: 0.0, LRControllerState(scale=1.0, updates=1), config)
    assert scale == pytest.approx(1.5)


def test_clamps() -> None:
    config = LRControllerConfig(
        target_sd=0.0, min_scale=0.1, max_scale=0.5, smoothing=0.0, hysteresis=0.0
    )
    scale, state = update_lr_scale(lambda s: 0.0, LRControllerState(), config)
    assert scale == 0.5
    scale, state = update_lr_scale(lambda s: 5.0 + s, state, config, edge_scale=0.3)
    assert scale == pytest.approx(0.3) and not state.feasible  # nothing admissible: the edge


def test_default_rides_the_edge_from_below_and_above() -> None:
    config = LRControllerConfig(smoothing=0.0, hysteresis=0.0, max_growth=2.0)
    assert config.target_sd is None and config.max_scale > 1  # may raise as well as lower
    state = LRControllerState()
    scales = []
    for _ in range(8):  # edge at s = 6: climbs by at most max_growth per update
        scale, state = update_lr_scale(None, state, config, edge_scale=6.0)
        scales.append(scale)
    assert scales[:3] == pytest.approx([2.0, 4.0, 6.0]) and scales[-1] == pytest.approx(6.0)
    scale, state = update_lr_scale(None, state, config, edge_scale=0.05)  # far beyond: at once
    assert scale == pytest.approx(0.05) and state.feasible and math.isnan(state.predicted_sd)


def test_sd_target_that_no_scale_meets_keeps_the_edge_scale() -> None:
    # a negative eigenvalue expands at every learning rate: SD > 0 at every scale
    eig = torch.tensor([10.0, 1.0, 0.5, -0.2, 0.01, 0.0])
    predict = _predictor(eig, 0.1)
    assert predict(1e-3) > 0
    config = LRControllerConfig(target_sd=0.0, smoothing=0.0, hysteresis=0.0)
    edge = 2.0 / (0.1 * 10.0)
    scale, state = update_lr_scale(predict, LRControllerState(), config, edge_scale=edge)
    assert not state.feasible and scale == pytest.approx(edge)  # no collapse to min_scale


def test_state_round_trips() -> None:
    state = LRControllerState(
        scale=0.3, log_ema=-1.2, admissible=0.4, predicted_sd=1.5, updates=7, sharpness=2.5
    )
    assert LRControllerState.from_dict(state.to_dict()) == state
    old = state.to_dict()
    del old["sharpness"]  # a checkpoint written before the field existed
    assert math.isnan(LRControllerState.from_dict(old).sharpness)


def test_anticipate_holds_first_then_extrapolates_growth_and_keeps_the_larger_sharpness() -> None:
    config = LRControllerConfig(hysteresis=0.0, max_growth=2.0)
    assert config.anticipate and config.smoothing == 0.0  # the defaults
    # first update: no growth measured: the edge scale is halved and never raised
    scale, state = update_lr_scale(None, LRControllerState(), config, edge_scale=8.0, sharpness=1.0)
    assert scale == 1.0 and state.sharpness == 1.0
    scale, state = update_lr_scale(None, LRControllerState(), config, edge_scale=0.8, sharpness=1.0)
    assert scale == pytest.approx(0.4)
    # sharpness grew 1.0 -> 1.5: assumed to grow 1.5x again: edge scale 3.0 becomes 2.0
    s = LRControllerState(scale=1.0, updates=1, sharpness=1.0)
    scale, state = update_lr_scale(None, s, config, edge_scale=3.0, sharpness=1.5)
    assert scale == pytest.approx(2.0)
    # oscillating 1.5 -> 1.0: the larger of the two sets the scale (edge scale 3 * 1.0 / 1.5)
    scale, state = update_lr_scale(None, state, config, edge_scale=3.0, sharpness=1.0)
    assert scale == pytest.approx(2.0)
    # the reactive rule (anticipate=False) takes the edge scale as given
    reactive = LRControllerConfig(hysteresis=0.0, max_growth=10.0, anticipate=False)
    scale, _ = update_lr_scale(None, s, reactive, edge_scale=3.0, sharpness=1.5)
    assert scale == pytest.approx(3.0)


def test_penalty_weight_warmup() -> None:
    assert penalty_weight(0, 0.5) == 0.5
    assert penalty_weight(0, 1.0, warmup=4) == 0.25
    assert penalty_weight(3, 1.0, warmup=4) == 1.0
    assert penalty_weight(100, 1.0, warmup=4) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sd": -1.0}, "Invalid target_sd: -1.0"),
        ({"smoothing": 1.0}, "Invalid smoothing: 1.0"),
        ({"hysteresis": -0.1}, "Invalid hysteresis: -0.1"),
        ({"min_scale": 0.0}, "Invalid min_scale: 0.0"),
        ({"max_scale": -2.0}, "Invalid max_scale: -2.0"),
        ({"min_scale": 0.5, "max_scale": 0.1}, r"Invalid max_scale: 0.1 \(must be >= min_scale"),
        ({"max_growth": 0.5}, "Invalid max_growth: 0.5"),
        ({"grid": 1}, "Invalid grid: 1"),
        ({"rtol": 0.0}, "Invalid rtol: 0.0"),
        ({"anticipate": 1}, "Invalid anticipate: 1"),
    ],
)
def test_config_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LRControllerConfig(**kwargs)
