"""Grids of grokking runs on the CPU: one table (CSV + Markdown) and a W&B sweep file.

:func:`run_sweep` trains each :class:`sdopt.train.TrainConfig` in turn (sequentially: the
machine's cores go to each run) and tabulates steps and seconds to 95 % validation accuracy,
final accuracies and SD statistics, one row per run, plus per-configuration medians over seeds.
:func:`wandb_sweep_yaml` writes the same grid as a Weights & Biases sweep definition that runs
``sdopt grok`` on every grid point (``wandb sweep wandb_sweep.yaml`` then ``wandb agent``).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdopt.train import TrainConfig, train

__all__ = ["SWEEP_COLUMNS", "SweepTable", "run_sweep", "summarize_runs", "wandb_sweep_yaml"]

SWEEP_COLUMNS = (
    "optimizer",
    "lr",
    "mode",
    "seed",
    "steps_to_95_val_accuracy",
    "seconds_to_95_val_accuracy",
    "steps_to_99_train_accuracy",
    "final_train_accuracy",
    "final_val_accuracy",
    "final_sharpness_dimension",
    "final_lr_scale",
    "wall_time_seconds",
    "out_dir",
)


@dataclass
class SweepTable:
    """Result of :func:`run_sweep`: one row per run and the Markdown rendering."""

    rows: list[dict[str, Any]]
    markdown: str


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summarize_runs(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: every run, then the median over seeds of each (optimizer, lr, mode).

    The median of steps to 95 % treats a run that never got there as infinitely slow (shown
    as "—" when the median itself is such a run); the count of runs that grokked is given.
    """
    head = "| " + " | ".join(SWEEP_COLUMNS[:-1]) + " |"
    lines = ["### Runs", "", head, "|" + "---|" * (len(SWEEP_COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in SWEEP_COLUMNS[:-1]) + " |")
    lines += [
        "",
        "### Median over seeds",
        "",
        "| optimizer | lr | mode | grokked | median steps to 95 % val | median seconds to 95 % val | median final val accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["optimizer"], row.get("lr"), row["mode"]), []).append(row)
    for (optimizer, lr, mode), runs in groups.items():
        inf = float("inf")
        steps = statistics.median(
            inf if r["steps_to_95_val_accuracy"] is None else r["steps_to_95_val_accuracy"]
            for r in runs
        )
        secs = statistics.median(
            inf if r["seconds_to_95_val_accuracy"] is None else r["seconds_to_95_val_accuracy"]
            for r in runs
        )
        final = statistics.median(r["final_val_accuracy"] for r in runs)
        grokked = sum(r["steps_to_95_val_accuracy"] is not None for r in runs)
        lines.append(
            f"| {optimizer} | {_fmt(lr)} | {mode} | {grokked}/{len(runs)} | {_fmt(None if steps == inf else steps)} "
            f"| {_fmt(None if secs == inf else secs)} | {final:.4f} |"
        )
    return "\n".join(lines) + "\n"


# TrainConfig fields (and model_kwargs / sd_options keys) that `sdopt grok` sets by a flag
_SWEEP_FLAGS = {
    "optimizer": "optimizer",
    "sd_mode": "mode",
    "seed": "seed",
    "p": "p",
    "operation": "operation",
    "train_fraction": "train-fraction",
    "model": "model",
    "lr": "lr",
    "weight_decay": "weight-decay",
    "momentum": "momentum",
    "batch_size": "batch-size",
    "steps": "steps",
    "sd_every": "every",
    "sd_k": "k",
}
_MODEL_FLAGS = {"width": "width", "num_layers": "layers", "init_scale": "init-scale"}


def wandb_sweep_yaml(configs: Sequence[TrainConfig], *, project: str = "sdopt") -> str:
    """A W&B grid-sweep definition over the values that vary across ``configs``.

    Parameters that are equal in every config are fixed (``value:``), the others listed
    (``values:``); the program is ``sdopt grok --wandb online`` with W&B's ``${args}``
    appended (``--optimizer=sgd`` ...). The MLP's ``bias`` is a ``--bias``/``--no-bias`` switch
    in the command, so it must be the same in every config. W&B's grid is the full product of
    the listed values, so it may hold combinations that ``configs`` do not (e.g. every LR with
    every optimizer when both vary). Written with PyYAML.

    Raises:
        ValueError: no configs, or configs that differ in a setting the sweep cannot pass.
    """
    import yaml

    if not configs:
        raise ValueError("Invalid configs: [] (need at least one configuration)")

    def distinct(get: Any) -> list[Any]:
        values: list[Any] = []
        for c in configs:
            v = get(c)
            if v not in values:
                values.append(v)
        return values

    parameters: dict[str, Any] = {}

    def add(flag: str, values: list[Any]) -> None:
        values = [v for v in values if v is not None]
        if values:
            parameters[flag] = {"value": values[0]} if len(values) == 1 else {"values": values}

    for attr, flag in _SWEEP_FLAGS.items():
        add(flag, distinct(lambda c, attr=attr: getattr(c, attr)))
    for key, flag in _MODEL_FLAGS.items():
        add(flag, distinct(lambda c, key=key: c.model_kwargs.get(key)))
    add("exponent-map", distinct(lambda c: c.sd_options.get("exponent_map")))
    command = ["${env}", "sdopt", "grok", "--wandb", "online", "--no-progress"]
    biases = [b for b in distinct(lambda c: c.model_kwargs.get("bias")) if b is not None]
    if len(biases) > 1:
        raise ValueError(
            "Invalid configs: model_kwargs['bias'] differs between them (--bias/--no-bias is a "
            "switch, not a swept value; write one sweep per setting)"
        )
    if biases:
        command.append("--bias" if biases[0] else "--no-bias")
    spec = {
        "program": "sdopt",
        "method": "grid",
        "project": project,
        "metric": {"name": "val/accuracy", "goal": "maximize"},
        "parameters": parameters,
        "command": [*command, "${args}"],
    }
    header = (
        "# W&B sweep written by `sdopt sweep`: run with `wandb sweep wandb_sweep.yaml`, then\n"
        "# `wandb agent <sweep id>` on each machine.\n"
    )
    return header + yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)


def run_sweep(configs: Sequence[TrainConfig], out_dir: str | Path) -> SweepTable:
    """Train every config (sequentially) and write ``sweep.csv``, ``sweep.md`` and ``wandb_sweep.yaml``.

    Args:
        configs: The runs; each should have its own ``out_dir`` (or ``None``).
        out_dir: Where the table and the YAML go.

    Returns:
        The :class:`SweepTable`.
    """
    if not configs:
        raise ValueError("Invalid configs: [] (need at least one configuration)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wandb_sweep.yaml").write_text(
        wandb_sweep_yaml(configs, project=configs[0].wandb_project)
    )
    rows: list[dict[str, Any]] = []
    for config in configs:
        summary = train(config).summary
        rows.append(
            {
                "optimizer": config.optimizer,
                "lr": config.lr,
                "mode": config.sd_mode,
                "seed": config.seed,
                **{c: summary.get(c) for c in SWEEP_COLUMNS[4:-1]},
                "out_dir": config.out_dir,
            }
        )
        with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(SWEEP_COLUMNS))
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    markdown = summarize_runs(rows)
    (out / "sweep.md").write_text(markdown)
    return SweepTable(rows, markdown)
