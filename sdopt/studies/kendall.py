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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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
