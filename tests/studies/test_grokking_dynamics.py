"""The grokking-dynamics study: jump window and verdict on hand-made curves, caching, outputs."""

from __future__ import annotations

import json
import math

import pytest

from sdopt.studies import grokking_dynamics
from sdopt.studies.grokking_dynamics import (
    GrokkingDynamicsConfig,
    change_statistics,
    checkpoint_epochs,
    jump_verdict,
    jump_window,
    run_grokking_study,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# test accuracy: flat, jump between checkpoints 4 and 6, then flat at 1
ACCURACY = [0.01, 0.01, 0.02, 0.02, 0.05, 0.5, 0.97, 1.0, 1.0, 1.0]


def test_checkpoint_epochs_are_evenly_spaced_and_inclusive():
    assert checkpoint_epochs(100, 5) == [0, 25, 50, 75, 100]
    assert checkpoint_epochs(3, 10) == [0, 1, 2, 3]


def test_jump_window_from_test_accuracy():
    # rise 0.01 -> 1.0: 10 % level 0.109 first reached at 5, 90 % level 0.901 at 6
    assert jump_window(ACCURACY) == (5, 6)
    assert jump_window([0.0, 0.1, 0.2, 0.1]) is None  # never generalised
    assert jump_window([0.0, 1.0]) == (0, 1)


def test_sharp_drop_inside_the_window_is_detected():
    sd = [10.0, 10.5, 11.0, 11.4, 11.9, 6.0, 5.5, 6.1, 6.6, 7.0]
    stats = change_statistics(sd, (5, 6))
    assert stats["net_change"] == pytest.approx(-0.5)
    assert stats["mean_step_inside"] == pytest.approx(-0.5)
    # outside steps: +0.5 +0.5 +0.4 +0.5 -5.9 +0.6 +0.5 +0.4 -> median |.| of 8 sorted = 0.5
    assert stats["median_abs_step_outside"] == pytest.approx(0.5)
    assert not stats["sharp_drop"]  # -0.5/0.5 = -1 is not below -2
    window = jump_window(ACCURACY)
    drop = [10.0, 10.5, 11.0, 11.4, 11.9, 12.0, 4.0, 4.5, 5.0, 5.2]
    stats = change_statistics(drop, window)
    assert stats["net_change"] == pytest.approx(-8.0)
    assert stats["ratio"] < -2 and stats["sharp_drop"]


def test_monotone_decrease_is_not_a_sharp_drop():
    values = [10.0 - i for i in range(10)]
    stats = change_statistics(values, (5, 6))
    assert stats["ratio"] == pytest.approx(-1.0) and not stats["sharp_drop"]


def test_jump_verdict_reports_every_key():
    records = [
        {"epoch": 10 * i, "test_accuracy": a, "sd": 5.0 if i < 6 else 1.0, "trace": 10.0 - i}
        for i, a in enumerate(ACCURACY)
    ]
    verdict = jump_verdict(records, ["sd", "trace", "absent"])
    assert verdict["grokked"] and verdict["window_epochs"] == (50, 60)
    assert verdict["sd"]["sharp_drop"] and not verdict["trace"]["sharp_drop"]
    assert "absent" not in verdict


TINY = GrokkingDynamicsConfig(
    p=7, width=4, epochs=20, checkpoints=3, topk=2, num_probes=2, num_steps=5, exact_every=1
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("grokking")
    return out, run_grokking_study(TINY, out_dir=out, progress=None)


def test_tiny_study_writes_outputs(tiny_study):
    out, result = tiny_study
    assert not result.cached
    assert [r["epoch"] for r in result.records] == [0, 10, 20]
    first = result.records[0]
    assert first["dim"] == 14 * 4 + 4 * 4 + 4 * 7
    for key in ("sd_deflated", "sd_exact", "lambda_max", "trace", "weight_norm"):
        assert math.isfinite(first[key]), key
    assert 0 <= first["sd_exact"] <= first["dim"]
    png = (out / "grokking_dynamics.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5_000
    assert len((out / "checkpoints.csv").read_text().splitlines()) == 4
    assert json.loads((out / "verdict.json").read_text())["grokked"] is False
    assert "## Verdict" in (out / "grokking_dynamics.md").read_text()


def test_cache_hit_skips_retraining(tiny_study, monkeypatch):
    out, first = tiny_study

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was retrained")

    monkeypatch.setattr(grokking_dynamics, "train_with_checkpoints", no_training)
    again = run_grokking_study(TINY, out_dir=out, progress=None)
    assert again.cached
    assert json.dumps(again.records, sort_keys=True) == json.dumps(first.records, sort_keys=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 1}, "Invalid p: 1"),
        ({"lr": 0.0}, "Invalid lr: 0.0"),
        ({"momentum": 1.0}, "Invalid momentum: 1.0"),
        ({"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
        ({"checkpoints": 1}, "Invalid checkpoints: 1"),
        ({"init_scale": 0.0}, "Invalid init_scale: 0.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrokkingDynamicsConfig(**kwargs)
