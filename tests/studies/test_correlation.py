"""The correlation study: Kendall τ/ψ against hand counts, the resampled τ-b against scipy,
partial τ, bootstrap coverage, the datasets, the fixed-epoch protocol, measures against dense
Hessians, caching, outputs, argument checks."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from sdopt.studies import correlation
from sdopt.studies.common import RunCache, config_hash
from sdopt.studies.correlation import CorrelationConfig, DatasetSpec, run_correlation_study
from sdopt.studies.kendall import (
    granulated_kendall,
    kendall_tau,
    partial_tau,
    rank_statistics,
    weighted_tau_b,
)

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


# --- resampled τ-b, partial τ, bootstrap ---------------------------------------------------


def test_weighted_tau_b_equals_scipy_on_the_expanded_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 15).astype(float)  # ties in x
    y = np.round(x + rng.normal(size=15), 1)
    weights = rng.integers(0, 4, (6, 15))
    weights[0] = 1
    taus = weighted_tau_b(weights, x, y)
    for w, tau in zip(weights, taus):
        expected = kendalltau(np.repeat(x, w), np.repeat(y, w)).statistic
        assert tau == pytest.approx(expected, abs=1e-12)
    assert weighted_tau_b(np.ones(15), x, y)[0] == pytest.approx(kendall_tau(x, y))
    assert math.isnan(weighted_tau_b(np.ones(3), [1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])


def test_weighted_tau_b_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="Invalid weights"):
        weighted_tau_b(np.ones(3), [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="must be finite"):
        weighted_tau_b(np.ones(2), [1.0, float("nan")], [1.0, 2.0])


def test_partial_tau_formula_and_confounder():
    assert partial_tau(0.5, 0.0, 0.0) == pytest.approx(0.5)
    assert partial_tau(0.6, 0.5, 0.4) == pytest.approx((0.6 - 0.2) / math.sqrt(0.75 * 0.84))
    assert math.isnan(partial_tau(0.3, 1.0, 0.2))
    # measure and gap both driven by the learning rate only: τ is large, τ given lr is ~0
    rng = np.random.default_rng(1)
    runs = [
        {"lr": lr, "batch_size": b, "seed": s, "m": lr + 0.01 * rng.normal(),
         "gap": lr + 0.01 * rng.normal()}
        for lr in (1.0, 2.0, 3.0, 4.0, 5.0) for b in (8, 16, 32) for s in (0, 1)
    ]  # fmt: skip
    stats = rank_statistics(runs, "m", "gap", ("lr", "batch_size"), strata=("seed",), resamples=50)
    assert stats.tau > 0.6
    assert abs(stats.partial["lr"]) < 0.2
    assert stats.partial["batch_size"] > 0.6


def test_rank_statistics_point_values_match_granulated_kendall():
    rng = np.random.default_rng(2)
    runs = [
        {"lr": lr, "batch_size": b, "seed": s, "m": float(rng.normal()), "gap": float(rng.normal())}
        for lr in (0.1, 0.2, 0.4) for b in (8, 64) for s in (0, 1)
    ]  # fmt: skip
    stats = rank_statistics(runs, "m", "gap", ("lr", "batch_size"), strata=("seed",), resamples=20)
    # granulated_kendall with the seed as a third hyperparameter groups the same way
    g = granulated_kendall(runs, "m", "gap", ("lr", "batch_size", "seed"))
    assert stats.tau == pytest.approx(g.tau)
    assert stats.psi["lr"] == pytest.approx(g.psi["lr"])
    assert stats.psi["batch_size"] == pytest.approx(g.psi["batch_size"])
    assert stats.runs == 12 and stats.resamples == 20


def test_bootstrap_interval_covers_the_population_tau():
    # y = x + noise with a known population τ: 2/π·arcsin(ρ) for a bivariate normal
    rho = 0.6
    truth = 2 / math.pi * math.asin(rho)
    rng = np.random.default_rng(3)
    covered = 0
    trials = 40
    for t in range(trials):
        x = rng.normal(size=60)
        y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=60)
        runs = [{"lr": i, "batch_size": 1, "m": a, "gap": b} for i, (a, b) in enumerate(zip(x, y))]
        stats = rank_statistics(runs, "m", "gap", ("lr",), resamples=300, seed=t)
        covered += stats.tau_low <= truth <= stats.tau_high
    assert covered >= 0.85 * trials  # nominal 95 %; 40 trials


def test_rank_statistics_argument_checks():
    runs = [{"lr": 1.0, "batch_size": 1, "m": 1.0, "gap": 1.0}]
    with pytest.raises(ValueError, match="Invalid hyperparameters"):
        rank_statistics(runs, "m", "gap", ())
    with pytest.raises(ValueError, match="Invalid resamples: 0"):
        rank_statistics(runs, "m", "gap", ("lr",), resamples=0)
    with pytest.raises(ValueError, match=r"Invalid level: 1\.5"):
        rank_statistics(runs, "m", "gap", ("lr",), level=1.5)
    with pytest.raises(ValueError, match="no key 'seed'"):
        rank_statistics(runs, "m", "gap", ("lr",), strata=("seed",))
    stats = rank_statistics(runs, "m", "gap", ("lr",))  # one run: everything undefined
    assert stats.runs == 1 and math.isnan(stats.tau) and math.isnan(stats.tau_low)


# --- data and training ---------------------------------------------------------------------


def test_digits_raw_scale_stratified_with_exact_label_noise():
    spec = DatasetSpec("digits", 200, 0.25)
    data = correlation.load_study_data(spec, seed=3)
    assert data.train_x.shape == (200, 64) and data.test_x.shape == (1597, 64)
    assert float(data.train_x.min()) == 0.0 and float(data.train_x.max()) == 1.0  # pixels / 16
    assert int(data.noisy.sum()) == 50
    clean = correlation.load_study_data(DatasetSpec("digits", 200, 0.0), seed=3)
    changed = clean.train_y != data.train_y
    assert torch.equal(changed, data.noisy)  # every flipped label is a different class
    counts = torch.bincount(clean.train_y, minlength=10)
    assert int(counts.min()) >= 19 and int(counts.max()) <= 21  # stratified
    again = correlation.load_study_data(spec, seed=3)
    assert torch.equal(again.train_y, data.train_y) and torch.equal(again.train_x, data.train_x)
    other = correlation.load_study_data(spec, seed=4)
    assert not torch.equal(other.train_x, data.train_x)


def test_mnist1d_is_generated_offline_at_raw_scale():
    data = correlation.load_study_data(DatasetSpec("mnist1d", 300), seed=0)
    assert data.train_x.shape == (300, 40) and data.test_x.shape == (1000, 40)
    assert float(data.train_x.abs().max()) > 1.5  # not standardised to unit range
    assert not bool(data.noisy.any())
    assert set(data.test_y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="Invalid train_size: 5000"):
        correlation.load_study_data(DatasetSpec("mnist1d", 5000), seed=0)


def test_fixed_epoch_budget_runs_every_step_and_records_the_tail():
    data = correlation.load_study_data(DatasetSpec("digits", 100, 0.0), seed=0)
    model = correlation.digits_mlp(4, seed=0)
    out = correlation.train_fixed_epochs(model, data, 0.1, 32, epochs=5, record_points=7, seed=0)
    assert out.steps == 5 * (100 // 32) and not out.diverged and out.epochs == 5
    assert out.trajectory.shape == (7, 64 * 4 + 4 * 4 + 4 * 10)
    last = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(out.trajectory[-1], last)  # the last recorded iterate is the final one
    broken = dataclasses.replace(data, train_x=data.train_x.clone())
    broken.train_x[5, 3] = float("inf")  # the batch holding it gives a non-finite loss
    bad = correlation.train_fixed_epochs(
        correlation.digits_mlp(4, seed=0), broken, 0.1, 32, epochs=50, record_points=0
    )
    assert bad.diverged and bad.steps < 3


# --- measures against dense Hessians ---------------------------------------------------------


def test_measures_match_dense_hessians_from_torch_func():
    from torch.func import functional_call, hessian

    import sdopt

    torch.manual_seed(0)
    data = correlation.load_study_data(DatasetSpec("digits", 60, 0.2), seed=0)
    model = correlation.digits_mlp(3, seed=0)
    outcome = correlation.train_fixed_epochs(model, data, 0.5, 10, epochs=20, record_points=30)
    cfg = CorrelationConfig(
        datasets=(DatasetSpec("digits", 60, 0.2),), batch_sizes=(10,), sd_batches=3,
        resamples=10,
    )  # fmt: skip
    out = correlation.measure_run(model, data, 0.5, 10, outcome.trajectory, cfg)
    model64 = correlation.digits_mlp(3, seed=0).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for p in model64.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def dense(x, y):
        def loss(w):
            parts, i = {}, 0
            for n, s in zip(names, shapes):
                parts[n] = w[i : i + s.numel()].reshape(s)
                i += s.numel()
            return torch.nn.functional.cross_entropy(functional_call(model64, parts, (x,)), y)

        h = hessian(loss)(flat)
        return torch.linalg.eigvalsh(0.5 * (h + h.T))

    gen = torch.Generator().manual_seed(cfg.measure_seed)
    batches = correlation._minibatches(data.to(torch.float64), 10, 3, gen)
    spectra = torch.stack([dense(*b) for b in batches])
    assert out["sd_exact"] == pytest.approx(sdopt.sharpness_dimension(spectra, 0.5), abs=1e-6)
    full = dense(data.train_x.double(), data.train_y)
    assert out["sd_exact_fullbatch"] == pytest.approx(
        sdopt.sharpness_dimension(full, 0.5), abs=1e-6
    )
    assert out["sd_exact_fullbatch_n_edge"] == float((full > 2 / 0.5).sum())
    assert out["edge_ratio"] == pytest.approx(0.5 * float(full[-1]) / 2, rel=1e-6)
    assert out["edge_ratio_minibatch"] == pytest.approx(
        0.5 * float(spectra[:, -1].mean()) / 2, rel=1e-6
    )
    assert out["sd_exact_fullbatch_lambda_min"] == pytest.approx(float(full[0]), abs=1e-8)
    assert out["gradient_noise_scale"] == pytest.approx(0.5 * (60 / 10 - 1))
    assert math.isfinite(out["simple_noise_scale"]) and out["simple_noise_scale"] > 0
    assert math.isfinite(out["ph_dimension"])
    assert out["weight_norm"] == pytest.approx(float(flat.norm()))
    for key in ("sd_deflated", "sd_deflated_fullbatch", "lambda_max", "trace", "rds_sharpness"):
        assert math.isfinite(out[key]), key


# --- the study -----------------------------------------------------------------------------

TINY = CorrelationConfig(
    datasets=(DatasetSpec("digits", 80, 0.2), DatasetSpec("mnist1d", 80)),
    learning_rates=(0.05, 0.4),
    batch_sizes=(16, 40),
    seeds=(0, 1),
    epochs=3,
    width=4,
    ph_points=25,
    sd_batches=2,
    resamples=30,
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("correlation")
    return out, run_correlation_study(TINY, out_dir=out, progress=None)


def test_tiny_study_writes_tables_csv_and_real_pngs(tiny_study):
    out, result = tiny_study
    assert len(result.runs) == 16 and result.cached == 0
    assert {r["dataset"] for r in result.runs} == {"digits", "mnist1d"}
    assert set(result.seconds) == {"digits", "mnist1d"}
    table = (out / "correlations.md").read_text()
    assert "## digits" in table and "## mnist1d" in table
    assert "| SD exact (minibatch) | 8 |" in table
    assert "τ given lr" in table
    assert "### Cheap estimators against the exact SD of the same Hessians" in table
    assert "### How far the hyperparameters explain the gaps and SD" in table
    assert "| share of wrong labels fitted |" in table  # digits has label noise
    header = (out / "correlations.csv").read_text().splitlines()[0]
    assert header.startswith("dataset,measure,label,runs,tau_gap_accuracy,tau_low_gap_accuracy")
    assert len((out / "runs.csv").read_text().splitlines()) == 17
    for name in ("digits", "mnist1d"):
        for gap in ("gap_accuracy", "gap_loss"):
            png = (out / f"scatter_{name}_{gap}.png").read_bytes()
            assert png[:8] == PNG_MAGIC and len(png) > 5_000
    run = next(r for r in result.runs if r["dataset"] == "digits" and not r["diverged"])
    assert run["dim"] == 64 * 4 + 4 * 4 + 4 * 10
    assert run["steps"] == 3 * (80 // run["batch_size"])
    assert 0 <= run["sd_exact"] <= run["dim"]
    assert 0 <= run["noisy_memorised"] <= 1
    assert run["gap_accuracy"] == pytest.approx(run["train_accuracy"] - run["test_accuracy"])
    m1d = next(r for r in result.runs if r["dataset"] == "mnist1d")
    assert m1d["dim"] == 40 * 4 + 4 * 4 + 4 * 10
    rows = result.correlations["digits"]
    sd = next(r for r in rows if r["measure"] == "sd_exact")
    assert sd["runs"] == 8
    assert sd["tau_low_gap_accuracy"] <= sd["tau_gap_accuracy"] <= sd["tau_high_gap_accuracy"]


def test_seeds_draw_different_runs(tiny_study):
    _, result = tiny_study
    a = next(r for r in result.runs if r["dataset"] == "digits" and r["seed"] == 0)
    b = next(
        r for r in result.runs
        if r["dataset"] == "digits" and r["seed"] == 1 and r["lr"] == a["lr"]
        and r["batch_size"] == a["batch_size"]
    )  # fmt: skip
    assert a["weight_norm"] != b["weight_norm"]


def test_cache_hit_skips_retraining(tiny_study, monkeypatch):
    out, first = tiny_study

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was retrained")

    monkeypatch.setattr(correlation, "run_one", no_training)
    again = run_correlation_study(TINY, out_dir=out, progress=None)
    assert again.cached == 16
    assert json.dumps(again.runs, sort_keys=True) == json.dumps(first.runs, sort_keys=True)
    # a subset of the datasets and seeds reads the same cache files
    subset = dataclasses.replace(TINY, datasets=TINY.datasets[1:], seeds=(1,))
    part = run_correlation_study(
        subset, out_dir=out / "part", cache_dir=out / "cache", progress=None
    )
    assert part.cached == 4
    # the bootstrap's replicate count is not part of a run's key
    more = dataclasses.replace(TINY, resamples=40)
    assert run_correlation_study(more, out_dir=out / "more", cache_dir=out / "cache",
                                 progress=None).cached == 16  # fmt: skip


def test_changed_setting_is_a_cache_miss(tiny_study, monkeypatch):
    out, _ = tiny_study
    monkeypatch.setattr(
        correlation, "run_one", lambda *a, **k: (_ for _ in ()).throw(KeyError("miss"))
    )
    with pytest.raises(KeyError, match="miss"):
        run_correlation_study(dataclasses.replace(TINY, epochs=4), out_dir=out, progress=None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rates": ()}, "Invalid learning_rates: ()"),
        ({"learning_rates": (0.1, -1.0)}, "Invalid learning_rates: -1.0"),
        ({"learning_rates": (0.1, 0.1)}, "Invalid learning_rates: (0.1, 0.1)"),
        ({"batch_sizes": (0,)}, "Invalid batch_sizes: 0"),
        ({"batch_sizes": (5000,)}, "Invalid batch_sizes: 5000"),
        ({"seeds": ()}, "Invalid seeds: ()"),
        ({"epochs": 0}, "Invalid epochs: 0"),
        ({"sd_batches": 0}, "Invalid sd_batches: 0"),
        ({"estimators": ("exact",)}, "Invalid estimators: 'exact'"),
        ({"datasets": ("digits",)}, "Invalid datasets: 'digits'"),
        (
            {"datasets": (DatasetSpec("digits", 100), DatasetSpec("digits", 200))},
            "Invalid datasets: ['digits', 'digits']",
        ),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    escaped = (
        message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    )
    with pytest.raises(ValueError, match=escaped):
        CorrelationConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mnist", "train_size": 100}, "Invalid name: 'mnist'"),
        ({"name": "digits", "train_size": 5}, "Invalid train_size: 5"),
        ({"name": "digits", "train_size": 100, "label_noise": 1.0}, "Invalid label_noise: 1.0"),
    ],
)
def test_dataset_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**kwargs)


def test_estimator_rows_error_coverage_and_tau():
    runs = [
        {"sd_exact": 10.0, "sd_deflated": 11.0, "sd_deflated_uncertainty": 1.0},  # within 2σ
        {"sd_exact": 20.0, "sd_deflated": 25.0, "sd_deflated_uncertainty": 1.0},  # outside
        {"sd_exact": 30.0, "sd_deflated": 29.0, "sd_deflated_uncertainty": 0.5},  # at 2σ
    ]
    (row,) = correlation.estimator_rows(runs, ("deflated",))
    assert row["protocol"] == "minibatch" and row["runs"] == 3
    assert row["max_error"] == 5.0 and row["mean_error"] == pytest.approx(7 / 3)
    assert row["covered"] == pytest.approx(2 / 3)
    assert row["tau"] == pytest.approx(1.0)


def test_confound_rows_measure_dependence_on_the_hyperparameters():
    runs = [
        {"lr": lr, "batch_size": b, "gap_accuracy": lr / b, "gap_loss": -b, "sd_exact": 1.0}
        for lr in (0.1, 0.2, 0.4) for b in (8, 32)
    ]  # fmt: skip
    rows = {r["quantity"]: r for r in correlation.confound_rows(runs)}
    assert rows["accuracy gap"]["lr_over_b"] == pytest.approx(1.0)
    assert rows["loss gap"]["batch_size"] == pytest.approx(-1.0)
    assert math.isnan(rows["SD exact (minibatch)"]["lr"])  # constant: τ undefined
    assert "share of wrong labels fitted" not in rows  # no run carries it
