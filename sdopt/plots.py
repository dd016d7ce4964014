"""Figures of a grokking run: accuracy, sharpness dimension (its range and decomposition),
η·λ_max and the LR scale.

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


def _fmt_count(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else "?"


def sd_panel_note(
    sd: Sequence[float],
    lr_lambda_max: Sequence[float],
    edge: float,
    *,
    n_neg: Sequence[float] | None = None,
    lambda_min: Sequence[float] | None = None,
) -> str:
    """The SD panel's explanation: why SD is large, or what a flat SD = 0 does and does not show.

    Says only what the estimates measured (THEORY §8: negative eigenvalues expand at every
    learning rate, so below the edge of stability SD is often close to ``d``):

    - negative eigenvalues found (``n_neg > 0`` at some estimate): those directions expand at
      every learning rate, which is why SD is large (a smaller LR does not lower it); beside an
      SD of 0 at every estimate the note says the two are inconsistent;
    - SD = 0 at every estimate, ``λ_min ≥ 0`` measured at every estimate (and ``n_neg == 0``
      where recorded) and ``η·λ_max`` below ``edge``: every exponent is negative, the attractor
      is a point. This is the only case in which that is said;
    - SD = 0 without ``λ_min`` (older metrics files, estimators that did not resolve the bottom
      of the spectrum): nothing is claimed about the bottom; the note says it was not measured.

    Args:
        sd: SD of each estimate.
        lr_lambda_max: ``η·λ_max`` of each estimate.
        edge: The exponent map's edge of stability (2 for GD).
        n_neg: Number of negative eigenvalues of each estimate (``None`` or empty: not recorded).
        lambda_min: Smallest eigenvalue found at each estimate (``None``, empty or ``nan``: not
            measured).

    Returns:
        The note ("" when there is nothing to add to the curve).
    """
    n_neg = [v for v in (n_neg or []) if math.isfinite(v)]
    lam_min = list(lambda_min or [])
    if not sd:
        return ""
    if n_neg and max(n_neg) > 0:
        low = (
            min(v for v in lam_min if math.isfinite(v))
            if any(map(math.isfinite, lam_min))
            else None
        )
        at = f" (λ_min down to {low:.2g})" if low is not None and low < 0 else ""
        if all(v == 0 for v in sd):  # a negative eigenvalue's exponent is > 0, so SD ≥ 1
            return (
                f"SD = 0 reported, yet up to {_fmt_count(max(n_neg))} negative eigenvalues{at}\n"
                "were found: they expand at every LR, so SD cannot be 0 (inconsistent estimate)"
            )
        return (
            f"up to {_fmt_count(max(n_neg))} negative eigenvalues{at}: they expand at every LR,\n"
            "so SD is large even below the edge (a smaller LR cannot lower it)"
        )
    if any(v != 0 for v in sd):
        return ""
    measured = (
        len(lam_min) == len(sd)
        and all(math.isfinite(v) and v >= 0 for v in lam_min)
        and (not n_neg or max(n_neg) == 0)
    )
    below = bool(lr_lambda_max) and max(lr_lambda_max) < edge
    if measured and below:
        return (
            f"SD = 0 at every estimate: λ_min ≥ 0 (measured) and η·λ_max ≤ "
            f"{max(lr_lambda_max):.2g} below the edge ({edge:g}),\n"
            "so every exponent is negative: the attractor is a point"
        )
    if measured:
        return "SD = 0 at every estimate, with λ_min ≥ 0 measured"
    return (
        "SD = 0 at every estimate, but λ_min was not measured: negative eigenvalues\n"
        "(which expand at every LR and make SD large) would not show here"
    )


def _by_step(rows: Sequence[dict[str, Any]], key: str) -> dict[float, float]:
    return dict(zip(*_estimates(rows, key)))


def _sd_band(
    rows: Sequence[dict[str, Any]], xs: list[float], ys: list[float]
) -> tuple[list[float], list[float], str] | None:
    """Lower and upper edge of the SD band: ``[sd_low, sd_high]``, else SD ± its uncertainty."""
    low, high = _by_step(rows, "sd_low"), _by_step(rows, "sd_high")
    unc = _by_step(rows, "sd_uncertainty")
    lo, hi, ranged = [], [], False
    for x, y in zip(xs, ys):
        if x in low and x in high:
            lo.append(min(low[x], y))
            hi.append(max(high[x], y))
            ranged = True
        elif x in unc:
            lo.append(y - unc[x])
            hi.append(y + unc[x])
        else:
            lo.append(math.nan)
            hi.append(math.nan)
    if all(math.isnan(v) for v in lo):
        return None
    return lo, hi, "plausible range [sd_low, sd_high]" if ranged else "± uncertainty"


def _decomposition_panel(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """``n_edge`` and ``n_neg`` (counts, left axis) and ``T`` (right axis) per estimate."""
    edge_x, edge_y = _estimates(rows, "n_edge")
    neg_x, neg_y = _estimates(rows, "n_neg")
    t_x, t_y = _estimates(rows, "total_exponent")
    if not (edge_x or neg_x or t_x):
        ax.text(
            0.5,
            0.5,
            "no SD decomposition in these rows (n_edge, n_neg, T)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_ylabel("directions")
        return
    # n_neg first, with larger markers: where both are 0 the red n_edge stays visible on top
    ax.plot(neg_x, neg_y, color="tab:blue", marker="o", markersize=5,
            label="n_neg (expands at every LR)")  # fmt: skip
    ax.plot(edge_x, edge_y, color="tab:red", marker=".", markersize=5,
            label="n_edge (a smaller LR stabilises)")  # fmt: skip
    counts = edge_y + neg_y
    top = max(counts, default=0.0)
    if top > 20:
        ax.set_yscale("symlog", linthresh=1.0)  # a few edge directions beside hundreds negative
        ax.set_ylim(bottom=-0.5)  # a count of 0 stays visible above the axis
    else:
        ax.set_ylim(-0.5, max(top, 1.0) + 0.5)
    ax.set_ylabel("directions")
    ax_t = ax.twinx()
    if t_x:
        ax_t.plot(t_x, t_y, color="tab:olive", linestyle="--", marker="x", markersize=4,
                  label="T = Σ exponents (≥ 0: SD = d)")  # fmt: skip
        ax_t.axhline(0.0, color="tab:olive", linewidth=0.8, alpha=0.5)
    ax_t.set_ylabel("T = Σ exponents", color="tab:olive")
    handles, labels = ax.get_legend_handles_labels()
    more_h, more_l = ax_t.get_legend_handles_labels()
    ax_t.legend(  # above the panel, on the top axes: never under a curve
        handles + more_h,
        labels + more_l,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=3,
        fontsize=7.5,
        frameon=False,
    )


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
    """Write one PNG with four stacked panels sharing a logarithmic step axis.

    1. training and validation accuracy;
    2. the sharpness dimension, with its plausible range ``[sd_low, sd_high]`` as a shaded band
       (``± sd_uncertainty`` for rows without a range) and a note (:func:`sd_panel_note`) that
       says why SD is large when negative eigenvalues were found, and claims SD = 0 means a
       point attractor only where ``λ_min ≥ 0`` was measured;
    3. its decomposition: ``n_edge`` (eigenvalues beyond the edge: what a smaller learning rate
       would stabilise) and ``n_neg`` (negative eigenvalues: expanding at every learning rate),
       and on a second axis ``T``, the sum of all exponents;
    4. ``η·λ_max`` with the line at ``edge`` (2: edge of stability of GD; a log axis when the values
       span decades or lie far below it), and the LR scale of ``SDOptimizer(mode="lr")`` on a
       second axis.

    SD and η·λ_max are drawn once per estimate (at its ``sd_step``), not once per evaluation.

    The grokking step (first step with validation accuracy ≥ 95 %) is marked on every panel.
    Panels without data (no SD estimates) say so instead of staying blank.

    Args:
        rows: Evaluation rows with keys ``step``, ``train_accuracy``, ``val_accuracy`` and
            optionally ``sharpness_dimension``, ``sd_uncertainty``, ``sd_low``, ``sd_high``,
            ``n_edge``, ``n_neg``, ``total_exponent``, ``lambda_min``, ``lr_lambda_max``,
            ``sd_step``, ``lr_scale`` (as :func:`sdopt.train.train` writes them; CSV strings
            and empty cells are accepted, so older metrics files without the decomposition
            still plot).
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
    fig, (ax_acc, ax_sd, ax_dec, ax_edge) = plt.subplots(
        4, 1, figsize=(8, 11), sharex=True, gridspec_kw={"height_ratios": [1, 1.1, 1, 1]}
    )

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
        band = _sd_band(rows, xs, ys)
        if band is not None:
            lo, hi, band_label = band
            ax_sd.fill_between(xs, lo, hi, color="tab:green", alpha=0.2, linewidth=0,
                               label=band_label)  # fmt: skip
        ax_sd.legend(loc="best", fontsize=8, framealpha=0.85)
        note = sd_panel_note(
            ys,
            _estimates(rows, "lr_lambda_max")[1],
            edge,
            n_neg=_estimates(rows, "n_neg")[1],
            lambda_min=[_by_step(rows, "lambda_min").get(x, math.nan) for x in xs],
        )
        if note:
            ax_sd.set_title(
                note, fontsize=8.5, color="dimgray"
            )  # above the panel: never on the data
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

    _decomposition_panel(ax_dec, rows)

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
    ax_edge.legend(  # above the panel, as the decomposition's: never under the curve
        handles[0] + more[0],
        handles[1] + more[1],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=3,
        fontsize=7.5,
        frameon=False,
    )

    for ax in (ax_acc, ax_sd, ax_dec, ax_edge):
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
