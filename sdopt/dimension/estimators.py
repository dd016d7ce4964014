"""Estimators of the sharpness dimension of a model at its current parameters.

Methods (Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at the Edge of Stability",
arXiv:2604.19740, §4 and THEORY.md §4, §7, §8):

* ``"deflated"`` (default; also what :class:`sdopt.SDOptimizer` records) — per curvature
  operator (one per minibatch, or one for the full batch) the top-``k`` and the bottom-
  ``k_bottom`` eigenpairs by warm-started thick-restart Lanczos, and the distribution of the
  other ``d − k − k_bottom`` eigenvalues by stochastic Lanczos quadrature on the deflated
  operator (``num_probes`` Rademacher probes × ``num_steps`` steps). The most expanding
  exponents (``α > edge/η`` and ``α < 0``) and the extremes that decide whether SD is 0 are then
  exact, and the bulk enters through its quadrature measure, which fixes the total
  ``T = Σ z`` and the near-zero exponents of both signs that decide ``d − SD`` (THEORY.md §7–§8).
  Its uncertainty is a jackknife over the probes (leave one probe out of every operator; the
  spread over minibatches is reported apart as ``batch_uncertainty``); ``low``/``high`` widen
  ``value ± 2σ`` to
  every value the exact extremes allow within their residual bounds, so an estimate whose
  plausible range straddles a jump of SD (0 against most of ``d``) says so.
* ``"exact"`` — dense Hessian of every minibatch, eigenvalues by ``eigvalsh``; the exponents of
  each batch sorted and averaged position by position (Def. 4.2). Costs ``d`` products per batch.
* ``"slq"``, ``"kde"``, ``"ps"`` — the paper's three: ``R`` stochastic Lanczos quadrature runs
  (one Rademacher probe and one minibatch each, ``m`` steps, full reorthogonalisation) give the
  measure ``ν = (d/R) Σ ω δ_α̃``; SD is read from its histogram (SD-SLQ), a Gaussian kernel
  density (SD-KDE) or ``M`` equal-mass quantiles (SD-PS).
* ``"topk"`` — both ends exact as in ``"deflated"``, but the bulk modelled as ``d − k −
  k_bottom`` equal eigenvalues at a Hutchinson estimate of its mean (one Lanczos step per
  probe). This is the model the first release's wrapper used; it cannot see the structure of
  the bulk (THEORY.md §8) and is kept as the cheap baseline the accuracy battery compares with.

Every result carries a :class:`~sdopt.dimension.sketch.SpectrumSketch`, from which
:func:`~sdopt.dimension.sketch.sd_from_spectrum` gives ``SD(η')`` for any other ``η'`` without
new products, and the decomposition of THEORY.md §8: ``n_edge`` (eigenvalues beyond the map's
edge, which a smaller learning rate would stabilise), ``n_neg`` (negative eigenvalues, which no
learning rate stabilises), ``T`` and ``j*``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sdopt._checks import check_choice, check_in_range, check_int, check_positive
from sdopt.dimension.exponents import (
    EXPONENT_MAPS,
    edge_of_stability,
    exponent_multiplicity,
    exponents_unchecked,
)
from sdopt.dimension.sketch import (
    SpectrumSketch,
    exponents_and_weights,
    quantile_pooled_sd,
    sd_from_spectrum,
)

__all__ = [
    "DEFAULTS",
    "DEFAULT_METHOD",
    "METHODS",
    "NonFiniteLossError",
    "SharpnessDimensionEstimate",
    "estimate_sharpness_dimension",
]

METHODS = ("deflated", "exact", "slq", "kde", "ps", "topk")
DEFAULT_METHOD = "deflated"
PROTOCOLS = ("minibatch", "full-batch")
#: Defaults of the ``"deflated"`` estimator, shared with :class:`sdopt.SDOptimizer` so that the
#: wrapper's record at defaults is this estimator at defaults (chosen on the accuracy battery,
#: see docs/sharpness-dimension.md#accuracy-battery).
DEFAULTS: dict[str, Any] = {"k": 8, "k_bottom": 4, "num_probes": 8, "num_steps": 40, "tol": 1e-2}
_PAPER_DEFAULTS = {"num_probes": 50, "num_steps": 80}
#: ``n_neg`` counts eigenvalues below ``−NEGATIVE_RESOLUTION · max|α|``. The count of all
#: negative eigenvalues is ill-posed when a cluster sits at 0 (on the digits MLP of THEORY.md
#: §8: 538 below 0, 373 below −1e-6·max|α|, 267 below −1e-2·max|α|), and such eigenvalues
#: barely expand (``z ≈ η|α|``); the quadrature resolves the count at this resolution.
NEGATIVE_RESOLUTION = 1e-2


class NonFiniteLossError(FloatingPointError):
    """The loss on the curvature data is NaN or infinite (no estimate is possible)."""


@dataclass(frozen=True)
class SharpnessDimensionEstimate:
    """One sharpness-dimension estimate with the pieces it was computed from and why SD is what
    it is.

    Attributes:
        value: the estimate of SD.
        uncertainty: its standard error as an estimate of the SD of the Hessians of ``data``:
            ``deflated``/``topk``: jackknife over the SLQ probes (leave one probe out of every
            operator); ``slq``/``kde``/``ps``: jackknife over probes; ``exact``: ``0``.
        method: ``"deflated"``, ``"exact"``, ``"slq"``, ``"kde"``, ``"ps"`` or ``"topk"``.
        lr: the learning rate the exponents used.
        protocol: ``"minibatch"`` (one Hessian per batch, exponents averaged position by
            position; the paper's) or ``"full-batch"`` (one Hessian of the mean loss).
        dim: number of parameters ``d``.
        num_products: Hessian-vector products used (``exact``: ``d`` per batch).
        seconds: wall-clock time.
        settings: the method's settings (``k``, ``num_probes``, ``num_steps``, …).
        spectrum: the stored spectrum, for :func:`sd_from_spectrum` at other learning rates.
        eigenvalues: exact eigenvalues used: ``(batches, d)`` for ``exact``; ``(batches, k +
            k_bottom)`` for ``deflated``/``topk`` (top decreasing, then bottom increasing);
            else ``None``.
        eigenvectors: the top-``k`` Ritz vectors of the last batch (``deflated``/``topk``),
            for warm starts.
        density: the :class:`~sdopt.spectrum.SpectralDensity` (``slq``/``kde``/``ps``: the
            pooled one; ``deflated``: the last batch's deflated one).
        trace: the estimate of ``tr H`` (mean over batches) implied by the spectrum.
        lambda_1: the largest (averaged) exponent, i.e. RDS sharpness ``log σ_1(I − ηH)``.
        exponent_map, momentum, eps: the exponent map used.
        low, high: the plausible range of SD (see the module docstring); ``low == high ==
            value`` only when nothing in the estimate is uncertain.
        n_edge: eigenvalues beyond the map's edge of stability, ``α > edge/η`` (mean over
            batches; fractional where the bulk quadrature contributes).
        n_neg: negative eigenvalues, counted below ``−NEGATIVE_RESOLUTION · max|α|`` (1 % of
            the spectral radius: the count of all negative eigenvalues is ill-posed when a
            cluster sits at 0), the same way.
        total_exponent: ``T = Σ_i z_i`` (mean over batches); ``T ≥ 0`` means ``SD = d``.
        j_star: ``⌊SD⌋``, the number of whole exponents in the leading block whose sum is
            ``≥ 0`` (``j*`` of Kaplan–Yorke).
        lambda_max, lambda_min: the largest and smallest eigenvalue found (mean over batches).
        loss: the mean loss on the curvature data.
        bottom_eigenvectors: the bottom-``k_bottom`` Ritz vectors of the last batch
            (``deflated``/``topk``), for warm starts.
        residuals: ``(batches, k + k_bottom)`` residual norms of the exact eigenvalues.
        batch_uncertainty: minibatch protocol with several batches: the jackknife over the
            minibatches, i.e. how much SD would move with another draw of batches (sampling
            variability of the paper's expectation over ``B``, not an error of the estimate);
            ``nan`` otherwise.
    """

    value: float
    uncertainty: float
    method: str
    lr: float
    protocol: str
    dim: int
    num_products: int
    seconds: float
    settings: dict[str, Any]
    spectrum: SpectrumSketch
    eigenvalues: torch.Tensor | None = None
    eigenvectors: torch.Tensor | None = None
    density: Any = None
    trace: float = math.nan
    lambda_1: float = math.nan
    exponent_map: str = "gd"
    momentum: float = 0.0
    eps: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    low: float = math.nan
    high: float = math.nan
    n_edge: float = math.nan
    n_neg: float = math.nan
    total_exponent: float = math.nan
    j_star: float = math.nan
    lambda_max: float = math.nan
    lambda_min: float = math.nan
    loss: float = math.nan
    bottom_eigenvectors: torch.Tensor | None = None
    residuals: torch.Tensor | None = None
    batch_uncertainty: float = math.nan

    def at_lr(self, lr: float) -> SharpnessDimensionEstimate:
        """The same estimate read at another learning rate (no new products): value,
        uncertainty, range and decomposition of the map with ``lr``."""
        lr = check_positive("lr", lr)
        reading = _readout(
            self.spectrum, self.extra.get("groups"), lr, self.eps, self.exponent_map,
            self.momentum,
        )  # fmt: skip
        return replace(self, lr=lr, **reading)

    def predict(self, lr: float, *, uncertainty: bool = False) -> tuple[float, float]:
        """``SD`` at another learning rate from the stored spectrum (no products)."""
        return sd_from_spectrum(
            self.spectrum, lr, eps=self.eps, exponent_map=self.exponent_map,
            momentum=self.momentum, uncertainty=uncertainty,
        )  # fmt: skip

    @property
    def codimension(self) -> float:
        """``d − SD``: what varies between runs when SD lands near ``d`` (THEORY.md §7)."""
        return self.dim - self.value

    @property
    def straddles_jump(self) -> bool:
        """Whether the plausible range reaches from below ``0.1·d`` to above ``0.9·d``."""
        return self.low <= 0.1 * self.dim and self.high >= 0.9 * self.dim

    def decomposition(self) -> dict[str, float]:
        """Why SD is what it is: ``n_edge``, ``n_neg``, ``T``, ``j*`` and the extremes."""
        return {
            "n_edge": self.n_edge,
            "n_neg": self.n_neg,
            "total_exponent": self.total_exponent,
            "j_star": self.j_star,
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
        }


def _operators(
    model: Any, loss_fn: Callable[..., Any], data: Any, protocol: str, preconditioner: Any,
    operator_options: dict[str, Any],
) -> list[Any]:  # fmt: skip
    from sdopt.curvature import HessianOperator, ModelLoss
    from sdopt.curvature.functional import normalize_batches, normalize_model_loss_batches

    if isinstance(loss_fn, ModelLoss):  # the batches go to fn(model, batch) as they are
        batches: list[Any] = [b for b, _ in normalize_model_loss_batches(data)]
    else:
        batches = normalize_batches(data)
    groups = [batches] if protocol == "full-batch" else [[b] for b in batches]
    ops = [HessianOperator(model, loss_fn, g, **operator_options) for g in groups]
    if preconditioner is not None:
        from sdopt.spectrum import preconditioned

        ops = [preconditioned(op, preconditioner) for op in ops]
    return ops


def _dense_hessians(
    model: Any, loss_fn: Callable[..., Any], data: Any, protocol: str, preconditioner: Any,
    operator_options: dict[str, Any], max_dim: int,
) -> list[torch.Tensor]:  # fmt: skip
    """Dense float64 Hessians per group from ``d`` products each (vectorised blocks)."""
    options = {"vectorize": True, "chunk_size": 64, **operator_options}
    ops = _operators(model, loss_fn, data, protocol, None, options)
    out = []
    for op in ops:
        h = op.to_dense(max_dim=max_dim).detach().to(torch.float64).cpu()
        h = 0.5 * (h + h.T)
        if preconditioner is not None:
            d = preconditioner.detach().to(torch.float64).cpu().rsqrt()
            h = d[:, None] * h * d[None, :]
        out.append(h)
    return out


def _products(ops: list[Any]) -> int:
    return int(sum(getattr(op, "num_products", 0) for op in ops))


def _merge(top: Any, bottom: Any) -> Any:
    from sdopt.spectrum import EigenResult

    if bottom is None:
        return top
    return EigenResult(
        eigenvalues=torch.cat([top.eigenvalues, bottom.eigenvalues]),
        eigenvectors=torch.cat([top.eigenvectors, bottom.eigenvectors], dim=1),
        residuals=torch.cat([top.residuals, bottom.residuals]),
        iterations=top.iterations + bottom.iterations,
        converged=top.converged and bottom.converged,
        num_products=top.num_products + bottom.num_products,
        which="LA",
    )


def _loss(op: Any) -> float:
    """The mean loss of a curvature operator (free on the default product mode's graph)."""
    source = op
    while not hasattr(source, "loss_and_gradient") and getattr(source, "source", None) is not None:
        source = source.source
    if not hasattr(source, "loss_and_gradient"):
        return math.nan
    loss = float(source.loss_and_gradient()[0])
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"the loss on the curvature data is {loss}")
    return loss


# --------------------------------------------------------------------------- deflated measure
@dataclass(frozen=True)
class _Group:
    """What one operator's measurement holds: exact ends and the bulk's quadrature per probe."""

    exact: torch.Tensor  # (k + k_bottom,) float64: top decreasing, then bottom increasing
    errors: torch.Tensor  # (k + k_bottom,) residual bounds |θ − α| <= r
    nodes: torch.Tensor  # (R, m) float64 Ritz values of the deflated operator
    weights: torch.Tensor  # (R, m) float64, rows summing to 1
    bulk_dim: int


def _group_rows(
    groups: list[_Group], probes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights ``(G, n)`` (rows summing to ``d``) of the deflated measure, the bulk
    averaged over ``probes`` (all by default)."""
    rows_n, rows_w = [], []
    for g in groups:
        nodes, weights = [g.exact], [torch.ones_like(g.exact)]
        if g.bulk_dim > 0:
            keep = list(range(g.nodes.shape[0])) if probes is None else probes
            bn, bw = g.nodes[keep], g.weights[keep]
            nodes.append(bn.reshape(-1))
            weights.append(bw.reshape(-1) * (g.bulk_dim / len(keep)))
        rows_n.append(torch.cat(nodes))
        rows_w.append(torch.cat(weights))
    width = max(r.numel() for r in rows_n)
    nodes = torch.zeros(len(groups), width, dtype=torch.float64)
    weights = torch.zeros(len(groups), width, dtype=torch.float64)
    for i, (n, w) in enumerate(zip(rows_n, rows_w)):
        nodes[i, : n.numel()], weights[i, : w.numel()] = n, w
    return nodes, weights


def _most_contracting(lr: float, map: str, momentum: float) -> float:
    """The eigenvalue at which the map contracts most (``1/η`` for GD)."""
    if map == "gd" or (map == "adam" and momentum == 0.0):
        return 1.0 / lr
    step = lr if map == "momentum" else lr * (1.0 - momentum)
    return (1.0 + momentum) / step  # centre of the heavy ball's complex band, modulus √β


def _shifted_exponents(
    z: torch.Tensor, groups: list[_Group], lr: float, eps: float, map: str, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponent arrays ``(G, mult·n)`` with every exact eigenvalue moved within its residual
    bound to where its exponents are smallest (first) and largest (second); the bulk as is.

    SD is non-decreasing in every exponent, so these two bracket what the exact ends allow."""
    low, high = z.clone(), z.clone()
    centre = _most_contracting(lr, map, momentum)
    width = z.shape[1] // exponent_multiplicity(map, momentum)
    for i, g in enumerate(groups):
        n = g.exact.numel()
        if n == 0:
            continue
        a, r = g.exact, g.errors
        inner = torch.minimum(torch.maximum(torch.full_like(a, centre), a - r), a + r)
        candidates = torch.stack([a - r, a, a + r, inner])
        zc = exponents_unchecked(candidates, lr, map=map, momentum=momentum, eps=eps)
        for block in range(exponent_multiplicity(map, momentum)):
            cols = slice(block * width, block * width + n)
            part = zc[:, block * n : (block + 1) * n]
            low[i, cols] = part.min(dim=0).values
            high[i, cols] = part.max(dim=0).values
    return low, high


def _jackknife(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    t = torch.tensor(values, dtype=torch.float64)
    return math.sqrt((n - 1) / n * float(((t - t.mean()) ** 2).sum()))


def _quadrature(a: float, b: float) -> float:
    parts = [x for x in (a, b) if math.isfinite(x)]
    return math.sqrt(sum(x * x for x in parts)) if parts else math.nan


def _decomposition(
    nodes: torch.Tensor, weights: torch.Tensor, z: torch.Tensor, zw: torch.Tensor, lr: float,
    map: str, momentum: float,
) -> dict[str, float]:  # fmt: skip
    """``n_edge``, ``n_neg``, ``T`` and the trace of a measure of ``G`` rows (mean over rows)."""
    edge = edge_of_stability(map, momentum) / lr
    live = weights > 0
    n_edge = float((weights * ((nodes > edge) & live)).sum(1).mean())
    radius = torch.where(live, nodes.abs(), torch.zeros_like(nodes)).amax(1, keepdim=True)
    negative = nodes < -NEGATIVE_RESOLUTION * radius
    n_neg = float((weights * (negative & live)).sum(1).mean())
    contrib = torch.where(zw > 0, zw * z, torch.zeros_like(z))
    total = float(contrib.sum(1).mean())
    trace = float((nodes * weights).sum(1).mean())
    return {"n_edge": n_edge, "n_neg": n_neg, "total_exponent": total, "trace": trace}


def _measure_deflated(
    ops: list[Any], k: int, k_bottom: int, num_probes: int, num_steps: int, tol: float,
    init: torch.Tensor | None, init_bottom: torch.Tensor | None, gen: torch.Generator,
    solver_options: dict[str, Any], allow_dense: bool = True,
) -> tuple[list[_Group], Any, Any, Any, int]:  # fmt: skip
    """Both ends and the deflated bulk of every operator (warm starts chained across them)."""
    from sdopt.spectrum import stochastic_lanczos_quadrature, top_eigenpairs

    groups: list[_Group] = []
    warm_top, warm_bottom = init, init_bottom
    density = top = bottom = None
    products = 0
    for op in ops:
        dim = int(op.dim)
        if allow_dense and dim <= k + k_bottom + num_probes * num_steps:
            # a tiny model: the whole spectrum costs fewer products than its ends and bulk
            top, bottom = _dense_ends(op, k)
            products += dim
            empty = torch.zeros(0, 0, dtype=torch.float64)
            exact = torch.cat([top.eigenvalues, bottom.eigenvalues]).to(torch.float64).cpu()
            groups.append(_Group(exact, torch.zeros_like(exact), empty, empty, 0))
            continue
        top = top_eigenpairs(
            op, k, which="LA", tol=tol, init=warm_top, generator=gen, **solver_options
        )
        warm_top = top.eigenvectors
        bottom = None
        if k_bottom > 0:
            bottom = top_eigenpairs(
                op, k_bottom, which="SA", tol=tol, init=warm_bottom, generator=gen,
                **solver_options,
            )  # fmt: skip
            warm_bottom = bottom.eigenvectors
        known = _merge(top, bottom)
        products += int(known.num_products)
        exact = known.eigenvalues.detach().to(torch.float64).cpu()
        errors = known.residuals.detach().to(torch.float64).cpu()
        bulk_dim = dim - exact.numel()
        if bulk_dim > 0:
            density = stochastic_lanczos_quadrature(
                op, num_probes, num_steps, generator=gen, deflate=known
            )
            products += int(density.num_products)
            nodes = density.nodes.to(torch.float64)
            weights = density.weights.to(torch.float64)
        else:
            nodes = weights = torch.zeros(0, 0, dtype=torch.float64)
        groups.append(_Group(exact, errors, nodes, weights, bulk_dim))
    return groups, density, top, bottom, products


def _dense_ends(op: Any, k: int) -> tuple[Any, Any]:
    """Every eigenpair of a small operator from ``d`` products, split as the top ``k``
    (decreasing) and the rest (increasing), as two exact :class:`EigenResult` objects."""
    from sdopt.spectrum import EigenResult

    dim = int(op.dim)
    eye = torch.eye(dim, dtype=op.dtype, device=op.device)
    # one column at a time: the products Lanczos would make (blocks are not cheaper everywhere)
    dense = torch.cat([op.matmat(eye[:, i : i + 1]) for i in range(dim)], dim=1)
    values, vectors = torch.linalg.eigh(0.5 * (dense + dense.T).to(torch.float64))
    vectors = vectors.to(op.dtype)
    k = min(k, dim)

    def result(vals: torch.Tensor, vecs: torch.Tensor, which: str, n: int) -> Any:
        return EigenResult(
            eigenvalues=vals, eigenvectors=vecs.contiguous(), residuals=torch.zeros_like(vals),
            iterations=0, converged=True, num_products=n, which=which,
        )  # fmt: skip

    top = result(values.flip(0)[:k], vectors.flip(1)[:, :k], "LA", dim)
    bottom = result(values[: dim - k], vectors[:, : dim - k], "SA", 0)
    return top, bottom


def estimate_sharpness_dimension(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    lr: float,
    method: str = DEFAULT_METHOD,
    *,
    protocol: str = "minibatch",
    k: int | None = None,
    k_bottom: int | None = None,
    num_probes: int | None = None,
    num_steps: int | None = None,
    bins: int = 200,
    bandwidth: float | None = None,
    num_quantiles: int = 1000,
    tol: float | None = None,
    max_dim: int = 4096,
    init: torch.Tensor | None = None,
    init_bottom: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    preconditioner: torch.Tensor | None = None,
    eps: float = 0.0,
    operator_options: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    allow_dense: bool = True,
) -> SharpnessDimensionEstimate:
    """Estimate the sharpness dimension of ``model`` at its current parameters.

    Args:
        model: the ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them (with
            ``protocol="minibatch"`` each is one minibatch Hessian).
        lr: learning rate ``η > 0`` of the map.
        method: ``"deflated"`` (default), ``"exact"``, ``"slq"``, ``"kde"``, ``"ps"`` or
            ``"topk"`` (module docstring).
        protocol: ``"minibatch"`` (default, the paper's) or ``"full-batch"``.
        k: top eigenpairs per batch (``deflated``/``topk``; default ``DEFAULTS["k"]`` = 8).
        k_bottom: bottom eigenpairs per batch (``deflated``/``topk``; default 4; ``0`` for
            none, which leaves the sign of the bottom to the quadrature).
        num_probes: SLQ probes: total for ``slq``/``kde``/``ps`` (default 50; the paper used
            500), per batch for ``deflated``/``topk`` (default 8, at least 2: the uncertainty
            is a jackknife over them).
        num_steps: Lanczos steps per probe (default 80 for ``slq``/``kde``/``ps``; 40 for
            ``deflated``; ``topk`` always uses 1, a Hutchinson sample of the bulk's mean).
        bins: histogram bins (``slq``).
        bandwidth: KDE bandwidth (``kde``; default 1 % of the node spread).
        num_quantiles: ``M`` (``ps``).
        tol: relative Lanczos tolerance of the exact ends (default ``1e-2``).
        max_dim: size guard of ``exact`` (dense ``d × d`` matrices).
        init: ``(d, j)`` cached top eigenvectors to warm-start the first batch's top-``k``
            Lanczos (e.g. ``previous.eigenvectors``).
        init_bottom: the same for the bottom end (``previous.bottom_eigenvectors``).
        generator: random source for probes and start vectors (the global RNG is untouched).
        exponent_map: ``"gd"`` (paper), ``"momentum"`` (heavy ball) or ``"adam"`` (with
            ``preconditioner``); see :mod:`sdopt.dimension.exponents`.
        momentum: heavy-ball ``β`` or Adam's ``β₁``.
        preconditioner: ``(d,)`` positive diagonal ``P`` (e.g. :func:`adam_preconditioner`):
            the spectrum of ``P^{-1/2} H P^{-1/2}`` is used; ``P = inf`` freezes a coordinate.
        eps: ``ε ≥ 0`` inside the logarithm.
        operator_options: keyword arguments for :class:`sdopt.HessianOperator` (e.g. ``mode``,
            ``dropout``).
        solver_options: keyword arguments for :func:`sdopt.top_eigenpairs` (``max_iters``,
            ``max_basis``, ``init_noise``, ``criterion``).
        allow_dense: ``deflated``/``topk``: when ``d`` is at most the products the method would
            spend (``k + k_bottom + num_probes·num_steps``), form the whole spectrum from ``d``
            products instead (exact, and cheaper); ``False`` always takes the stochastic route.

    Returns:
        :class:`SharpnessDimensionEstimate`.

    Raises:
        ValueError: for invalid arguments, or ``method="exact"`` with ``d > max_dim``.
        NonFiniteLossError: the loss on the curvature data is NaN or infinite.
    """
    start = time.perf_counter()
    lr = check_positive("lr", lr)
    check_choice("method", method, METHODS)
    check_choice("protocol", protocol, PROTOCOLS)
    check_choice("exponent_map", exponent_map, EXPONENT_MAPS)
    momentum = check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    eps = check_positive("eps", eps, allow_zero=True)
    k_default, k_bottom_default = k is None, k_bottom is None
    k = check_int("k", DEFAULTS["k"] if k is None else k, minimum=1)
    k_bottom = check_int(
        "k_bottom", DEFAULTS["k_bottom"] if k_bottom is None else k_bottom, minimum=0
    )
    tol = check_positive("tol", DEFAULTS["tol"] if tol is None else tol)
    bins = check_int("bins", bins, minimum=1)
    num_quantiles = check_int("num_quantiles", num_quantiles, minimum=1)
    max_dim = check_int("max_dim", max_dim, minimum=1)
    if bandwidth is not None:
        bandwidth = check_positive("bandwidth", bandwidth)
    if exponent_map == "gd" and momentum > 0:
        raise ValueError(
            f"Invalid momentum: {momentum!r} (the 'gd' map has no momentum; use "
            "exponent_map='momentum')"
        )
    if exponent_map == "adam" and preconditioner is None:
        raise ValueError(
            "Invalid preconditioner: None (exponent_map='adam' needs Adam's preconditioner, "
            "see adam_preconditioner)"
        )
    if solver_options is not None and not isinstance(solver_options, dict):
        raise ValueError(f"Invalid solver_options: {solver_options!r} (must be a dict)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
    paper = method in ("slq", "kde", "ps")
    if paper:
        default_probes, default_steps, least = (*_PAPER_DEFAULTS.values(), 1)
    else:
        default_probes, default_steps, least = DEFAULTS["num_probes"], DEFAULTS["num_steps"], 2
    num_probes = check_int(
        "num_probes", default_probes if num_probes is None else num_probes, minimum=least
    )
    num_steps = check_int("num_steps", default_steps if num_steps is None else num_steps, minimum=1)
    if method == "topk":
        num_steps = 1
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    ops = _operators(model, loss_fn, data, protocol, preconditioner, dict(operator_options or {}))
    dim = int(ops[0].dim)
    loss = sum(_loss(op) for op in ops) / len(ops)
    settings: dict[str, Any] = {"protocol": protocol, "num_batches": len(ops)}
    out: dict[str, Any] = {}

    groups = None
    if method == "exact":
        if dim > max_dim:
            raise ValueError(
                f"Invalid method: 'exact' (needs dense {dim} × {dim} Hessians, d = {dim} > "
                f"max_dim = {max_dim}; use method='deflated' or raise max_dim deliberately)"
            )
        dense = _dense_hessians(
            model, loss_fn, data, protocol, preconditioner, dict(operator_options or {}), max_dim
        )
        last, vectors = torch.linalg.eigh(dense[-1])  # the last one's ends, for warm starts
        eigenvalues = torch.stack([torch.linalg.eigvalsh(h) for h in dense[:-1]] + [last])
        sketch = SpectrumSketch(eigenvalues, torch.ones_like(eigenvalues), dim)
        dtype = ops[0].dtype
        out.update(eigenvectors=vectors[:, -min(k, dim) :].flip(1).to(dtype))
        if k_bottom > 0:
            out.update(bottom_eigenvectors=vectors[:, : min(k_bottom, dim)].to(dtype))
        out.update(eigenvalues=eigenvalues, num_products=dim * len(ops))
        out.update(lambda_max=float(eigenvalues[:, -1].mean()))
        out.update(lambda_min=float(eigenvalues[:, 0].mean()))
    elif paper:
        from sdopt.spectrum import stochastic_lanczos_quadrature

        order = torch.randperm(len(ops), generator=gen).tolist()
        density = stochastic_lanczos_quadrature(
            lambda r: ops[order[r % len(ops)]], num_probes, num_steps, generator=gen
        )
        kind = {"slq": "histogram", "kde": "kde", "ps": "quantiles"}[method]
        options = {"bins": bins, "bandwidth": bandwidth, "num_quantiles": num_quantiles}
        sketch = SpectrumSketch(
            density.nodes.to(torch.float64), density.weights.to(torch.float64) * dim, dim,
            kind, "mixture", options,
        )  # fmt: skip
        live = sketch.weights > 0
        top_nodes = torch.where(live, sketch.nodes, -math.inf).max(1).values
        bottom_nodes = torch.where(live, sketch.nodes, math.inf).min(1).values
        out.update(density=density, num_products=int(density.num_products))
        out.update(lambda_max=float(top_nodes.mean()), lambda_min=float(bottom_nodes.mean()))
        settings.update(num_probes=num_probes, num_steps=num_steps)
        settings.update({"slq": {"bins": bins}, "kde": {"bandwidth": bandwidth},
                         "ps": {"num_quantiles": num_quantiles}}[method])  # fmt: skip
    else:
        if k_default:  # defaults on a tiny model: as many exact eigenpairs as there are
            k = min(k, dim)
        if k_bottom_default:
            k_bottom = min(k_bottom, dim - k)
        if k + k_bottom > dim:
            name, value = ("k", k) if k > dim or k_bottom_default else ("k_bottom", k_bottom)
            raise ValueError(
                f"Invalid {name}: {value} (k + k_bottom = {k} + {k_bottom} = {k + k_bottom} "
                f"must be <= d = {dim})"
            )
        groups, density, top, bottom, products = _measure_deflated(
            ops, k, k_bottom, num_probes, num_steps, tol, init, init_bottom, gen,
            dict(solver_options or {}), allow_dense,
        )  # fmt: skip
        sketch = SpectrumSketch(*_group_rows(groups), dim)
        exact = torch.stack([g.exact for g in groups])
        out.update(eigenvalues=exact, num_products=max(products, _products(ops)))
        out.update(density=density, eigenvectors=top.eigenvectors.detach())
        out.update(residuals=torch.stack([g.errors for g in groups]))
        live = sketch.weights > 0
        out.update(lambda_max=float(exact[:, 0].mean()))
        out.update(lambda_min=float(torch.where(live, sketch.nodes, math.inf).min(1).values.mean()))
        if bottom is not None and bottom.k > 0:
            out.update(bottom_eigenvectors=bottom.eigenvectors.detach())
        converged = bool(top.converged and (bottom is None or bottom.converged))
        settings.update(k=k, k_bottom=k_bottom, num_probes=num_probes, num_steps=num_steps,
                        tol=tol, converged=converged,
                        dense=all(g.bulk_dim == 0 and not g.errors.any() for g in groups))  # fmt: skip

    reading = _readout(sketch, groups, lr, eps, exponent_map, momentum)
    return SharpnessDimensionEstimate(
        method=method, lr=lr, protocol=protocol, dim=dim,
        num_products=int(out.pop("num_products")), seconds=time.perf_counter() - start,
        settings=settings, spectrum=sketch, exponent_map=exponent_map, momentum=momentum,
        eps=eps, loss=loss, extra={"groups": groups} if groups is not None else {},
        **reading, **out,
    )  # fmt: skip


def _readout(
    sketch: SpectrumSketch, groups: list[_Group] | None, lr: float, eps: float, map: str,
    momentum: float,
) -> dict[str, Any]:  # fmt: skip
    """Everything an estimate reads off its measurement at learning rate ``lr`` (no products):
    the value, its uncertainty and plausible range, the decomposition and ``λ_1``."""
    dim = sketch.dim
    z, zw = exponents_and_weights(sketch.nodes, sketch.weights, lr, eps, map, momentum)
    if groups is None:  # exact spectra, or the paper's pooled SLQ measures
        exact = sketch.kind == "points" and sketch.pooling == "quantile"
        value, uncertainty = sd_from_spectrum(
            sketch, lr, eps=eps, exponent_map=map, momentum=momentum, uncertainty=not exact
        )
        if exact:  # nothing about these batches is uncertain (their spread: batch_se below)
            uncertainty = 0.0
        low, high = value - 2 * uncertainty, value + 2 * uncertainty
    else:
        value = quantile_pooled_sd(z, zw)
        # uncertainty: leave one probe out of every operator, and one operator out
        num_probes = max(g.nodes.shape[0] for g in groups)
        probe_se = math.nan
        if any(g.bulk_dim > 0 for g in groups) and num_probes > 1:
            loo = []
            for r in range(num_probes):
                n_r, w_r = _group_rows(groups, [i for i in range(num_probes) if i != r])
                loo.append(
                    quantile_pooled_sd(*exponents_and_weights(n_r, w_r, lr, eps, map, momentum))
                )
            probe_se = _jackknife(loo)
        uncertainty = probe_se
        if not math.isfinite(uncertainty):
            uncertainty = 0.0  # every eigenvalue exact (k + k_bottom = d, one operator)
        z_low, z_high = _shifted_exponents(z, groups, lr, eps, map, momentum)
        low = min(value - 2 * uncertainty, quantile_pooled_sd(z_low, zw))
        high = max(value + 2 * uncertainty, quantile_pooled_sd(z_high, zw))
    batch_se = math.nan  # how much SD moves with the choice of minibatches (not an error)
    if sketch.pooling == "quantile" and sketch.num_groups > 1:
        rest = [[j for j in range(sketch.num_groups) if j != i] for i in range(sketch.num_groups)]
        batch_se = _jackknife([quantile_pooled_sd(z[r], zw[r]) for r in rest])
    parts = _decomposition(sketch.nodes, sketch.weights, z, zw, lr, map, momentum)
    lambda_1 = float(torch.where(zw > 0, z, -math.inf).max(dim=1).values.mean())
    return {
        "value": float(value),
        "uncertainty": float(uncertainty),
        "low": min(max(float(low), 0.0), float(dim)),
        "high": min(max(float(high), 0.0), float(dim)),
        "j_star": float(math.floor(value)),
        "lambda_1": lambda_1,
        "batch_uncertainty": batch_se,
        **parts,
    }
