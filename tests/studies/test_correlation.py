"""The correlation study: Kendall τ/ψ against hand counts, caching, outputs, argument checks."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from sdopt.studies import correlation
from sdopt.studies.common import RunCache, config_hash
from sdopt.studies.correlation import CorrelationConfig, run_correlation_study
from sdopt.studies.kendall import granulated_kendall, kendall_tau

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tau_by_counting(x, y):
    """τ-a = (concordant − discordant) / pairs, for data without ties."""
    c = d = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        s = (x[i] - x[j]) * (y[i] - y[j])
        c += s > 0
        d += s < 0
    return (c - d) / (len(x) * (len(x) - 1) / 2)


def test_kendall_tau_matches_pair_counting():
    x = [0.3, 1.2, 0.7, 2.5, 1.9, 0.1]
    y = [1.0, 0.2, 3.0, 2.0, 5.0, 0.5]
    assert kendall_tau(x, y) == pytest.approx(_tau_by_counting(x, y))
    assert kendall_tau(x, x) == pytest.approx(1.0)
    assert kendall_tau(x, [-v for v in x]) == pytest.approx(-1.0)


def test_kendall_tau_undefined_cases_are_nan():
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant measure
    assert math.isnan(kendall_tau([1.0, float("nan")], [1.0, 2.0]))  # one finite pair left


def test_granulated_kendall_hand_example():
    # 3 learning rates x 2 batch sizes. Along lr the measure agrees with the gap at batch 8
    # (3 concordant pairs: τ = 1) and has 1 concordant / 2 discordant pairs at batch 64
    # (τ = -1/3); along the batch size it agrees at lr 0.1 and 0.2 and disagrees at 0.4.
    gap = {
        (0.1, 8): 1.0,
        (0.2, 8): 2.0,
        (0.4, 8): 3.0,
        (0.1, 64): 1.5,
        (0.2, 64): 2.5,
        (0.4, 64): 3.5,
    }
    measure = {
        (0.1, 8): 10,
        (0.2, 8): 20,
        (0.4, 8): 30,
        (0.1, 64): 25,
        (0.2, 64): 24,
        (0.4, 64): 26,
    }
    # batch 64 along lr: (25,24)/(1.5,2.5) discordant, (25,26)/(1.5,3.5) concordant,
    # (24,26)/(2.5,3.5) concordant -> τ = (2 - 1)/3 = 1/3.
    # along batch: lr 0.1: 10->25 with 1.0->1.5 concordant (+1); lr 0.2: 20->24 (+1);
    # lr 0.4: 30->26 with 3.0->3.5 discordant (-1).
    runs = [{"lr": lr, "batch_size": b, "m": measure[lr, b], "gap": gap[lr, b]} for (lr, b) in gap]
    g = granulated_kendall(runs, "m", "gap", ("lr", "batch_size"))
    assert g.psi["lr"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert g.psi["batch_size"] == pytest.approx((1 + 1 - 1) / 3)
    assert g.psi_mean == pytest.approx(((1.0 + 1 / 3) / 2 + 1 / 3) / 2)
    assert g.groups_used == {"lr": 2, "batch_size": 3}
    xs = [r["m"] for r in runs]
    ys = [r["gap"] for r in runs]
    assert g.tau == pytest.approx(_tau_by_counting(xs, ys))


def test_granulated_kendall_skips_constant_groups():
    runs = [
        {"lr": 1, "batch_size": 1, "m": 5.0, "gap": 1.0},
        {"lr": 2, "batch_size": 1, "m": 5.0, "gap": 2.0},  # constant measure at batch 1
        {"lr": 1, "batch_size": 2, "m": 1.0, "gap": 1.0},
        {"lr": 2, "batch_size": 2, "m": 2.0, "gap": 3.0},
    ]
    g = granulated_kendall(runs, "m", "gap", ("lr", "batch_size"))
    assert g.psi["lr"] == pytest.approx(1.0)
    assert g.groups_used["lr"] == 1 and g.groups_total["lr"] == 2


def test_granulated_kendall_rejects_missing_key():
    with pytest.raises(ValueError, match="Invalid runs: a run has no key 'gap'"):
        granulated_kendall([{"lr": 1, "batch_size": 1, "m": 1.0}], "m", "gap", ("lr", "batch_size"))


def test_granulated_kendall_rejects_empty_hyperparameters():
    with pytest.raises(ValueError, match="Invalid hyperparameters"):
        granulated_kendall([], "m", "gap", ())


def test_run_cache_keys_on_every_setting(tmp_path):
    cache = RunCache(tmp_path, prefix="t")
    cache.store({"a": 1, "b": 2.0}, {"x": 3})
    assert cache.load({"b": 2.0, "a": 1}) == {"x": 3}  # key order does not matter
    assert cache.load({"a": 1, "b": 2.5}) is None
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    calls = []
    result, hit = cache.get_or_run({"a": 9}, lambda: calls.append(1) or {"y": 1})
    assert (result, hit, calls) == ({"y": 1}, False, [1])
    result, hit = cache.get_or_run({"a": 9}, lambda: calls.append(1) or {"y": 2})
    assert (result, hit, calls) == ({"y": 1}, True, [1])


TINY = CorrelationConfig(
    learning_rates=(0.05, 0.2),
    batch_sizes=(32, 128),
    width=4,
    target_train_accuracy=0.5,
    max_steps=40,
    tail_steps=30,
    ph_points=30,
    sd_batches=2,
    estimators=("ps",),
    slq_probes=2,
    slq_steps=8,
    topk=2,
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("correlation")
    return out, run_correlation_study(TINY, out_dir=out, progress=None)


def test_tiny_study_writes_table_csv_and_real_pngs(tiny_study):
    out, result = tiny_study
    assert len(result.runs) == 4 and result.cached == 0
    table = (out / "correlations.md").read_text()
    assert "| SD exact (minibatch) | 4 |" in table
    assert "| PH dimension | 4 |" in table
    rows = (out / "correlations.csv").read_text().splitlines()
    assert rows[0].startswith("label,runs,tau_gap_accuracy")
    assert len((out / "runs.csv").read_text().splitlines()) == 5
    for gap in ("gap_accuracy", "gap_loss"):
        png = (out / f"scatter_{gap}.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 5_000
    run = result.runs[0]
    assert run["dim"] == 64 * 4 + 4 * 4 + 4 * 10
    assert 0 <= run["sd_exact"] <= run["dim"]
    assert run["gap_accuracy"] == pytest.approx(run["train_accuracy"] - run["test_accuracy"])
    for key in (
        "sd_ps",
        "lambda_max",
        "trace",
        "rds_sharpness",
        "adaptive_sharpness_avg",
        "weight_norm",
    ):
        assert math.isfinite(run[key]), key


def test_cache_hit_skips_retraining(tiny_study, monkeypatch):
    out, first = tiny_study

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was retrained")

    monkeypatch.setattr(correlation, "run_one", no_training)
    again = run_correlation_study(TINY, out_dir=out, progress=None)
    assert again.cached == 4
    assert json.dumps(again.runs, sort_keys=True) == json.dumps(first.runs, sort_keys=True)


def test_changed_setting_is_a_cache_miss(tiny_study, monkeypatch):
    out, _ = tiny_study
    monkeypatch.setattr(
        correlation, "run_one", lambda *a, **k: (_ for _ in ()).throw(KeyError("miss"))
    )
    with pytest.raises(KeyError, match="miss"):
        run_correlation_study(
            CorrelationConfig(**{**TINY.__dict__, "max_steps": 41}), out_dir=out, progress=None
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rates": ()}, "Invalid learning_rates: ()"),
        ({"learning_rates": (0.1, -1.0)}, "Invalid learning_rates: -1.0"),
        ({"batch_sizes": (0,)}, "Invalid batch_sizes: 0"),
        ({"test_fraction": 1.0}, "Invalid test_fraction: 1.0"),
        ({"target_train_accuracy": 1.5}, "Invalid target_train_accuracy: 1.5"),
        ({"max_steps": 0}, "Invalid max_steps: 0"),
        ({"sd_batches": 0}, "Invalid sd_batches: 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CorrelationConfig(**kwargs)


def test_digits_split_is_stratified_and_standardised():
    data = correlation.load_digits_split(seed=0, test_fraction=0.3)
    assert len(data.train_y) + len(data.test_y) == 1797
    assert abs(float(data.train_x.mean())) < 1e-5
    for c in range(10):  # stratified: every class is split 70/30 up to rounding
        n_test = int((data.test_y == c).sum())
        n_all = n_test + int((data.train_y == c).sum())
        assert abs(n_test - 0.3 * n_all) <= 1
    model = correlation.digits_mlp(16, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 1440
