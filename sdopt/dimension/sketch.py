"""Product-free sharpness dimension from a stored spectrum estimate, for any learning rate.

A :class:`SpectrumSketch` holds what an estimator learnt about the Hessian spectrum: per group
(a minibatch, or an SLQ probe) eigenvalue locations ("nodes") with weights summing to ``d``, and
how to read them. :func:`sd_from_spectrum` turns it into the sharpness dimension of
Tuci, Korkmaz, Şimşekli and Birdal (arXiv:2604.19740) at any ``η`` without new Hessian products,
which is what a learning-rate controller needs to predict ``SD(η)`` by bisection.

Readings (``kind``):

* ``"points"`` — point masses; ``pooling="quantile"`` sorts each group's exponents and averages
  them position by position (the paper's minibatch protocol, Def. 4.2); ``pooling="mixture"``
  pools all groups into one measure.
* ``"quantiles"`` — SD-PS: ``M`` equal-mass quantiles of the pooled measure, weight ``d/M`` each.
* ``"histogram"`` — SD-SLQ: the pooled measure binned; uniform density inside each bin.
* ``"kde"`` — SD-KDE: a Gaussian kernel density of bandwidth ``h``, piecewise constant on a grid.

Densities are read exactly: on an interval ``[a, b]`` of uniform density the exponents
``log(|u| + ε)``, ``u = 1 − ηα``, are integrated in closed form with the antiderivative
``H(u) = sign(u)[(|u|+ε)log(|u|+ε) − |u| − ε log ε]``, and the Kaplan–Yorke number of the
continuous measure, ``sup{x : ∫_0^x Z ≥ 0}``, is found by bisection on the exponent threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sdopt._checks import check_choice, check_in_range, check_positive
from sdopt.dimension.exponents import EXPONENT_MAPS, exponent_multiplicity, exponents_unchecked
from sdopt.dimension.kaplan_yorke import weighted_kaplan_yorke_unchecked as weighted_kaplan_yorke

__all__ = ["SpectrumSketch", "sd_from_spectrum"]

KINDS = ("points", "quantiles", "histogram", "kde")


@dataclass(frozen=True)
class SpectrumSketch:
    """A stored spectrum estimate: weighted eigenvalue nodes per group.

    Attributes:
        nodes: float64 ``(G, n)`` eigenvalue locations per group (minibatch or probe).
        weights: float64 ``(G, n)``, each row summing to ``dim`` (zero weights are padding).
        dim: number of parameters ``d``.
        kind: ``"points"``, ``"quantiles"``, ``"histogram"`` or ``"kde"`` (module docstring).
        pooling: ``"quantile"`` (sorted exponents averaged over groups) or ``"mixture"``.
        options: ``num_quantiles`` / ``bins`` / ``bandwidth`` / ``grid`` for the readings.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int
    kind: str = "points"
    pooling: str = "quantile"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return int(self.nodes.shape[0])

    def subset(self, rows: torch.Tensor) -> SpectrumSketch:
        """The sketch restricted to some groups (used for jackknife errors)."""
        return SpectrumSketch(
            self.nodes[rows], self.weights[rows], self.dim, self.kind, self.pooling, self.options
        )


# --------------------------------------------------------------------------- discrete readings
def exponents_and_weights(
    nodes: torch.Tensor, weights: torch.Tensor, lr: float, eps: float, map: str, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    z = exponents_unchecked(nodes, lr, map=map, momentum=momentum, eps=eps)
    mult = exponent_multiplicity(map, momentum)
    w = torch.cat([weights] * mult, dim=-1)
    return z, w


def quantile_pooled_sd(z: torch.Tensor, w: torch.Tensor) -> float:
    """KY of the position-by-position average of each row's decreasing rearrangement."""
    groups = z.shape[0]
    if groups == 1:
        return weighted_kaplan_yorke(z[0], w[0])
    zs, cws = [], []
    for g in range(groups):
        keep = w[g] > 0
        order = torch.argsort(z[g][keep], descending=True)
        zs.append(z[g][keep][order])
        cws.append(torch.cumsum(w[g][keep][order], 0))
    total = min(float(c[-1]) for c in cws)
    breaks = torch.unique(torch.cat([c for c in cws]))
    breaks = breaks[breaks < total * (1 - 1e-12)]
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), breaks, breaks.new_tensor([total])])
    mids = 0.5 * (edges[1:] + edges[:-1])
    widths = edges[1:] - edges[:-1]
    avg = torch.zeros_like(mids)
    for zg, cg in zip(zs, cws):
        idx = torch.searchsorted(cg, mids).clamp(max=zg.numel() - 1)
        avg = avg + zg[idx]
    avg = avg / groups
    keep = widths > 0
    return weighted_kaplan_yorke(avg[keep], widths[keep])


