"""Sweep tables and the W&B sweep file (the runs themselves are covered in test_cli.py)."""

from __future__ import annotations

import pytest

from sdopt.sweeps import run_sweep, summarize_runs, wandb_sweep_yaml
from sdopt.train import TrainConfig


def _row(optimizer, mode, seed, steps, final):
    return {
        "optimizer": optimizer,
        "mode": mode,
        "seed": seed,
        "steps_to_95_val_accuracy": steps,
        "seconds_to_95_val_accuracy": None if steps is None else steps / 100,
        "steps_to_99_train_accuracy": 10,
        "final_train_accuracy": 1.0,
        "final_val_accuracy": final,
        "final_sharpness_dimension": None,
        "final_lr_scale": 1.0,
        "wall_time_seconds": 1.0,
        "out_dir": None,
    }


def test_medians_count_runs_that_never_grokked_as_infinitely_slow() -> None:
    rows = [
        _row("adamw", "none", 0, 100, 0.99),
        _row("adamw", "none", 1, 300, 0.98),
        _row("adamw", "none", 2, None, 0.5),
        _row("sgd", "lr", 0, None, 0.1),
        _row("sgd", "lr", 1, None, 0.2),
        _row("sgd", "lr", 2, 50, 0.97),
    ]
    md = summarize_runs(rows)
    assert "| adamw | none | 2/3 | 300 | 3 | 0.9800 |" in md
    assert "| sgd | lr | 1/3 | — | — | 0.2000 |" in md


def test_wandb_yaml_fixes_constants_and_lists_varying_values() -> None:
    configs = [TrainConfig(seed=s, optimizer=o) for s in (0, 1) for o in ("adamw", "sgd")]
    text = wandb_sweep_yaml(configs, project="proj")
    assert "project: proj" in text
    assert "  seed:\n    values: [0, 1]" in text
    assert "  optimizer:\n    values: [adamw, sgd]" in text
    assert "  p:\n    value: 97" in text
    assert "  train-fraction:\n    value: 0.3" in text


def test_empty_grids_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Invalid configs: \[\]"):
        wandb_sweep_yaml([])
    with pytest.raises(ValueError, match=r"Invalid configs: \[\]"):
        run_sweep([], tmp_path)
