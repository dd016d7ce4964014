"""A differentiable surrogate of the sharpness dimension and its gradient in the parameters.

The sharpness dimension (Tuci, Korkmaz, Şimşekli, Birdal, arXiv:2604.19740, Def. 4.2) is a
piecewise function of the Lyapunov exponents. It has a sort-free form: with ``(x)_+ = max(x, 0)``
and exponents ``z_i`` of weights ``w_i`` (``Σ w_i = d``),

    SD = min( d, inf_{t<0} F(t) ),     F(t) = Σ_i w_i (z_i − t)_+ / (−t),

because the sum of the ``x`` largest exponents is ``min_t [t·x + Σ_i w_i (z_i − t)_+]`` (the
piecewise-linear partial sums of Kaplan–Yorke) and SD is the largest ``x`` where it is ``≥ 0``.
At the minimiser ``t* = λ_{j*+1}`` this is ``j* + S_{j*}/|λ_{j*+1}|`` exactly.

The surrogate replaces ``(x)_+`` by ``τ·softplus(x/τ)`` (temperature ``τ > 0``, in exponent
units) and keeps the exact minimum over ``t``, found by bisection on the monotone function
``h(t) = N(t) + (−t)N'(t)`` (``F`` is quasi-convex, ``N(t) = Σ w_i τ softplus((z_i − t)/τ)``).
By the envelope theorem the gradient is ``∂S/∂z_i = w_i σ((z_i − t*)/τ)/(−t*)``, smooth and
``≥ 0``; ``0 ≤ S_τ − SD ≤ τ·d·log 2/|t*|`` so ``S_τ → SD`` as ``τ → 0``. The exponents are
``z = ½ log((1 − ηα)² + ε²)`` (equal to ``log|1 − ηα|`` at ``ε = 0``, smooth for ``ε > 0``).

What it rewards: ``∂S/∂α`` pushes eigenvalues beyond the edge of stability (``α > 2/η``) and
negative ones back into ``(0, 2/η)``, and pushes the contracting outliers toward ``α = 1/η``
(strongest contraction). What it cannot see: below the edge of stability (every ``α`` in
``(0, 2/η)``) SD is 0 and the surrogate is ``O(τ)`` with vanishing gradient; it only sees the
eigenvalues passed in (the leading ones) plus a bulk summary whose gradient is not propagated.
Minimising it can also be achieved by shrinking ``η``; that is not the point of the penalty.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sdopt._checks import check_positive

__all__ = ["smooth_sharpness_dimension", "surrogate_weights"]

_BISECTION_STEPS = 200


def _smooth_exponents(alpha: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    u = 1.0 - lr * alpha
    if eps == 0.0:
        return torch.log(torch.abs(u))
    return 0.5 * torch.log(u * u + eps * eps)


def _optimal_threshold(z: torch.Tensor, w: torch.Tensor, tau: float) -> float | None:
    """The minimiser ``t* < 0`` of ``F_τ``, or ``None`` when the infimum is at ``t → −∞``."""
    z = z.detach()
    w = w.detach()
    finite = torch.isfinite(z)

    def h(t: float) -> float:
        x = (z - t) / tau
        n = torch.where(finite, w * tau * F.softplus(x), torch.zeros_like(z)).sum()
        dn = -torch.where(finite, w * torch.sigmoid(x), torch.zeros_like(z)).sum()
        return float(n + (-t) * dn)

    # h is increasing in t, h(0-) = N(0) > 0; h(-inf) -> Σ w z (+ softplus slack)
    lo = -1.0
    while h(lo) > 0:
        lo *= 2.0
        if lo < -1e12:
            return None
    hi = 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        if h(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def smooth_sharpness_dimension(
    eigenvalues: torch.Tensor,
    lr: float,
    *,
    temperature: float,
    weights: torch.Tensor | None = None,
    bulk_dim: float = 0.0,
    bulk_trace: float | torch.Tensor = 0.0,
    eps: float = 0.0,
) -> torch.Tensor:
    """Smooth sharpness dimension ``S_τ``, differentiable in ``eigenvalues`` (and ``bulk_trace``).

    ``S_τ = min_{t<0} Σ_i w_i τ softplus((z_i − t)/τ)/(−t)`` with ``z_i = ½log((1−ηα_i)² + ε²)``;
    tends to :func:`~sdopt.dimension.sharpness_dimension` of the same spectrum as ``τ → 0``
    (see the module docstring for the derivation and what it rewards).

    Args:
        eigenvalues: 1-D tensor of (leading) Hessian eigenvalues ``α_i``.
        lr: learning rate ``η > 0``.
        temperature: ``τ > 0`` in exponent units (e.g. ``0.01``–``0.1``).
        weights: optional multiplicities ``w_i ≥ 0`` (e.g. SLQ node weights); default ones.
        bulk_dim: number of further eigenvalues summarised by their mean (``≥ 0``).
        bulk_trace: their sum (the trace of the bulk); the bulk enters as ``bulk_dim``
            eigenvalues equal to ``bulk_trace / bulk_dim``.
        eps: ``ε ≥ 0`` inside the logarithm.

    Returns:
        0-d tensor in ``[0, Σw + bulk_dim]``, with a graph back to ``eigenvalues``.

    Raises:
        ValueError: for invalid ``lr``, ``temperature``, ``eps``, ``bulk_dim``, shapes or
            non-finite eigenvalues.
    """
    lr = check_positive("lr", lr)
    tau = check_positive("temperature", temperature)
    eps = check_positive("eps", eps, allow_zero=True)
    bulk_dim = check_positive("bulk_dim", bulk_dim, allow_zero=True)
    if not isinstance(eigenvalues, torch.Tensor):
        eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if eigenvalues.ndim != 1 or eigenvalues.numel() == 0:
        raise ValueError(
            f"Invalid eigenvalues: shape {tuple(eigenvalues.shape)} (must be 1-D and non-empty)"
        )
    if not torch.isfinite(eigenvalues.detach()).all():
        raise ValueError("Invalid eigenvalues: contains NaN or inf (must be finite)")
    alpha = eigenvalues
    if weights is None:
        w = torch.ones_like(alpha)
    else:
        w = torch.as_tensor(weights).to(alpha)
        if w.shape != alpha.shape or not bool((w.detach() >= 0).all()):
            raise ValueError(
                f"Invalid weights: shape {tuple(w.shape)} (must match eigenvalues "
                f"{tuple(alpha.shape)} and be >= 0)"
            )
    if bulk_dim > 0:
        bt = torch.as_tensor(bulk_trace).to(alpha)
        alpha = torch.cat([alpha, (bt / bulk_dim).reshape(1)])
        w = torch.cat([w, w.new_tensor([bulk_dim])])
    z = _smooth_exponents(alpha, lr, eps)
    total = w.sum()
    t = _optimal_threshold(z, w, tau)
    if t is None:  # saturated at d (total exponent >= 0): constant, zero gradient, graph kept
        return total.detach() + 0.0 * alpha.sum()
    x = (z - t) / tau
    safe = torch.where(torch.isfinite(z), x, torch.zeros_like(x))
    n = torch.where(torch.isfinite(z), w * tau * F.softplus(safe), torch.zeros_like(z)).sum()
    value = n / (-t)
    return torch.minimum(value, total.detach())


def surrogate_weights(
    eigenvalues: torch.Tensor, lr: float, *, temperature: float, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate value and ``∂S_τ/∂α_i`` for detached eigenvalues (no graph kept)."""
    alpha = eigenvalues.detach().to(torch.float64).clone().requires_grad_(True)
    with torch.enable_grad():
        value = smooth_sharpness_dimension(alpha, lr, temperature=temperature, **kwargs)
        (grad,) = torch.autograd.grad(value, alpha, allow_unused=True, materialize_grads=True)
    return value.detach(), grad
