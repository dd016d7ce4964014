"""The grokking figure is a real PNG, drawn from rows as train() or a CSV gives them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from sdopt.plots import _estimates, _sd_band, plot_training, sd_panel_note

PNG = b"\x89PNG\r\n\x1a\n"


DECOMPOSITION = ("sd_low", "sd_high", "n_edge", "n_neg", "total_exponent", "j_star", "lambda_min")


def _rows(with_sd: bool, decomposition: bool = False) -> list[dict]:
    rows = []
    for step in range(0, 201, 10):
        sd = {
            "sharpness_dimension": None,
            "sd_uncertainty": None,
            "lr_lambda_max": None,
            "sd_step": None,
        }
        if with_sd:
            at = (step // 50) * 50
            sd = {
                "sharpness_dimension": at / 10,
                "sd_uncertainty": 0.5,
                "lr_lambda_max": 1.0 + at / 100,
                "sd_step": at,
            }
            if decomposition:  # issue 10: 527 negative eigenvalues at first, SD close to d
                n_neg = max(0, 527 - 3 * at)
                sd.update(
                    sharpness_dimension=2313.7 if n_neg else 0.0,
                    sd_low=2301.0 if n_neg else 0.0,
                    sd_high=2327.0 if n_neg else 3.0,
                    n_edge=float(at // 100),
                    n_neg=float(n_neg),
                    total_exponent=-12.3,
                    j_star=2313.0 if n_neg else 0.0,
                    lambda_min=-0.18 if n_neg else 1e-3,
                )
        rows.append(
            {
                "step": step,
                "train_accuracy": min(1.0, step / 50),
                "val_accuracy": min(1.0, step / 200),
                "lr_scale": 1.0,
                **sd,
            }
        )
    return rows


@pytest.mark.parametrize("with_sd, decomposition", [(True, False), (True, True), (False, False)])
def test_plot_writes_a_png(tmp_path: Path, with_sd: bool, decomposition: bool) -> None:
    rows = _rows(with_sd, decomposition)
    path = plot_training(rows, tmp_path / "sub" / "g.png", grok_step=190, title="t")
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000


@pytest.mark.parametrize("decomposition", [False, True])
def test_plot_accepts_csv_strings(tmp_path: Path, decomposition: bool) -> None:
    rows = _rows(True, decomposition)
    with (tmp_path / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    with (tmp_path / "m.csv").open() as f:
        read = list(csv.DictReader(f))
    assert plot_training(read, tmp_path / "g.png").read_bytes().startswith(PNG)
    if decomposition:  # the new columns read back from the file
        assert _estimates(read, "n_neg")[1] == [527.0, 377.0, 227.0, 77.0, 0.0]
        assert _estimates(read, "lambda_min")[1][0] == -0.18
        assert _estimates(read, "total_exponent")[1] == [-12.3] * 5


def test_sd_band_is_the_range_where_recorded() -> None:
    rows = _rows(True, decomposition=True)
    xs, ys = _estimates(rows, "sharpness_dimension")
    lo, hi, label = _sd_band(rows, xs, ys)
    assert (lo[0], hi[0]) == (2301.0, 2327.0) and (lo[-1], hi[-1]) == (0.0, 3.0)
    assert label.startswith("plausible range")
    xs, ys = _estimates(_rows(True), "sharpness_dimension")  # older rows: ± uncertainty
    lo, hi, label = _sd_band(_rows(True), xs, ys)
    assert (lo[1], hi[1]) == (4.5, 5.5) and label == "± uncertainty"


def test_estimates_are_one_point_per_estimate() -> None:
    xs, ys = _estimates(_rows(True), "sharpness_dimension")
    assert xs == [1.0, 50.0, 100.0, 150.0, 200.0]  # step 0 is drawn at 1 on the log axis
    assert ys == [0.0, 5.0, 10.0, 15.0, 20.0]


def test_plot_rejects_no_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Invalid rows: \[\]"):
        plot_training([], tmp_path / "g.png")


def test_sd_panel_note_says_why_sd_is_large_with_negative_curvature() -> None:
    note = sd_panel_note([2313.7, 2200.0], [0.2, 0.3], 2.0, n_neg=[527, 400],
                         lambda_min=[-0.18, -0.1])  # fmt: skip
    assert "527 negative eigenvalues (λ_min down to -0.18)" in note
    assert "expand at every LR" in note and "point" not in note
    # SD = 0 reported beside measured negative curvature: inconsistent, and no "point" claim
    flat = sd_panel_note([0.0], [0.1], 2.0, n_neg=[3], lambda_min=[-0.01])
    assert "SD cannot be 0" in flat and "point" not in flat


def test_sd_panel_note_claims_a_point_only_with_the_bottom_measured() -> None:
    point = "every exponent is negative: the attractor is a point"
    measured = sd_panel_note([0.0, 0.0], [1e-3, 2e-4], 2.0, n_neg=[0, 0], lambda_min=[0.0, 1e-4])
    assert "λ_min ≥ 0 (measured) and η·λ_max ≤ 0.001 below the edge (2)" in measured
    assert point in measured
    # old metrics files (no λ_min), or λ_min missing at one estimate: nothing about the bottom
    for lam in (None, [], [float("nan"), float("nan")], [0.0, float("nan")]):
        note = sd_panel_note([0.0, 0.0], [1e-3, 2e-4], 2.0, lambda_min=lam)
        assert "λ_min was not measured" in note and "point" not in note
        assert "every exponent is negative" not in note
    # n_neg == 0 recorded but λ_min missing: still not measured
    assert "point" not in sd_panel_note([0.0], [1e-3], 2.0, n_neg=[0])
    # λ_min ≥ 0 measured but at or above the edge: no point claim
    above = sd_panel_note([0.0, 0.0], [2.5, 1.0], 2.0, n_neg=[0, 0], lambda_min=[0.0, 0.0])
    assert above == "SD = 0 at every estimate, with λ_min ≥ 0 measured"
    assert sd_panel_note([0.0, 1.5], [2.5, 2.5], 2.0) == ""
    assert sd_panel_note([0.0, 1.5], [2.5, 2.5], 2.0, n_neg=[0, 0], lambda_min=[0.1, 0.1]) == ""
    assert sd_panel_note([], [], 2.0) == ""