def equal_mass_quantiles(nodes: torch.Tensor, weights: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` points at mass levels ``(r − ½)/num`` of the measure ``Σ w δ_nodes``."""
    keep = weights > 0
    x, w = nodes[keep], weights[keep]
    order = torch.argsort(x)
    x, w = x[order], w[order]
    cw = torch.cumsum(w, 0)
    levels = (torch.arange(num, dtype=torch.float64) + 0.5) / num * cw[-1]
    idx = torch.searchsorted(cw, levels).clamp(max=x.numel() - 1)
    return x[idx]


# --------------------------------------------------------------------------- density readings
def _antiderivative(u: torch.Tensor, eps: float) -> torch.Tensor:
    a = u.abs()
    if eps == 0.0:
        core = torch.where(a > 0, a * torch.log(torch.where(a > 0, a, torch.ones_like(a))), a) - a
    else:
        core = (a + eps) * torch.log(a + eps) - a - eps * math.log(eps)
    return torch.sign(u) * core


def _histogram_cells(
    nodes: torch.Tensor, weights: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = weights > 0
    x, w = nodes[keep], weights[keep]
    lo, hi = float(x.min()), float(x.max())
    pad = 1e-9 * max(1.0, hi - lo)
    edges = torch.linspace(lo - pad, hi + pad, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(x, edges[1:-1])
    masses = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, w)
    return edges, masses


def _kde_cells(
    nodes: torch.Tensor, weights: torch.Tensor, bandwidth: float | None, grid: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    keep = weights > 0
    x, w = nodes[keep], weights[keep]
    spread = float(x.max() - x.min())
    h = bandwidth if bandwidth is not None else max(0.01 * spread, 1e-6)
    edges = torch.linspace(
        float(x.min()) - 5 * h, float(x.max()) + 5 * h, grid + 1, dtype=torch.float64
    )
    # exact Gaussian-kernel mass of each cell: Φ((b − x)/h) − Φ((a − x)/h)
    cdf = torch.special.ndtr((edges[:, None] - x[None, :]) / h)
    masses = ((cdf[1:] - cdf[:-1]) * w[None, :]).sum(1)
    return edges, masses * (w.sum() / masses.sum()), h


def _interval_sd(
    edges: torch.Tensor, masses: torch.Tensor, lr: float, eps: float, map: str, momentum: float
) -> float:
    """Continuous Kaplan–Yorke number of a piecewise-constant eigenvalue density."""
    if map != "gd" and exponent_multiplicity(map, momentum) != 1:
        # no closed form for the heavy-ball roots: read each cell as 16 equal point masses
        sub = 16
        a, b = edges[:-1], edges[1:]
        frac = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub
        pts = (a[:, None] + (b - a)[:, None] * frac[None, :]).reshape(-1)
        pw = (masses[:, None] / sub).expand(-1, sub).reshape(-1)
        z, w = exponents_and_weights(pts, pw, lr, eps, map, momentum)
        return weighted_kaplan_yorke(z, w)
    if map == "adam" and momentum == 0.0:
        map = "gd"
    keep = masses > 0
    u_hi = (1.0 - lr * edges[:-1])[keep]
    u_lo = (1.0 - lr * edges[1:])[keep]
    m = masses[keep]
    dens = m / (u_hi - u_lo)
    h_lo, h_hi = _antiderivative(u_lo, eps), _antiderivative(u_hi, eps)

    def above(t: float) -> tuple[float, float]:
        """(weight, sum of exponents) of the part with exponent ≥ t."""
        r = math.exp(t) - eps if t > -745 else -eps
        if r <= 0:
            return float(m.sum()), float((dens * (h_hi - h_lo)).sum())
        rt = u_lo.new_tensor(r)
        p_pos = torch.maximum(u_lo, rt)
        q_neg = torch.minimum(u_hi, -rt)
        len_pos = (u_hi - p_pos).clamp(min=0)
        len_neg = (q_neg - u_lo).clamp(min=0)
        int_pos = torch.where(len_pos > 0, h_hi - _antiderivative(p_pos, eps), 0.0)
        int_neg = torch.where(len_neg > 0, _antiderivative(q_neg, eps) - h_lo, 0.0)
        return float((dens * (len_pos + len_neg)).sum()), float((dens * (int_pos + int_neg)).sum())

    total_w, total_s = above(-math.inf)
    top = math.log(float(torch.maximum(u_hi.abs(), u_lo.abs()).max()) + eps)
    if top < 0:
        return 0.0
    if total_s >= 0:
        return total_w
    hi, lo = 0.0, -1.0
    while above(lo)[1] >= 0:
        lo *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if above(mid)[1] >= 0:
            hi = mid
        else:
            lo = mid
    w_hi, s_hi = above(hi)
    w_lo, _ = above(lo)
    return w_hi + min(s_hi / abs(lo), w_lo - w_hi)


# --------------------------------------------------------------------------- public entry
def _sketch_sd(sk: SpectrumSketch, lr: float, eps: float, map: str, momentum: float) -> float:
    if sk.kind == "points":
        z, w = exponents_and_weights(sk.nodes, sk.weights, lr, eps, map, momentum)
        if sk.pooling == "quantile":
            return quantile_pooled_sd(z, w)
        return weighted_kaplan_yorke(z.reshape(-1), w.reshape(-1) / sk.num_groups)
    nodes = sk.nodes.reshape(-1)
    weights = sk.weights.reshape(-1) / sk.num_groups
    if sk.kind == "quantiles":
        num = int(sk.options.get("num_quantiles", 1000))
        q = equal_mass_quantiles(nodes, weights, num)
        z, w = exponents_and_weights(q, torch.full_like(q, sk.dim / num), lr, eps, map, momentum)
        return weighted_kaplan_yorke(z, w)
    if sk.kind == "histogram":
        edges, masses = _histogram_cells(nodes, weights, int(sk.options.get("bins", 200)))
    else:
        edges, masses, _ = _kde_cells(
            nodes, weights, sk.options.get("bandwidth"), int(sk.options.get("grid", 1500))
        )
    return _interval_sd(edges, masses, lr, eps, map, momentum)


def sd_from_spectrum(
    spectrum: Any,
    lr: float,
    *,
    eps: float = 0.0,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    uncertainty: bool = True,
) -> tuple[float, float]:
    """Sharpness dimension at learning rate ``lr`` from a stored spectrum, with no products.

    Args:
        spectrum: a :class:`SpectrumSketch`, a
            :class:`~sdopt.dimension.estimators.SharpnessDimensionEstimate` (its ``.spectrum``),
            or eigenvalues as a 1-D ``(d,)`` / 2-D ``(batches, d)`` tensor (exact spectra).
        lr: learning rate ``η > 0`` at which to evaluate (need not be the one estimated at).
        eps: ``ε ≥ 0`` inside the logarithm.
        exponent_map: ``"gd"`` (paper), ``"momentum"`` or ``"adam"``.
        momentum: heavy-ball ``β`` or Adam's ``β₁``.
        uncertainty: also compute the jackknife standard error over groups (minibatches or
            probes); ``False`` returns ``nan`` for it and is ``G + 1`` times cheaper.

    Returns:
        ``(value, standard_error)``.
    """
    lr = check_positive("lr", lr)
    eps = check_positive("eps", eps, allow_zero=True)
    check_choice("exponent_map", exponent_map, EXPONENT_MAPS)
    momentum = check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    sk = as_sketch(spectrum)
    value = _sketch_sd(sk, lr, eps, exponent_map, momentum)
    g = sk.num_groups
    if not uncertainty or g < 2:
        return value, math.nan
    loo = []
    for leave in range(g):
        rows = torch.tensor([i for i in range(g) if i != leave])
        loo.append(_sketch_sd(sk.subset(rows), lr, eps, exponent_map, momentum))
    loo_t = torch.tensor(loo, dtype=torch.float64)
    se = math.sqrt((g - 1) / g * float(((loo_t - loo_t.mean()) ** 2).sum()))
    return value, se


def as_sketch(spectrum: Any) -> SpectrumSketch:
    """Normalise the accepted spectrum inputs of :func:`sd_from_spectrum`."""
    if isinstance(spectrum, SpectrumSketch):
        return spectrum
    inner = getattr(spectrum, "spectrum", None)
    if isinstance(inner, SpectrumSketch):
        return inner
    from sdopt.dimension.kaplan_yorke import check_eigenvalues

    ev = check_eigenvalues(spectrum, "spectrum")
    if ev.ndim == 1:
        ev = ev[None, :]
    return SpectrumSketch(ev, torch.ones_like(ev), int(ev.shape[1]))


def check_kind(kind: str) -> str:
    return check_choice("kind", kind, KINDS)
