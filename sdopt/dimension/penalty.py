"""The sharpness-dimension surrogate as a training penalty, and its two-gradient estimator.

The surrogate ``S_τ`` of :mod:`sdopt.dimension.surrogate` is a function of the exact Hessian
eigenvalues ``α_i`` at both ends of the spectrum (top-``k`` and bottom-``k_bottom``) and of a bulk
measure (nodes and weights from stochastic Lanczos quadrature on the deflated Hessian, no
gradient). With Ritz vectors ``v_i`` held fixed (detached), the Rayleigh quotients
``α_i(θ) = v_iᵀ H(θ) v_i`` carry the gradient to the parameters,
``∂α_i/∂θ = ∇_θ(v_iᵀ H(θ) v_i) = D³L(θ)[v_i, v_i, ·]`` (exact at an eigenvector of a simple
eigenvalue; Hellmann–Feynman).

* :func:`sharpness_dimension_penalty` builds ``S_τ(α(θ))`` with a graph through double backward
  (exact; memory of a third-order graph; ``k + k_bottom`` double-backward passes).
* :func:`penalty_gradient` estimates ``∇_θ S_τ = Σ_i w_i D³L[v_i, v_i, ·]`` (``w_i = ∂S/∂α_i``)
  at the price of two extra gradients per sign of the weights (THEORY.md §7): with random signs
  ``s_i``, ``u = Σ_i s_i √|w_i| v_i`` satisfies ``E_s D³L[u, u, ·] = Σ_i |w_i| D³L[v_i, v_i, ·]``,
  and ``D³L[u, u, ·] ≈ (∇L(θ + hu) + ∇L(θ − hu) − 2∇L(θ))/h²``. The weights have both signs
  (``w_i > 0`` for ``α_i > 1/η``, ``< 0`` below), so the positive and negative ones get one
  direction each and the second is subtracted.

What the penalty pushes (descent on ``S_τ``): every exact eigenvalue whose exponent lies above
the crossing — the top ones beyond the edge down, negative and near-zero ones up — toward
``1/η``; where it is flat: below the edge with a PSD Hessian (SD = 0), when saturated (total
exponent ``≥ 0``, SD = d), and along the bulk (module docstring of
:mod:`sdopt.dimension.surrogate`).

The project's own steering idea (not in Tuci, Korkmaz, Şimşekli, Birdal, arXiv:2604.19740,
whose Def. 4.2 defines the sharpness dimension the surrogate smooths).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sdopt._checks import check_int, check_positive
from sdopt.dimension.surrogate import (
    smooth_sharpness_dimension,
    surrogate_temperature,
    surrogate_weights,
)

__all__ = ["penalty_gradient", "rayleigh_quotients", "sharpness_dimension_penalty"]


def _trainable(f: Any) -> tuple[torch.Tensor, ...]:
    named = dict(f.model.named_parameters())
    return tuple(named[n] for n in f.names)


def rayleigh_quotients(f: Any, vectors: torch.Tensor) -> torch.Tensor:
    """``α_i(θ) = v_iᵀ H(θ) v_i`` for the columns of ``vectors`` (detached), differentiable in
    the model's parameters (third-order graph via double backward).

    Args:
        f: a :class:`sdopt.curvature.FunctionalLoss`.
        vectors: ``(dim, k)``.

    Returns:
        ``(k,)`` tensor with a graph to the model's trainable parameters.
    """
    params = _trainable(f)
    vecs = vectors.detach().to(dtype=f.dtype, device=f.device)
    _, grad = f.value_and_gradient(params, create_graph=True)
    out = []
    for i in range(vecs.shape[1]):
        v = vecs[:, i]
        hv = torch.autograd.grad((grad * v).sum(), params, create_graph=True, allow_unused=True,
                                 materialize_grads=True)  # fmt: skip
        out.append((f.flatten(hv) * v).sum())
    return torch.stack(out)


def _both_ends_and_bulk(
    op: Any, k: int, k_bottom: int, eigenvectors: torch.Tensor | None,
    generator: torch.Generator | None, num_probes: int, num_steps: int, tol: float,
) -> tuple[Any, torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """Top-``k`` and bottom-``k_bottom`` eigenpairs, and the deflated SLQ bulk measure: the
    estimators' own measurement (:func:`sdopt.dimension.estimators._measure_deflated`)."""
    from sdopt.dimension.estimators import _measure_deflated, _merge
    from sdopt.spectrum.lanczos import default_generator

    warm_top = warm_bottom = None
    if eigenvectors is not None:
        warm = eigenvectors.detach()
        warm_top = warm[:, :k]
        if k_bottom > 0 and warm.shape[1] > k:
            warm_bottom = warm[:, k : k + k_bottom]
    groups, _, top, bottom, products = _measure_deflated(
        [op], k, k_bottom, max(num_probes, 1), num_steps, tol, warm_top, warm_bottom,
        default_generator(generator), {}, allow_dense=False,
    )  # fmt: skip
    known = _merge(top, bottom)
    g = groups[0]
    if g.bulk_dim > 0 and num_probes > 0:
        nodes = g.nodes.reshape(-1)
        weights = g.weights.reshape(-1) * (g.bulk_dim / g.nodes.shape[0])
        keep = weights > 0
        nodes, weights = nodes[keep], weights[keep]
    elif g.bulk_dim > 0:  # no probes: the bulk as eigenvalue 0 (neutral exponents)
        nodes = torch.zeros(1, dtype=torch.float64)
        weights = torch.full((1,), float(g.bulk_dim), dtype=torch.float64)
    else:
        nodes = weights = torch.zeros(0, dtype=torch.float64)
    return known, nodes, weights, products


