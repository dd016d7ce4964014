"""Estimators of the sharpness dimension of a model at its current parameters.

Methods (Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at the Edge of Stability",
arXiv:2604.19740, §4 and THEORY.md §4, §7):

* ``"exact"`` — dense Hessian of every minibatch, eigenvalues by ``eigvalsh``; the exponents of
  each batch sorted and averaged position by position (Def. 4.2). Costs ``d`` products per batch.
* ``"slq"``, ``"kde"``, ``"ps"`` — the paper's three: ``R`` stochastic Lanczos quadrature runs
  (one Rademacher probe and one minibatch each, ``m`` steps, full reorthogonalisation) give the
  measure ``ν = (d/R) Σ ω δ_α̃``; SD is read from its histogram (SD-SLQ), a Gaussian kernel
  density (SD-KDE) or ``M`` equal-mass quantiles (SD-PS).
* ``"topk"`` — the project's: per minibatch the exact top-``k`` and bottom-``k_bottom``
  eigenpairs (warm-started Lanczos) plus the rest of the spectrum from SLQ on the deflated
  Hessian; the per-batch measures are averaged position by position as in ``"exact"``. The most
  expanding exponents (``α > 2/η`` or ``α < 0``) and the most contracting ones (``α`` near
  ``1/η``) are then exact, and the bulk enters through its quadrature, which fixes the total
  ``T = log|det(I − ηH)|``; THEORY.md §7's "cheap exact route" ``SD = d − m* + (T − R_{m*})/|z_(m*)|``
  is what this reading computes when the crossing falls among the exact exponents.

Every result carries a :class:`~sdopt.dimension.sketch.SpectrumSketch`, from which
:func:`~sdopt.dimension.sketch.sd_from_spectrum` gives ``SD(η')`` for any other ``η'`` without
new products.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdopt._checks import check_choice, check_in_range, check_int, check_positive
from sdopt.dimension.exponents import EXPONENT_MAPS, exponents_unchecked
from sdopt.dimension.sketch import SpectrumSketch, sd_from_spectrum

__all__ = ["METHODS", "SharpnessDimensionEstimate", "estimate_sharpness_dimension"]

METHODS = ("exact", "slq", "kde", "ps", "topk")
PROTOCOLS = ("minibatch", "full-batch")


@dataclass(frozen=True)
class SharpnessDimensionEstimate:
    """One sharpness-dimension estimate with the pieces it was computed from.

    Attributes:
        value: the estimate of SD.
        uncertainty: jackknife standard error across minibatches (``exact``, ``topk``) or
            probes (``slq``, ``kde``, ``ps``); ``nan`` with a single group.
        method: ``"exact"``, ``"slq"``, ``"kde"``, ``"ps"`` or ``"topk"``.
        lr: the learning rate the exponents used.
        protocol: ``"minibatch"`` (one Hessian per batch, exponents averaged position by
            position; the paper's) or ``"full-batch"`` (one Hessian of the mean loss).
        dim: number of parameters ``d``.
        num_products: Hessian-vector products used (``exact``: ``d`` per batch).
        seconds: wall-clock time.
        settings: the method's settings (``k``, ``num_probes``, ``num_steps``, …).
        spectrum: the stored spectrum, for :func:`sd_from_spectrum` at other learning rates.
        eigenvalues: exact eigenvalues used: ``(batches, d)`` for ``exact``; ``(batches, k +
            k_bottom)`` for ``topk`` (top decreasing, then bottom increasing); else ``None``.
        eigenvectors: the top-``k`` Ritz vectors of the last batch (``topk``), for warm starts.
        density: the :class:`~sdopt.spectrum.SpectralDensity` (``slq``/``kde``/``ps``: the
            pooled one; ``topk``: the last batch's deflated one).
        trace: the estimate of ``tr H`` (mean over batches) implied by the spectrum.
        lambda_1: the largest (averaged) exponent, i.e. RDS sharpness ``log σ_1(I − ηH)``.
        exponent_map, momentum, eps: the exponent map used.
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


def _operators(
    model: Any, loss_fn: Callable[..., Any], data: Any, protocol: str, preconditioner: Any,
    operator_options: dict[str, Any],
) -> list[Any]:  # fmt: skip
    from sdopt.curvature import HessianOperator
    from sdopt.curvature.functional import normalize_batches

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


def estimate_sharpness_dimension(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    lr: float,
    method: str = "topk",
    *,
    protocol: str = "minibatch",
    k: int = 20,
    k_bottom: int = 2,
    num_probes: int | None = None,
    num_steps: int | None = None,
    bins: int = 200,
    bandwidth: float | None = None,
    num_quantiles: int = 1000,
    tol: float = 1e-3,
    max_dim: int = 4096,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    preconditioner: torch.Tensor | None = None,
    eps: float = 0.0,
    operator_options: dict[str, Any] | None = None,
) -> SharpnessDimensionEstimate:
    """Estimate the sharpness dimension of ``model`` at its current parameters.

    Args:
        model: the ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them (with
            ``protocol="minibatch"`` each is one minibatch Hessian).
        lr: learning rate ``η > 0`` of the map.
        method: ``"exact"``, ``"slq"``, ``"kde"``, ``"ps"`` or ``"topk"`` (module docstring).
        protocol: ``"minibatch"`` (default, the paper's) or ``"full-batch"``.
        k: top eigenpairs per batch (``topk``).
        k_bottom: bottom eigenpairs per batch (``topk``; ``0`` for none).
        num_probes: SLQ probes: total for ``slq``/``kde``/``ps`` (default 50; the paper used
            500), per batch for ``topk`` (default 2).
        num_steps: Lanczos steps per probe (default 80 for ``slq``/``kde``/``ps``; 30 for
            ``topk``).
        bins: histogram bins (``slq``).
        bandwidth: KDE bandwidth (``kde``; default 1 % of the node spread).
        num_quantiles: ``M`` (``ps``).
        tol: Lanczos tolerance (``topk``).
        max_dim: size guard of ``exact`` (dense ``d × d`` matrices).
        init: ``(d, j)`` cached eigenvectors to warm-start the first batch's top-``k`` Lanczos.
        generator: random source for probes and start vectors (the global RNG is untouched).
        exponent_map: ``"gd"`` (paper), ``"momentum"`` (heavy ball) or ``"adam"`` (with
            ``preconditioner``); see :mod:`sdopt.dimension.exponents`.
        momentum: heavy-ball ``β`` or Adam's ``β₁``.
        preconditioner: ``(d,)`` positive diagonal ``P`` (e.g. :func:`adam_preconditioner`):
            the spectrum of ``P^{-1/2} H P^{-1/2}`` is used.
        eps: ``ε ≥ 0`` inside the logarithm.
        operator_options: keyword arguments for :class:`sdopt.HessianOperator` (e.g. ``mode``).

    Returns:
        :class:`SharpnessDimensionEstimate`.

    Raises:
        ValueError: for invalid arguments, or ``method="exact"`` with ``d > max_dim``.
    """
    start = time.perf_counter()
    lr = check_positive("lr", lr)
    check_choice("method", method, METHODS)
    check_choice("protocol", protocol, PROTOCOLS)
    check_choice("exponent_map", exponent_map, EXPONENT_MAPS)
    momentum = check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    eps = check_positive("eps", eps, allow_zero=True)
    k = check_int("k", k, minimum=1)
    k_bottom = check_int("k_bottom", k_bottom, minimum=0)
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
    paper = method in ("slq", "kde", "ps")
    num_probes = check_int(
        "num_probes", num_probes if num_probes is not None else (50 if paper else 2),
        minimum=1 if paper else 0,
    )  # fmt: skip
    num_steps = check_int(
        "num_steps", num_steps if num_steps is not None else (80 if paper else 30), minimum=1
    )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    ops = _operators(model, loss_fn, data, protocol, preconditioner, dict(operator_options or {}))
    dim = int(ops[0].dim)
    settings: dict[str, Any] = {"protocol": protocol, "num_batches": len(ops)}
    eigenvalues = eigenvectors = density = None
    products = 0

    if method == "exact":
        if dim > max_dim:
            raise ValueError(
                f"Invalid method: 'exact' (needs dense {dim} × {dim} Hessians, d = {dim} > "
                f"max_dim = {max_dim}; use method='topk' or raise max_dim deliberately)"
            )
        dense = _dense_hessians(
            model, loss_fn, data, protocol, preconditioner, dict(operator_options or {}), max_dim
        )
        rows = [torch.linalg.eigvalsh(h) for h in dense]
        eigenvalues = torch.stack(rows)
        products = dim * len(ops)
        sketch = SpectrumSketch(eigenvalues, torch.ones_like(eigenvalues), dim)
    elif paper:
        from sdopt.spectrum import stochastic_lanczos_quadrature

        order = torch.randperm(len(ops), generator=gen).tolist()
        density = stochastic_lanczos_quadrature(
            lambda r: ops[order[r % len(ops)]], num_probes, num_steps, generator=gen
        )
        products = int(density.num_products)
        kind = {"slq": "histogram", "kde": "kde", "ps": "quantiles"}[method]
        options = {"bins": bins, "bandwidth": bandwidth, "num_quantiles": num_quantiles}
        sketch = SpectrumSketch(
            density.nodes.to(torch.float64), density.weights.to(torch.float64) * dim, dim,
            kind, "mixture", options,
        )  # fmt: skip
        settings.update(num_probes=num_probes, num_steps=num_steps)
        settings.update({"slq": {"bins": bins}, "kde": {"bandwidth": bandwidth},
                         "ps": {"num_quantiles": num_quantiles}}[method])  # fmt: skip
    else:
        from sdopt.spectrum import stochastic_lanczos_quadrature, top_eigenpairs

        if k + k_bottom > dim:
            raise ValueError(f"Invalid k: {k} (k + k_bottom must be <= d = {dim})")
        warm = init
        node_rows, weight_rows, exact_rows = [], [], []
        for op in ops:
            top = top_eigenpairs(op, k, which="LA", tol=tol, init=warm, generator=gen)
            warm = top.eigenvectors
            bottom = None
            if k_bottom > 0:
                bottom = top_eigenpairs(op, k_bottom, which="SA", tol=tol, generator=gen)
            known = _merge(top, bottom)
            products += int(known.num_products)
            exact = known.eigenvalues.detach().to(torch.float64).cpu()
            exact_rows.append(exact)
            bulk_dim = dim - exact.numel()
            if bulk_dim > 0 and num_probes > 0:
                density = stochastic_lanczos_quadrature(
                    op, num_probes, num_steps, generator=gen, deflate=known
                )
                products += int(density.num_products)
                bn = density.nodes.reshape(-1).to(torch.float64)
                bw = density.weights.reshape(-1).to(torch.float64) * (bulk_dim / num_probes)
            elif bulk_dim > 0:  # no probes: the bulk as eigenvalue 0 (neutral exponents)
                bn = torch.zeros(1, dtype=torch.float64)
                bw = torch.full((1,), float(bulk_dim), dtype=torch.float64)
            else:
                bn = bw = torch.zeros(0, dtype=torch.float64)
            node_rows.append(torch.cat([exact, bn]))
            weight_rows.append(torch.cat([torch.ones_like(exact), bw]))
        width = max(r.numel() for r in node_rows)
        nodes = torch.zeros(len(ops), width, dtype=torch.float64)
        weights = torch.zeros(len(ops), width, dtype=torch.float64)
        for i, (n, w) in enumerate(zip(node_rows, weight_rows)):
            nodes[i, : n.numel()], weights[i, : w.numel()] = n, w
        sketch = SpectrumSketch(nodes, weights, dim)
        eigenvalues = torch.stack(exact_rows)
        eigenvectors = warm.detach() if warm is not None else None
        settings.update(k=k, k_bottom=k_bottom, num_probes=num_probes, num_steps=num_steps,
                        tol=tol)  # fmt: skip

    value, uncertainty = sd_from_spectrum(
        sketch, lr, eps=eps, exponent_map=exponent_map, momentum=momentum
    )
    trace = float((sketch.nodes * sketch.weights).sum(1).mean())
    z = exponents_unchecked(sketch.nodes, lr, map=exponent_map, momentum=momentum, eps=eps)
    mask = torch.cat([sketch.weights > 0] * (z.shape[1] // sketch.nodes.shape[1]), dim=1)
    lambda_1 = float(torch.where(mask, z, -math.inf).max(dim=1).values.mean())
    products = max(products, _products(ops)) if method != "exact" else products
    return SharpnessDimensionEstimate(
        value=value, uncertainty=uncertainty, method=method, lr=lr, protocol=protocol, dim=dim,
        num_products=products, seconds=time.perf_counter() - start, settings=settings,
        spectrum=sketch, eigenvalues=eigenvalues, eigenvectors=eigenvectors, density=density,
        trace=trace, lambda_1=lambda_1, exponent_map=exponent_map, momentum=momentum, eps=eps,
    )  # fmt: skip
