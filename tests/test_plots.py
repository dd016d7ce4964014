"""The grokking figure is a real PNG, drawn from rows as train() or a CSV gives them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from sdopt.plots import _estimates, plot_training

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(with_sd: bool) -> list[dict]:
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


@pytest.mark.parametrize("with_sd", [True, False])
def test_plot_writes_a_png(tmp_path: Path, with_sd: bool) -> None:
    path = plot_training(_rows(with_sd), tmp_path / "sub" / "g.png", grok_step=190, title="t")
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000


def test_plot_accepts_csv_strings(tmp_path: Path) -> None:
    rows = _rows(True)
    with (tmp_path / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    with (tmp_path / "m.csv").open() as f:
        read = list(csv.DictReader(f))
    assert plot_training(read, tmp_path / "g.png").read_bytes().startswith(PNG)


def test_estimates_are_one_point_per_estimate() -> None:
    xs, ys = _estimates(_rows(True), "sharpness_dimension")
    assert xs == [1.0, 50.0, 100.0, 150.0, 200.0]  # step 0 is drawn at 1 on the log axis
    assert ys == [0.0, 5.0, 10.0, 15.0, 20.0]


def test_plot_rejects_no_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Invalid rows: \[\]"):
        plot_training([], tmp_path / "g.png")


def test_sd_panel_explains_a_flat_zero() -> None:
    from sdopt.plots import sd_panel_note

    note = sd_panel_note([0.0, 0.0], [1e-3, 2e-4], 2.0)
    assert "η·λ_max ≤ 0.001 stayed below the edge (2)" in note
    assert sd_panel_note([0.0, 0.0], [2.5], 2.0) == (
        "SD = 0 at every estimate: every Lyapunov exponent is negative"
    )  # above the edge yet SD 0: the rest of the spectrum contracts more
    assert sd_panel_note([0.0, 1.5], [2.5, 2.5], 2.0) == ""
    assert sd_panel_note([], [], 2.0) == ""