def sharpness_dimension_penalty(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    lr: float,
    *,
    k: int = 8,
    k_bottom: int = 2,
    temperature: float | None = None,
    eigenvectors: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    preconditioner: torch.Tensor | None = None,
    eps: float = 0.0,
    num_probes: int = 2,
    num_steps: int = 30,
    tol: float = 1e-3,
    return_info: bool = False,
) -> Any:
    """Differentiable surrogate ``S_τ`` of the sharpness dimension of the current parameters.

    The top-``k`` and bottom-``k_bottom`` eigenpairs of the Hessian of the mean loss over
    ``data`` are found by Lanczos (warm-started from ``eigenvectors``); the other
    ``d − k − k_bottom`` eigenvalues enter as the bulk measure of stochastic Lanczos quadrature
    on the deflated Hessian (``num_probes × num_steps`` products; nodes with weights, no
    gradient), the same machinery as the estimators. The returned scalar is
    :func:`~sdopt.dimension.smooth_sharpness_dimension` (Tuci et al., arXiv:2604.19740,
    Def. 4.2, smoothed) of the Rayleigh quotients ``v_iᵀ H(θ) v_i`` with the Ritz vectors
    detached, so ``penalty.backward()`` fills ``p.grad`` of the trainable parameters with
    ``∂S_τ/∂θ = Σ_i (∂S_τ/∂α_i) D³L[v_i, v_i, ·]``. Descent on it moves every exact eigenvalue
    whose exponent is above the crossing toward ``1/η`` (top ones down, negative ones up).

    Args:
        model: the ``nn.Module``; its trainable parameters receive the gradient.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them.
        lr: learning rate ``η > 0`` of the map.
        k: number of top eigenpairs (``1 ≤ k ≤ d``).
        k_bottom: number of bottom eigenpairs (``≥ 0``; lowered to ``d − k`` if larger), which
            resolve negative curvature (THEORY.md §8).
        temperature: surrogate temperature ``τ > 0``, or ``None`` (default) for the rule of
            :func:`~sdopt.dimension.surrogate.surrogate_temperature` (bias ``≤ 1 %`` of
            ``min(SD, d − SD)``).
        eigenvectors: ``(d, j)`` cached Ritz vectors for a warm start: the first ``k`` columns
            start the top run, columns ``k … k + k_bottom − 1`` (if present, e.g.
            ``info["eigenvectors"]``) the bottom run.
        generator: random source for Lanczos and SLQ probes.
        exponent_map: ``"gd"``, ``"momentum"`` or ``"adam"`` (with ``preconditioner``).
        momentum: heavy-ball ``β`` or Adam's ``β₁``.
        preconditioner: ``(d,)`` positive diagonal ``P`` for ``"adam"``: the spectrum of
            ``P^{-1/2} H P^{-1/2}`` is used and the Rayleigh quotients are taken along
            ``P^{-1/2} v_i``.
        eps: ``ε ≥ 0`` inside the logarithm.
        num_probes: SLQ probes for the bulk (0: the bulk as ``d − k − k_bottom`` eigenvalues
            at 0, neutral exponents).
        num_steps: Lanczos steps per SLQ probe.
        tol: Lanczos tolerance.
        return_info: also return a dict with ``eigenvalues`` (top decreasing, then bottom
            increasing), ``eigenvectors`` (the matching ``(d, k + k_bottom)`` Ritz vectors),
            ``directions`` (the vectors differentiated along), ``bulk_nodes``,
            ``bulk_weights``, ``bulk_dim``, ``bulk_trace`` (``Σ`` nodes × weights),
            ``temperature`` (the ``τ`` used), ``k``, ``k_bottom`` and ``num_products``.

    Returns:
        0-d tensor (or ``(tensor, info)``).

    Raises:
        ValueError: for invalid ``lr``, ``k``, ``k_bottom``, ``temperature``, ``num_probes``,
            ``num_steps``, or ``exponent_map="adam"`` without ``preconditioner``.
    """
    lr = check_positive("lr", lr)
    k = check_int("k", k, minimum=1)
    k_bottom = check_int("k_bottom", k_bottom, minimum=0)
    if temperature is not None:
        check_positive("temperature", temperature)
    num_probes = check_int("num_probes", num_probes, minimum=0)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    if exponent_map == "adam" and preconditioner is None:
        raise ValueError(
            "Invalid preconditioner: None (exponent_map='adam' needs Adam's preconditioner, "
            "see adam_preconditioner)"
        )
    from sdopt.curvature import HessianOperator, make_functional_loss

    op = HessianOperator(model, loss_fn, data)
    if k > op.dim:
        raise ValueError(f"Invalid k: {k} (must be <= the number of parameters {op.dim})")
    k_bottom = min(k_bottom, op.dim - k)
    scale = None
    if preconditioner is not None:
        from sdopt.spectrum import preconditioned

        op = preconditioned(op, preconditioner)
        scale = preconditioner.detach().to(torch.float64).rsqrt()
    known, bulk_nodes, bulk_weights, products = _both_ends_and_bulk(
        op, k, k_bottom, eigenvectors, generator, num_probes, num_steps, tol
    )
    vecs = known.eigenvectors.detach()
    directions = vecs if scale is None else scale.to(vecs)[:, None] * vecs
    f = make_functional_loss(model, loss_fn, data)
    alphas = rayleigh_quotients(f, directions).to(torch.float64)
    options = dict(
        bulk_nodes=bulk_nodes, bulk_weights=bulk_weights, exponent_map=exponent_map,
        momentum=momentum, eps=eps,
    )  # fmt: skip
    tau = temperature
    if tau is None:
        tau = surrogate_temperature(alphas.detach(), lr, **options)
    value = smooth_sharpness_dimension(alphas, lr, temperature=tau, **options)
    if not return_info:
        return value
    info = {
        "eigenvalues": known.eigenvalues.detach(),
        "eigenvectors": vecs,
        "directions": directions,
        "bulk_nodes": bulk_nodes,
        "bulk_weights": bulk_weights,
        "bulk_dim": op.dim - known.k,
        "bulk_trace": float((bulk_nodes * bulk_weights).sum()),
        "temperature": float(tau),
        "k": k,
        "k_bottom": k_bottom,
        "num_products": products,
    }
    return value, info


