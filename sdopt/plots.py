"""Figures of a grokking run: accuracy, sharpness dimension, η·λ_max and the LR scale.

matplotlib is optional (``pip install "sdopt[plot]"``); it is imported inside the functions and
uses the non-interactive ``Agg`` backend, so plotting works on headless machines.

The sharpness dimension (SD) is that of Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at
the Edge of Stability", arXiv:2604.19740; ``η·λ_max`` is compared with 2, the edge of stability
of gradient descent (Cohen et al., 2021).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_training", "sd_panel_note"]


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('Plotting needs matplotlib: pip install "sdopt[plot]"') from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if value is None or value == "":
            continue
        value = float(value)
        step = float(row["step"])
        if math.isfinite(value) and step > 0:
            xs.append(step)
            ys.append(value)
    return xs, ys


def _estimates(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """One point per SD estimate: rows repeat the latest estimate, keyed by ``sd_step``."""
    if not any(row.get("sd_step") not in (None, "") for row in rows):
        return _series(rows, key)
    seen: dict[float, float] = {}
    for row in rows:
        at, value = row.get("sd_step"), row.get(key)
        if at in (None, "") or value in (None, ""):
            continue
        value = float(value)
        if math.isfinite(value):
            seen[max(float(at), 1.0)] = value  # an estimate at step 0 is drawn at step 1 (log axis)
    xs = sorted(seen)
    return xs, [seen[x] for x in xs]


def sd_panel_note(sd: Sequence[float], lr_lambda_max: Sequence[float], edge: float) -> str:
    """The SD panel's explanation when every estimate is 0 (a flat line says little alone).

    SD is 0 exactly when every Lyapunov exponent is negative: the map contracts in every
    direction, which for a positive semi-definite top of the spectrum means η·λ_max below the
    edge of stability.
    """
    if not sd or any(v != 0 for v in sd):
        return ""
    if lr_lambda_max and max(lr_lambda_max) < edge:
        return (
            f"SD = 0 at every estimate: η·λ_max ≤ {max(lr_lambda_max):.2g} stayed below the "
            f"edge ({edge:g}),\nso every Lyapunov exponent is negative (the map contracts)"
        )
    return "SD = 0 at every estimate: every Lyapunov exponent is negative"


def plot_training(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    grok_step: int | None = None,
    title: str | None = None,
    dpi: int = 110,
    edge: float = 2.0,
    edge_label: str | None = None,
) -> Path:
    """Write one PNG with three stacked panels sharing a logarithmic step axis.

    1. training and validation accuracy;
    2. the sharpness dimension (with its uncertainty band when known);
    3. ``η·λ_max`` with the line at ``edge`` (2: edge of stability of GD; a log axis when the values
       span decades or lie far below it), and the LR scale of ``SDOptimizer(mode="lr")`` on a
       second axis.

    SD and η·λ_max are drawn once per estimate (at its ``sd_step``), not once per evaluation.

    The grokking step (first step with validation accuracy ≥ 95 %) is marked on every panel.
    Panels without data (no SD estimates) say so instead of staying blank.

    Args:
        rows: Evaluation rows with keys ``step``, ``train_accuracy``, ``val_accuracy`` and
            optionally ``sharpness_dimension``, ``sd_uncertainty``, ``lr_lambda_max``,
            ``lr_scale`` (as :func:`sdopt.train.train` writes them; CSV strings are accepted).
        path: Output ``.png`` path (parent directories are created).
        grok_step: Step to mark, or ``None``.
        title: Figure title.
        dpi: Resolution.
        edge: Where the edge-of-stability line is drawn: ``η·λ_max`` at which the exponent map's
            top exponent turns positive (:func:`sdopt.dimension.edge_of_stability`; 2 for the
            paper's GD map, 38 for Adam's preconditioned map with ``β₁ = 0.9``).
        edge_label: Legend text of that line (default ``"<edge> (edge of stability)"``).

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("Invalid rows: [] (need at least one evaluation row)")
    plt = _matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_acc, ax_sd, ax_edge) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)

    xs, ys = _series(rows, "train_accuracy")
    ax_acc.plot(xs, ys, color="tab:blue", label="train")
    xs, ys = _series(rows, "val_accuracy")
    ax_acc.plot(xs, ys, color="tab:orange", label="validation")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.legend(loc="upper left")

    xs, ys = _estimates(rows, "sharpness_dimension")
    if xs:
        ax_sd.plot(xs, ys, color="tab:green", marker=".", markersize=4, label="SD")
        ux, us = _estimates(rows, "sd_uncertainty")
        if ux == xs:
            lo = [y - u for y, u in zip(ys, us)]
            hi = [y + u for y, u in zip(ys, us)]
            ax_sd.fill_between(xs, lo, hi, color="tab:green", alpha=0.2, linewidth=0)
        note = sd_panel_note(ys, _estimates(rows, "lr_lambda_max")[1], edge)
        if note:
            ax_sd.text(0.5, 0.62, note, ha="center", va="center", transform=ax_sd.transAxes,
                       fontsize=9, color="dimgray")  # fmt: skip
    else:
        ax_sd.text(
            0.5,
            0.5,
            "no SD estimates (run with an SDOptimizer mode)",
            ha="center",
            va="center",
            transform=ax_sd.transAxes,
        )
    ax_sd.set_ylabel("sharpness dimension")

    xs, ys = _estimates(rows, "lr_lambda_max")
    if xs:
        ax_edge.plot(xs, ys, color="tab:red", marker=".", markersize=4, label="η·λ_max")
        if min(ys) > 0 and (max(ys) / min(ys) > 100 or max(ys) < 0.05):
            ax_edge.set_yscale("log")  # far below the edge: a log axis shows the dynamics
    else:
        ax_edge.text(
            0.5,
            0.5,
            "no curvature estimates",
            ha="center",
            va="center",
            transform=ax_edge.transAxes,
        )
    label = edge_label or f"{edge:g} (edge of stability)"
    ax_edge.axhline(edge, color="black", linestyle="--", linewidth=1, label=label)
    ax_edge.set_ylabel("η·λ_max")
    ax_edge.set_xlabel("step")
    ax_scale = ax_edge.twinx()
    xs, ys = _series(rows, "lr_scale")
    ax_scale.plot(xs, ys, color="tab:purple", linewidth=1.2, label="LR scale")
    ax_scale.set_ylabel("LR scale", color="tab:purple")
    handles = ax_edge.get_legend_handles_labels()
    more = ax_scale.get_legend_handles_labels()
    ax_edge.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)

    for ax in (ax_acc, ax_sd, ax_edge):
        ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.3)
        if grok_step is not None and grok_step > 0:
            ax.axvline(grok_step, color="gray", linestyle=":", linewidth=1.5)
    if grok_step is not None and grok_step > 0:
        ax_acc.annotate(
            f"grokking: val ≥ 95 % at step {grok_step}",
            xy=(grok_step, 0.5),
            xytext=(-6, 0),
            textcoords="offset points",
            ha="right",
            fontsize=9,
            color="dimgray",
        )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
