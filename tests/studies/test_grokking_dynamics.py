"""The grokking-dynamics study: jump window, verdict and permutation tests on hand-made curves,
per-seed caching, outputs."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import sdopt
from sdopt.studies import grokking_dynamics
from sdopt.studies.grokking_dynamics import (
    GrokkingDynamicsConfig,
    change_statistics,
    checkpoint_epochs,
    combined_permutation_test,
    jump_verdict,
    jump_window,
    permutation_test,
    placement_means,
    run_grokking_study,
    run_key,
    step_changes,
    study_verdict,
    write_outputs,
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


# ---------------------------------------------------------------------------------------------
# permutation test


def _random_walk(rng: random.Random, n: int = 100) -> list[float]:
    values = [0.0]
    for _ in range(n - 1):
        values.append(values[-1] + rng.gauss(0.0, 1.0))
    return values


def test_step_changes_and_circular_placements():
    assert step_changes([1.0, 3.0, 2.0, math.nan, 5.0]) == [
        2.0,
        -1.0,
        pytest.approx(math.nan, nan_ok=True),
        pytest.approx(math.nan, nan_ok=True),
    ]
    # deltas 1, 2, 3, 4: windows of length 2 wrap around at the end
    assert placement_means([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5, 2.5]
    assert (
        placement_means([1.0, math.nan, 3.0], 1)[1] != placement_means([1.0, math.nan, 3.0], 1)[1]
    )
    with pytest.raises(ValueError, match="Invalid length: 5"):
        placement_means([1.0, 2.0, 3.0, 4.0], 5)


def test_planted_drop_gets_the_smallest_p_value():
    rng = random.Random(0)
    n, window = 60, (25, 35)
    values = [0.0]
    for i in range(n - 1):
        step = rng.gauss(0.0, 0.3) + (-3.0 if window[0] <= i < window[1] else 0.0)
        values.append(values[-1] + step)
    test = permutation_test(values, window)
    m = n - 1
    assert test["inside"]["placements"] == m and test["inside"]["length"] == 10
    assert test["inside"]["p_value"] == pytest.approx(1 / m)
    assert test["inside"]["mean_change"] == pytest.approx((values[35] - values[25]) / 10)
    # without the drop, before and after look ordinary: no rise there
    assert test["before"]["p_value"] > 0.05 and test["after"]["p_value"] > 0.05
    assert test["scale"] > 0 and test["scale_kind"] == "median"


def test_planted_rise_before_the_window_is_detected():
    # noise, then a rise just before the window, a drop inside it, noise after it
    window = (30, 40)
    rng = random.Random(1)
    values = [0.0]
    for i in range(69):
        step = 1.0 if 20 <= i < 30 else (-1.0 if 30 <= i < 40 else 0.0)
        values.append(values[-1] + step + rng.gauss(0.0, 0.2))
    test = permutation_test(values, window)
    assert test["inside"]["p_value"] <= 1 / 69 + 1e-12
    assert test["before"]["length"] == 30 and test["before"]["p_value"] < 0.05
    assert test["after"]["p_value"] > 0.1
    # the placements of the "before" segment include the other side: when the series rises
    # before *and* after the window, each side is compared with the other and is not extreme
    both = [0.0]
    for i in range(49):
        step = -0.5 if 20 <= i < 30 else 1.0
        both.append(both[-1] + step + rng.gauss(0.0, 0.2))
    test = permutation_test(both, (20, 30))
    assert test["inside"]["p_value"] <= 1 / 49 + 1e-12
    assert test["before"]["p_value"] > 0.1


def test_random_walks_give_roughly_uniform_p_values():
    rng = random.Random(2)
    p_inside = [
        permutation_test(_random_walk(rng), (40, 55))["inside"]["p_value"] for _ in range(200)
    ]
    small = sum(p < 0.05 for p in p_inside) / len(p_inside)
    assert 0.0 < small < 0.12
    assert 0.35 < sum(p_inside) / len(p_inside) < 0.65  # mean of a uniform p-value is 1/2


def test_window_at_the_ends_and_nans():
    values = [float(i % 5) for i in range(20)]
    at_start = permutation_test(values, (0, 4))
    assert math.isnan(at_start["before"]["mean_change"]) and math.isnan(
        at_start["before"]["p_value"]
    )
    assert at_start["before"]["length"] == 0 and math.isfinite(at_start["inside"]["p_value"])
    at_end = permutation_test(values, (15, 19))
    assert at_end["after"]["length"] == 0 and math.isnan(at_end["after"]["p_value"])
    holes = list(values)
    holes[3] = holes[10] = math.nan
    test = permutation_test(holes, (8, 12))
    assert all(0 < test[k]["p_value"] <= 1 for k in ("before", "inside", "after"))
    assert test["inside"]["placements"] == 19
    all_nan = permutation_test([1.0, math.nan, 2.0, math.nan, 3.0], (1, 3))
    assert math.isnan(all_nan["inside"]["p_value"])
    with pytest.raises(ValueError, match="Invalid window"):
        permutation_test(values, (5, 25))
    with pytest.raises(ValueError, match="Invalid window"):
        permutation_test(values, (5, 5))


def test_constant_series_has_no_significant_change():
    test = permutation_test([3.0] * 30, (10, 20))
    assert test["inside"]["p_value"] == 1.0 and test["after"]["p_value"] == 1.0
    assert math.isnan(test["scale"]) and test["scale_kind"] == "flat"
    combined = combined_permutation_test([([3.0] * 30, (10, 20))], draws=100)
    assert combined["inside"]["n_seeds"] == 0 and math.isnan(combined["inside"]["p_value"])


def test_combined_test_pools_seeds():
    rng = random.Random(3)
    planted = []
    for window in ((20, 30), (30, 45), (50, 58)):
        values = [0.0]
        for i in range(79):
            values.append(
                values[-1] + rng.gauss(0.0, 1.0) - (2.0 if window[0] <= i < window[1] else 0.0)
            )
        planted.append((values, window))
    combined = combined_permutation_test(planted, draws=2_000, generator_seed=0)
    assert combined["inside"]["n_seeds"] == 3 and combined["inside"]["statistic"] < -1.0
    assert combined["inside"]["p_value"] <= 5 / 2_001
    assert combined == combined_permutation_test(planted, draws=2_000, generator_seed=0)
    # the statistic is the average of the normalised per-seed mean changes
    expected = (
        sum(
            permutation_test(v, w)["inside"]["mean_change"] / permutation_test(v, w)["scale"]
            for v, w in planted
        )
        / 3
    )
    assert combined["inside"]["statistic"] == pytest.approx(expected)
    p_null = [
        combined_permutation_test(
            [(_random_walk(rng, 60), (20, 30)) for _ in range(3)], draws=500, generator_seed=k
        )["inside"]["p_value"]
        for k in range(100)
    ]
    assert 0.0 < sum(p < 0.05 for p in p_null) / len(p_null) < 0.12


def _synthetic_runs() -> dict[int, list[dict]]:
    runs = {}
    for seed, jump in ((0, 40), (1, 30), (2, 55)):
        rng = random.Random(seed)
        records, sd = [], 100.0
        for i in range(80):
            acc = 1.0 / (1.0 + math.exp(-(i - jump - 5) / 1.5))
            sd += rng.gauss(0.0, 1.0) + (-8.0 if jump <= i < jump + 10 else 1.0)
            records.append({
                "seed": seed, "checkpoint": i, "epoch": 25 * i, "train_accuracy": 1.0,
                "test_accuracy": acc, "sd_deflated": sd, "sd_momentum": 2 * sd,
                "lambda_max": 2.0 - 0.01 * i, "trace": 100.0 - i + rng.gauss(0.0, 0.1),
                "n_edge": 0.0, "n_neg": 5.0, "weight_norm": 50.0 - 0.1 * i,
            })  # fmt: skip
        runs[seed] = records
    return runs


def test_study_verdict_and_outputs_on_synthetic_runs(tmp_path):
    runs = _synthetic_runs()
    verdict = study_verdict(runs, draws=1_000)
    assert verdict["grokked"] == {"0": True, "1": True, "2": True}
    per_seed = verdict["per_seed"]["0"]
    assert set(per_seed["permutation"]) == {
        "sd_deflated", "sd_momentum", "lambda_max", "trace", "n_edge", "n_neg", "weight_norm"
    }  # fmt: skip
    assert per_seed["permutation"]["sd_deflated"]["inside"]["p_value"] < 0.05
    assert verdict["combined"]["sd_deflated"]["inside"]["p_value"] < 0.01
    assert verdict["combined"]["sd_deflated"]["after"]["p_value"] < 0.05
    assert verdict["combined"]["n_edge"]["inside"]["n_seeds"] == 0  # flat: left out
    # a linear decrease is no sharper inside the window than anywhere else
    assert verdict["combined"]["lambda_max"]["inside"]["p_value"] == 1.0
    files = write_outputs(GrokkingDynamicsConfig(), runs, verdict, tmp_path)
    md = (tmp_path / "grokking_dynamics.md").read_text()
    assert "### Combined over the seeds that grokked" in md and "p (drop inside)" in md
    saved = json.loads((tmp_path / "verdict.json").read_text())
    assert saved["combined"]["sd_deflated"]["inside"]["p_value"] < 0.01
    assert len((tmp_path / "checkpoints.csv").read_text().splitlines()) == 1 + 3 * 80
    assert (tmp_path / "grokking_dynamics.png").read_bytes()[:8] == PNG_MAGIC
    assert set(files) == {"checkpoints_csv", "plot", "verdict_json", "summary_md"}


# ---------------------------------------------------------------------------------------------
# the study end to end (tiny)

TINY = GrokkingDynamicsConfig(
    p=7, width=4, epochs=20, checkpoints=3, topk=2, num_probes=2, num_steps=5, exact_every=1,
    seeds=(0, 1),
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("grokking")
    return out, run_grokking_study(TINY, out_dir=out, progress=None)


def test_tiny_study_writes_outputs(tiny_study):
    out, result = tiny_study
    assert not result.cached and result.cached_seeds == {0: False, 1: False}
    assert [(r["seed"], r["epoch"]) for r in result.records] == [
        (s, e) for s in (0, 1) for e in (0, 10, 20)
    ]
    assert result.runs[0][0]["train_accuracy"] != result.runs[1][0]["train_accuracy"] or (
        result.runs[0][0]["sd_deflated"] != result.runs[1][0]["sd_deflated"]
    )  # the seed changes the split and the initialisation
    first = result.records[0]
    dim = 14 * 4 + 4 * 4 + 4 * 7
    assert first["dim"] == dim
    for key in (
        "sd_deflated", "sd_exact", "sd_momentum", "lambda_max", "lambda_min", "trace",
        "rds_sharpness", "n_edge", "n_neg", "total_exponent", "weight_norm",
    ):  # fmt: skip
        assert math.isfinite(first[key]), key
    assert 0 <= first["sd_exact"] <= dim
    assert 0 <= first["sd_momentum"] <= 2 * dim  # the heavy-ball state has 2d coordinates
    assert 0 <= first["n_neg"] <= dim and first["lambda_min"] <= first["lambda_max"]
    png = (out / "grokking_dynamics.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5_000
    csv = (out / "checkpoints.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * 3 and "sd_momentum" in csv[0] and "n_edge" in csv[0]
    assert json.loads((out / "verdict.json").read_text())["grokked"] == {"0": False, "1": False}
    assert "## Verdict" in (out / "grokking_dynamics.md").read_text()


def test_momentum_sd_is_read_from_the_same_estimate(tiny_study):
    """``sd_momentum`` is the heavy-ball reading of the GD estimate's spectrum: the same as
    estimating with ``exponent_map="momentum"`` from scratch, with no extra products."""
    from sdopt.studies.grokking_dynamics import _build_model
    from sdopt.tasks.grokking import modular_arithmetic

    _, result = tiny_study
    model = _build_model(TINY, 0).to(torch.float64)
    data = modular_arithmetic(TINY.p, "add", TINY.train_fraction, seed=0)
    options = dict(
        protocol="full-batch", k=TINY.topk, tol=TINY.topk_tol, num_probes=TINY.num_probes,
        num_steps=TINY.num_steps,
    )  # fmt: skip
    est = sdopt.estimate_sharpness_dimension(
        model, torch.nn.functional.cross_entropy, data.train, TINY.lr, method="deflated",
        generator=torch.Generator().manual_seed(TINY.measure_seed), exponent_map="momentum",
        momentum=TINY.momentum, **options,
    )  # fmt: skip
    first = result.runs[0][0]
    assert first["sd_momentum"] == pytest.approx(est.value, rel=1e-6)
    assert first["sd_deflated_products"] == est.num_products


def test_cache_hit_skips_retraining(tiny_study, monkeypatch):
    out, first = tiny_study

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was retrained")

    monkeypatch.setattr(grokking_dynamics, "train_with_checkpoints", no_training)
    again = run_grokking_study(TINY, out_dir=out, progress=None)
    assert again.cached
    assert json.dumps(again.records, sort_keys=True) == json.dumps(first.records, sort_keys=True)


def test_each_seed_is_cached_on_its_own(tiny_study, monkeypatch):
    out, first = tiny_study
    trained = []
    real = grokking_dynamics.train_with_checkpoints

    def only_new(config, progress=None, partial_path=None, *, seed=None):
        trained.append(seed)
        return real(config, progress, partial_path, seed=seed)

    monkeypatch.setattr(grokking_dynamics, "train_with_checkpoints", only_new)
    more = GrokkingDynamicsConfig(**{**TINY.__dict__, "seeds": (1, 2)})
    result = run_grokking_study(more, out_dir=out, progress=None)
    assert trained == [2] and result.cached_seeds == {1: True, 2: False}
    assert result.runs[1] == first.runs[1]


def test_run_key_holds_every_setting_and_the_seed():
    key = run_key(TINY, 1)
    assert key["seed"] == 1 and "seeds" not in key
    assert set(key) == {"study", "seed", *(k for k in TINY.__dict__ if k != "seeds")}
    assert run_key(TINY, 1) != run_key(TINY, 0)
    assert run_key(GrokkingDynamicsConfig(**{**TINY.__dict__, "lr": 0.5}), 1) != key
    assert run_key(GrokkingDynamicsConfig(**{**TINY.__dict__, "seeds": (1, 5)}), 1) == key


def test_quick_uses_one_seed_and_twenty_checkpoints():
    quick = GrokkingDynamicsConfig.quick()
    assert quick.seeds == (0,) and quick.checkpoints == 20
    full = GrokkingDynamicsConfig()
    assert full.seeds == (0, 1, 2) and full.checkpoints == 34
    # the estimator runs at the library's defaults (cheaper settings were shown wrong)
    from sdopt.dimension.estimators import DEFAULTS

    assert (full.topk, full.num_probes, full.num_steps, full.topk_tol) == (
        DEFAULTS["k"], DEFAULTS["num_probes"], DEFAULTS["num_steps"], DEFAULTS["tol"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 1}, "Invalid p: 1"),
        ({"lr": 0.0}, "Invalid lr: 0.0"),
        ({"momentum": 1.0}, "Invalid momentum: 1.0"),
        ({"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
        ({"checkpoints": 1}, "Invalid checkpoints: 1"),
        ({"init_scale": 0.0}, "Invalid init_scale: 0.0"),
        ({"seeds": ()}, "Invalid seeds"),
        ({"seeds": (0, 0)}, "Invalid seeds"),
        ({"seeds": (0, 1.5)}, "Invalid seed: 1.5"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrokkingDynamicsConfig(**kwargs)