def penalty_gradient(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    lr: float,
    *,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    temperature: float | None = None,
    bulk_nodes: torch.Tensor | None = None,
    bulk_weights: torch.Tensor | None = None,
    exponent_map: str = "gd",
    momentum: float = 0.0,
    eps: float = 0.0,
    bulk_dim: float = 0.0,
    bulk_trace: float = 0.0,
    weights: torch.Tensor | None = None,
    gradient: torch.Tensor | None = None,
    step: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Unbiased random-sign estimate of ``∇_θ S_τ`` from two extra gradients per sign (THEORY §7).

    ``w_i = ∂S_τ/∂α_i`` at ``eigenvalues`` (:func:`~sdopt.dimension.surrogate_weights` with the
    bulk measure; Tuci et al., arXiv:2604.19740, Def. 4.2, smoothed), or the given ``weights``;
    ``u_± = Σ_{±w_i > 0} s_i √|w_i| v_i`` with independent random signs ``s_i``; each non-zero
    direction costs two gradients:
    ``D³L[u, u, ·] ≈ ‖u‖² (∇L(θ + hû) + ∇L(θ − hû) − 2∇L(θ))/h²``, ``û = u/‖u‖``, plus ``∇L(θ)``
    once (unless ``gradient`` is given). The estimate ``D³L[u₊, u₊, ·] − D³L[u₋, u₋, ·]`` has
    expectation ``Σ_i w_i D³L[v_i, v_i, ·]`` over the signs (up to the ``O(h²)`` difference
    error). The model is never modified (gradients at perturbed copies of the parameters).

    Args:
        model: the ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them.
        lr: learning rate of the map in the surrogate.
        eigenvalues: ``(k,)`` exact eigenvalues (e.g. top-``k`` then bottom-``k_bottom``).
        eigenvectors: ``(d, k)`` the directions ``v_i`` matching them (Ritz vectors; for
            ``"adam"`` the directions ``P^{-1/2} v_i``); need not be orthonormal.
        temperature: surrogate temperature ``τ``, or ``None`` (default rule).
        bulk_nodes: bulk eigenvalue nodes (deflated SLQ Ritz values; no gradient).
        bulk_weights: their weights (summing to ``d − k``).
        exponent_map: ``"gd"``, ``"momentum"`` or ``"adam"``.
        momentum: heavy-ball ``β`` or Adam's ``β₁``.
        eps: ``ε ≥ 0`` inside the logarithm.
        bulk_dim: trace-only bulk model (backward compatibility; see
            :func:`~sdopt.dimension.smooth_sharpness_dimension`).
        bulk_trace: its trace.
        weights: ``(k,)`` weights to use instead of ``∂S_τ/∂α_i``.
        gradient: ``∇L(θ)`` if already known (saves one gradient).
        step: difference step ``h`` (default ``ε_mach^{1/4}·max(1, ‖θ‖/√d)``).
        generator: random source of the signs.

    Returns:
        flat ``(d,)`` tensor in the parameters' dtype.

    Raises:
        ValueError: for invalid ``lr``, ``step``, or shapes of ``eigenvectors``/``weights``.
    """
    lr = check_positive("lr", lr)
    from sdopt.curvature import make_functional_loss

    f = make_functional_loss(model, loss_fn, data)
    vecs = eigenvectors.detach().to(dtype=torch.float64, device=f.device)
    if vecs.ndim != 2 or vecs.shape[0] != f.dim:
        raise ValueError(
            f"Invalid eigenvectors: shape {tuple(eigenvectors.shape)} (must be ({f.dim}, k))"
        )
    if weights is None:
        _, w = surrogate_weights(
            eigenvalues, lr, temperature=temperature, bulk_nodes=bulk_nodes,
            bulk_weights=bulk_weights, exponent_map=exponent_map, momentum=momentum, eps=eps,
            bulk_dim=bulk_dim, bulk_trace=bulk_trace,
        )  # fmt: skip
    else:
        w = weights.detach().to(torch.float64)
    w = w.cpu()
    if w.shape != (vecs.shape[1],):
        raise ValueError(
            f"Invalid weights: shape {tuple(w.shape)} (must be ({vecs.shape[1]},), one per vector)"
        )
    theta = f.flatten(f.params).detach()
    if step is None:
        scale = max(1.0, float(theta.double().norm()) / math.sqrt(f.dim))
        step = torch.finfo(f.dtype).eps ** 0.25 * scale
    step = check_positive("step", step)
    signs = 2.0 * torch.randint(0, 2, (vecs.shape[1],), generator=generator).double() - 1.0
    base = gradient.detach().to(f.dtype) if gradient is not None else None
    total = torch.zeros(f.dim, dtype=torch.float64, device=f.device)
    for sign, mask in ((1.0, w > 0), (-1.0, w < 0)):
        if not bool(mask.any()):
            continue
        coef = (signs[mask] * w[mask].abs().sqrt()).to(f.device)
        u = vecs[:, mask.to(f.device)] @ coef
        norm = float(u.norm())
        if norm == 0:
            continue
        if base is None:
            base = f.value_and_gradient()[1]
        uh = (u / norm).to(f.dtype)
        plus = f.value_and_gradient(tuple(f.unflatten(theta + step * uh)))[1]
        minus = f.value_and_gradient(tuple(f.unflatten(theta - step * uh)))[1]
        d3 = (plus.double() + minus.double() - 2 * base.double()) / step**2
        total += sign * norm**2 * d3
    return total.to(f.dtype)
