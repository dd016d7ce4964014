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
    assert "| adamw | — | none | 2/3 | 300 | 3 | 0.9800 |" in md  # rows without an lr
    assert "| sgd | — | lr | 1/3 | — | — | 0.2000 |" in md


def test_wandb_yaml_fixes_constants_and_lists_varying_values() -> None:
    import yaml

    configs = [TrainConfig(seed=s, optimizer=o) for s in (0, 1) for o in ("adamw", "sgd")]
    spec = yaml.safe_load(wandb_sweep_yaml(configs, project="proj"))
    assert spec["project"] == "proj" and spec["method"] == "grid"
    assert spec["parameters"]["seed"] == {"values": [0, 1]}
    assert spec["parameters"]["optimizer"] == {"values": ["adamw", "sgd"]}
    assert spec["parameters"]["p"] == {"value": 97}
    assert spec["parameters"]["train-fraction"] == {"value": 0.3}
    assert "batch-size" not in spec["parameters"]  # None: full batch, the CLI's default
    assert spec["command"][-1] == "${args}"


def test_every_grid_point_of_the_wandb_sweep_rebuilds_its_config() -> None:
    """What a W&B agent runs (the command with ``--flag=value`` arguments) parses back into
    the very config of that grid point."""
    import yaml

    from sdopt.cli import build_parser, config_from_args

    parser = build_parser()
    base = ["grok", "--width", "16", "--layers", "2", "--bias", "--init-scale", "2"]
    configs = [
        config_from_args(parser.parse_args([*base, "--momentum", m]), optimizer=o, seed=seed)
        for o in ("sgd", "adamw") for seed in (0, 1) for m in ("0.9", "0.0")
    ]  # fmt: skip
    spec = yaml.safe_load(wandb_sweep_yaml(configs))
    fixed = {k: v["value"] for k, v in spec["parameters"].items() if "value" in v}
    varying = {k: v["values"] for k, v in spec["parameters"].items() if "values" in v}
    assert set(varying) == {"optimizer", "seed", "momentum", "exponent-map", "lr", "weight-decay"}
    command = spec["command"][2:-1]  # without ${env} and the program name, before ${args}
    assert "--bias" in command
    own = {"optimizer": "optimizer", "seed": "seed", "momentum": "momentum", "lr": "lr",
           "weight-decay": "weight_decay"}  # fmt: skip
    for c in configs:
        point = {flag: getattr(c, attr) for flag, attr in own.items()}
        point["exponent-map"] = c.sd_options["exponent_map"]
        assert all(point[k] in varying[k] for k in varying)
        argv = [*command, *(f"--{k}={v}" for k, v in {**fixed, **point}.items())]
        config = config_from_args(parser.parse_args(argv))
        for field in ("optimizer", "seed", "momentum", "lr", "weight_decay", "p",
                      "train_fraction", "steps", "sd_every", "sd_k", "model_kwargs",
                      "sd_options", "sd_mode"):  # fmt: skip
            assert getattr(config, field) == getattr(c, field), field


def test_a_bias_that_varies_cannot_be_swept() -> None:
    configs = [
        TrainConfig(model="mlp", model_kwargs={"bias": b}, optimizer="sgd") for b in (True, False)
    ]
    with pytest.raises(ValueError, match=r"Invalid configs: model_kwargs\['bias'\] differs"):
        wandb_sweep_yaml(configs)


def test_empty_grids_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Invalid configs: \[\]"):
        wandb_sweep_yaml([])
    with pytest.raises(ValueError, match=r"Invalid configs: \[\]"):
        run_sweep([], tmp_path)
