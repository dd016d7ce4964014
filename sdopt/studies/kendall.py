"""Rank correlation between a complexity measure and the generalization gap.

Two coefficients, as used by Jiang et al. (2020), "Fantastic Generalization Measures and Where
to Find Them", and by the sharpness-dimension paper (Tuci, Korkmaz, Şimşekli, Birdal,
"Generalization at the Edge of Stability", arXiv:2604.19740):

- Kendall's τ over all runs: ``τ = (C - D) / sqrt((C + D + T_x)(C + D + T_y))`` (the tie-corrected
  τ-b of :func:`scipy.stats.kendalltau`), with ``C``/``D`` the concordant/discordant pairs.
- Granulated Kendall ψ: for each hyperparameter ``i`` (here learning rate and batch size), hold
  every other hyperparameter fixed, compute τ over the runs that differ only in ``i``, and average
  over the fixed settings: ``ψ_i = mean_{fixed} τ(measure, gap | only i varies)``. The overall
  ``ψ = mean_i ψ_i``. Groups whose τ is undefined (a constant column, or fewer than two runs)
  are skipped and counted.

scipy is an optional dependency (``pip install "sdopt[science]"``), imported lazily.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def _kendalltau():
    try:
        from scipy.stats import kendalltau
    except ImportError as exc:  # pragma: no cover - scipy is installed in dev environments
        raise ImportError('Kendall correlations need scipy: pip install "sdopt[science]"') from exc
    return kendalltau


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b between ``x`` and ``y``, ignoring pairs where either value is not finite.

    Returns ``nan`` when fewer than two finite pairs remain or either side is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"Invalid y: length {len(y)} (must equal len(x) = {len(x)})")
    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y)
        if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    if len(pairs) < 2:
        return math.nan
    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(_kendalltau()(xs, ys).statistic)


@dataclass(frozen=True)
class GranulatedKendall:
    """Kendall τ over all runs and granulated ψ per hyperparameter.

    Attributes:
        tau: τ over all runs.
        psi: ``{hyperparameter: ψ_i}`` (mean τ over the groups where only that one varies).
        psi_mean: mean of the defined ``ψ_i`` (the paper's "average" column).
        groups_used: ``{hyperparameter: number of groups with a defined τ}``.
        groups_total: ``{hyperparameter: number of groups with at least two runs}``.
    """

    tau: float
    psi: dict[str, float]
    psi_mean: float
    groups_used: dict[str, int]
    groups_total: dict[str, int]


def granulated_kendall(
    runs: Sequence[Mapping[str, float]],
    measure: str,
    gap: str,
    hyperparameters: Sequence[str],
) -> GranulatedKendall:
    """τ and granulated ψ of ``measure`` against ``gap`` over ``runs``.

    Args:
        runs: one mapping per run holding the measure, the gap and every hyperparameter.
        measure: key of the complexity measure.
        gap: key of the generalization gap.
        hyperparameters: keys of the varied hyperparameters (e.g. ``("lr", "batch_size")``).

    Returns:
        A :class:`GranulatedKendall`.
    """
    if not hyperparameters:
        raise ValueError(f"Invalid hyperparameters: {hyperparameters!r} (must be non-empty)")
    for run in runs:
        for key in (measure, gap, *hyperparameters):
            if key not in run:
                raise ValueError(f"Invalid runs: a run has no key {key!r}")
    tau = kendall_tau([r[measure] for r in runs], [r[gap] for r in runs])
    psi: dict[str, float] = {}
    used: dict[str, int] = {}
    total: dict[str, int] = {}
    for name in hyperparameters:
        others = [h for h in hyperparameters if h != name]
        groups: dict[tuple, list[Mapping[str, float]]] = {}
        for run in runs:
            groups.setdefault(tuple(run[h] for h in others), []).append(run)
        taus = []
        n_total = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            n_total += 1
            t = kendall_tau([m[measure] for m in members], [m[gap] for m in members])
            if math.isfinite(t):
                taus.append(t)
        psi[name] = sum(taus) / len(taus) if taus else math.nan
        used[name] = len(taus)
        total[name] = n_total
    defined = [v for v in psi.values() if math.isfinite(v)]
    psi_mean = sum(defined) / len(defined) if defined else math.nan
    return GranulatedKendall(tau, psi, psi_mean, used, total)


# ---------------------------------------------------------------------------------------------
# resampling: τ-b with multiplicities, partial τ, bootstrap intervals
#
# A bootstrap replicate draws runs with replacement, i.e. gives every run a multiplicity. τ-b of
# the replicate is then a ratio of weighted pair sums over the *original* runs: two copies of one
# run are tied in both variables, which τ-b excludes from the numerator and from both tie-corrected
# denominators, so ``τ_b = Σ_ij w_i w_j s^x_ij s^y_ij / sqrt(Σ w_i w_j |s^x_ij| · Σ w_i w_j |s^y_ij|)``
# with ``s^x_ij = sign(x_i − x_j)``. Written out here (instead of calling scipy per replicate)
# because it evaluates every replicate, and every group of the granulated ψ, as one matrix
# product; tests check it against scipy's τ-b on the expanded data.


def weighted_tau_b(weights: Any, x: Any, y: Any) -> np.ndarray:
    """τ-b of ``x`` and ``y`` with run multiplicities ``weights`` (``(R, n)`` or ``(n,)``).

    Returns one τ per row of ``weights`` (``nan`` where every pair is tied in ``x`` or ``y``).
    ``x`` and ``y`` must be finite.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    if x.shape != y.shape or x.ndim != 1 or w.shape[-1] != x.shape[0]:
        raise ValueError(
            f"Invalid weights: shape {w.shape} for x of shape {x.shape} and y of shape {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("Invalid x: x and y must be finite")
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    num = np.einsum("ri,ij,rj->r", w, sx * sy, w)
    dx = np.einsum("ri,ij,rj->r", w, np.abs(sx), w)
    dy = np.einsum("ri,ij,rj->r", w, np.abs(sy), w)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = num / np.sqrt(dx * dy)
    return np.where((dx > 0) & (dy > 0), tau, np.nan)


def partial_tau(tau_xy: Any, tau_xz: Any, tau_yz: Any) -> Any:
    """Kendall's partial τ of x and y controlling for z: ``(τ_xy − τ_xz τ_yz) /
    sqrt((1 − τ_xz²)(1 − τ_yz²))`` (``nan`` where z determines x or y)."""
    a, b, c = (np.asarray(t, dtype=float) for t in (tau_xy, tau_xz, tau_yz))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a - b * c) / np.sqrt((1 - b * b) * (1 - c * c))
    out = np.where((np.abs(b) < 1) & (np.abs(c) < 1), out, np.nan)
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class RankStatistics:
    """Point estimates and bootstrap percentile intervals of one measure against one gap.

    Attributes:
        runs: runs with a finite measure and gap.
        tau, tau_low, tau_high: τ-b over all runs and its interval.
        psi: ``{hyperparameter: ψ_i}``; ``psi_mean`` (with ``psi_low``/``psi_high``) their mean.
        partial: ``{hyperparameter: τ of measure and gap controlling for it}``, with
            ``partial_low``/``partial_high``.
        level: the intervals' coverage; ``resamples``: bootstrap replicates drawn.
    """

    runs: int
    tau: float
    tau_low: float
    tau_high: float
    psi: dict[str, float]
    psi_mean: float
    psi_low: float
    psi_high: float
    partial: dict[str, float]
    partial_low: dict[str, float]
    partial_high: dict[str, float]
    level: float
    resamples: int


def _psi(
    w: np.ndarray, x: np.ndarray, y: np.ndarray, groups: dict[str, list[np.ndarray]]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    per: dict[str, np.ndarray] = {}
    for name, masks in groups.items():
        taus = np.stack([weighted_tau_b(w * m, x, y) for m in masks]) if masks else None
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan groups: mean is nan
            per[name] = np.nanmean(taus, axis=0) if taus is not None else np.full(len(w), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.stack(list(per.values())), axis=0)
    return per, mean


def rank_statistics(
    runs: Sequence[Mapping[str, Any]],
    measure: str,
    gap: str,
    hyperparameters: Sequence[str],
    *,
    strata: Sequence[str] = (),
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> RankStatistics:
    """τ, granulated ψ and partial τ of ``measure`` against ``gap``, with bootstrap intervals.

    Args:
        runs: one mapping per run with the measure, the gap, the hyperparameters and ``strata``.
        measure, gap: keys of the complexity measure and the generalization gap.
        hyperparameters: the varied hyperparameters (ψ has one term per entry; the partial τ
            controls for each in turn).
        strata: keys held fixed when grouping for ψ but not themselves a ψ term (e.g. the seed:
            ψ_lr then averages over every (batch size, seed) group).
        resamples: bootstrap replicates (runs drawn with replacement; percentile intervals; a
            replicate whose statistic is undefined is left out).
        level: coverage of the intervals.
        seed: seeds the resampling (numpy's generator; the global RNGs are untouched).
    """
    if not hyperparameters:
        raise ValueError(f"Invalid hyperparameters: {hyperparameters!r} (must be non-empty)")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"Invalid resamples: {resamples!r} (must be an integer >= 1)")
    if not 0 < level < 1:
        raise ValueError(f"Invalid level: {level!r} (must be in (0, 1))")
    keys = (measure, gap, *hyperparameters, *strata)
    for run in runs:
        for key in keys:
            if key not in run:
                raise ValueError(f"Invalid runs: a run has no key {key!r}")

    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(float(v))

    usable = [r for r in runs if finite(r[measure]) and finite(r[gap])]
    n = len(usable)
    nan = math.nan
    if n < 2:
        empty = {h: nan for h in hyperparameters}
        return RankStatistics(
            n, nan, nan, nan, dict(empty), nan, nan, nan, dict(empty), dict(empty), dict(empty),
            level, resamples,
        )  # fmt: skip
    x = np.array([float(r[measure]) for r in usable])
    y = np.array([float(r[gap]) for r in usable])
    hyper = {h: np.array([float(r[h]) for r in usable]) for h in hyperparameters}
    groups: dict[str, list[np.ndarray]] = {}
    for name in hyperparameters:
        fixed = [h for h in (*hyperparameters, *strata) if h != name]
        labels: dict[tuple, list[int]] = {}
        for i, r in enumerate(usable):
            labels.setdefault(tuple(r[h] for h in fixed), []).append(i)
        groups[name] = [
            np.isin(np.arange(n), idx).astype(float) for idx in labels.values() if len(idx) > 1
        ]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    w = np.zeros((resamples + 1, n))
    w[0] = 1.0  # row 0: the data themselves
    np.add.at(w, (np.repeat(np.arange(1, resamples + 1), n), draws.ravel()), 1.0)
    tau = weighted_tau_b(w, x, y)
    psi, psi_mean = _psi(w, x, y, groups)
    partial = {}
    for h, z in hyper.items():
        partial[h] = partial_tau(tau, weighted_tau_b(w, x, z), weighted_tau_b(w, y, z))
    q = ((1 - level) / 2 * 100, (1 + level) / 2 * 100)

    def interval(values: np.ndarray) -> tuple[float, float]:
        boot = values[1:][np.isfinite(values[1:])]
        if len(boot) < resamples / 2:  # mostly undefined: no honest interval
            return nan, nan
        low, high = np.percentile(boot, q)
        return float(low), float(high)

    tau_low, tau_high = interval(tau)
    psi_low, psi_high = interval(psi_mean)
    part_ci = {h: interval(v) for h, v in partial.items()}
    return RankStatistics(
        runs=n,
        tau=float(tau[0]),
        tau_low=tau_low,
        tau_high=tau_high,
        psi={h: float(v[0]) for h, v in psi.items()},
        psi_mean=float(psi_mean[0]),
        psi_low=psi_low,
        psi_high=psi_high,
        partial={h: float(v[0]) for h, v in partial.items()},
        partial_low={h: c[0] for h, c in part_ci.items()},
        partial_high={h: c[1] for h, c in part_ci.items()},
        level=level,
        resamples=resamples,
    )
