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
    """Markdown: every run, then the median over seeds of each (optimizer, mode) pair.

    The median of steps to 95 % treats a run that never got there as infinitely slow (shown
    as "—" when the median itself is such a run); the count of runs that grokked is given.
    """
    head = "| " + " | ".join(SWEEP_COLUMNS[:-1]) + " |"
    lines = ["### Runs", "", head, "|" + "---|" * (len(SWEEP_COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in SWEEP_COLUMNS[:-1]) + " |")
    lines += [
        "",
        "### Median over seeds",
        "",
        "| optimizer | mode | grokked | median steps to 95 % val | median seconds to 95 % val | median final val accuracy |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["optimizer"], row["mode"]), []).append(row)
    for (optimizer, mode), runs in groups.items():
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
            f"| {optimizer} | {mode} | {grokked}/{len(runs)} | {_fmt(None if steps == inf else steps)} "
            f"| {_fmt(None if secs == inf else secs)} | {final:.4f} |"
        )
    return "\n".join(lines) + "\n"


def wandb_sweep_yaml(configs: Sequence[TrainConfig], *, project: str = "sdopt") -> str:
    """A W&B grid-sweep definition over the values that vary across ``configs``.

    Parameters that are equal in every config are fixed (``value:``); the program is
    ``sdopt grok --wandb online`` with W&B's ``${args}`` appended (``--optimizer=adamw`` ...).
    """
    if not configs:
        raise ValueError("Invalid configs: [] (need at least one configuration)")
    flags = {
        "optimizer": "optimizer",
        "sd_mode": "mode",
        "seed": "seed",
        "p": "p",
        "operation": "operation",
        "train_fraction": "train-fraction",
        "model": "model",
        "lr": "lr",
        "weight_decay": "weight-decay",
        "steps": "steps",
        "sd_every": "every",
        "sd_k": "k",
    }
    lines = [
        "# W&B sweep written by `sdopt sweep`: run with `wandb sweep wandb_sweep.yaml`, then",
        "# `wandb agent <sweep id>` on each machine.",
        "program: sdopt",
        "method: grid",
        f"project: {project}",
        "metric:",
        "  name: val/accuracy",
        "  goal: maximize",
        "parameters:",
    ]
    for attr, flag in flags.items():
        values: list[Any] = []
        for c in configs:
            v = getattr(c, attr)
            if v not in values:
                values.append(v)
        if len(values) == 1:
            lines.append(f"  {flag}:\n    value: {values[0]!r}".replace("'", ""))
        else:
            lines.append(f"  {flag}:\n    values: [{', '.join(str(v) for v in values)}]")
    lines += [
        "command:",
        "  - ${env}",
        "  - sdopt",
        "  - grok",
        "  - --wandb",
        "  - online",
        "  - --no-progress",
        "  - ${args}",
    ]
    return "\n".join(lines) + "\n"


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
                "mode": config.sd_mode,
                "seed": config.seed,
                **{c: summary.get(c) for c in SWEEP_COLUMNS[3:-1]},
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
