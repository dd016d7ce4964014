"""The sharpness-dimension surrogate as a training penalty, and its two-gradient estimator.

The surrogate ``S_τ`` of :mod:`sdopt.dimension.surrogate` is a function of the leading Hessian
eigenvalues ``α_i``. With Ritz vectors ``v_i`` held fixed (detached), the Rayleigh quotients
``α_i(θ) = v_iᵀ H(θ) v_i`` carry the gradient to the parameters,
``∂α_i/∂θ = ∇_θ(v_iᵀ H(θ) v_i) = D³L(θ)[v_i, v_i, ·]`` (exact at an eigenvector; Hellmann–Feynman).

* :func:`sharpness_dimension_penalty` builds ``S_τ(α(θ))`` with a graph through double backward
  (exact; memory of a third-order graph; ``k`` double-backward passes).
* :func:`penalty_gradient` estimates ``∇_θ S_τ = Σ_i w_i D³L[v_i, v_i, ·]`` (``w_i = ∂S/∂α_i``)
  at the price of two extra gradients per sign of the weights (THEORY.md §7): with random signs
  ``s_i``, ``u = Σ_i s_i √w_i v_i`` satisfies ``E_s D³L[u, u, ·] = Σ_i w_i D³L[v_i, v_i, ·]``, and
  ``D³L[u, u, ·] ≈ (∇L(θ + hu) + ∇L(θ − hu) − 2∇L(θ))/h²``. Negative weights use a second
  direction built from ``√|w_i|`` and are subtracted.

The project's own steering idea (not in Tuci, Korkmaz, Şimşekli, Birdal, arXiv:2604.19740).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sdopt._checks import check_int, check_positive
from sdopt.dimension.surrogate import smooth_sharpness_dimension, surrogate_weights

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


def _top_and_bulk(
    model: Any, loss_fn: Callable[..., Any], data: Any, k: int, eigenvectors: Any,
    generator: torch.Generator | None, num_probes: int, tol: float,
) -> tuple[Any, float, int, int]:  # fmt: skip
    from sdopt.curvature import HessianOperator
    from sdopt.spectrum import hutchinson_trace, top_eigenpairs

    op = HessianOperator(model, loss_fn, data)
    if k > op.dim:
        raise ValueError(f"Invalid k: {k} (must be <= the number of parameters {op.dim})")
    top = top_eigenpairs(op, k, which="LA", tol=tol, init=eigenvectors, generator=generator)
    bulk_dim = op.dim - k
    bulk_trace = 0.0
    products = top.num_products
    if bulk_dim > 0 and num_probes > 0:
        tr = hutchinson_trace(op, num_probes, generator=generator)
        bulk_trace = float(tr.value) - float(top.eigenvalues.sum())
        products += tr.num_products
    return top, bulk_trace, bulk_dim, products


def sharpness_dimension_penalty(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    lr: float,
    *,
    k: int = 8,
    temperature: float = 0.05,
    eigenvectors: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = 0.0,
    num_probes: int = 8,
    tol: float = 1e-3,
    return_info: bool = False,
) -> Any:
    """Differentiable surrogate ``S_τ`` of the sharpness dimension of the current parameters.

    The top-``k`` eigenpairs of the Hessian of the mean loss over ``data`` are found by Lanczos
    (warm-started from ``eigenvectors``); the remaining ``d − k`` eigenvalues enter as a bulk of
    their mean, from a Hutchinson trace (``num_probes`` products; no gradient flows through the
    bulk). The returned scalar is :func:`~sdopt.dimension.smooth_sharpness_dimension` of the
    Rayleigh quotients ``v_iᵀ H(θ) v_i`` with the Ritz vectors detached, so
    ``penalty.backward()`` fills ``p.grad`` of the trainable parameters with ``∂S_τ/∂θ``.

    Args:
        model: the ``nn.Module``; its trainable parameters receive the gradient.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them.
        lr: learning rate ``η > 0`` of the GD map.
        k: number of leading eigenpairs (``1 ≤ k ≤ d``).
        temperature: surrogate temperature ``τ > 0``.
        eigenvectors: ``(d, j)`` cached Ritz vectors for a warm start.
        generator: random source for Lanczos and Hutchinson probes.
        eps: ``ε ≥ 0`` inside the logarithm.
        num_probes: Hutchinson probes for the bulk trace (0: bulk trace 0).
        tol: Lanczos tolerance.
        return_info: also return a dict with ``eigenvalues``, ``eigenvectors``,
            ``bulk_trace``, ``bulk_dim`` and ``num_products`` (for warm starts and logging).

    Returns:
        0-d tensor (or ``(tensor, info)``).
    """
    lr = check_positive("lr", lr)
    k = check_int("k", k, minimum=1)
    check_positive("temperature", temperature)
    num_probes = check_int("num_probes", num_probes, minimum=0)
    from sdopt.curvature import make_functional_loss

    top, bulk_trace, bulk_dim, products = _top_and_bulk(
        model, loss_fn, data, k, eigenvectors, generator, num_probes, tol
    )
    f = make_functional_loss(model, loss_fn, data)
    alphas = rayleigh_quotients(f, top.eigenvectors)
    value = smooth_sharpness_dimension(
        alphas.to(torch.float64), lr, temperature=temperature, bulk_dim=float(bulk_dim),
        bulk_trace=bulk_trace, eps=eps,
    )  # fmt: skip
    if not return_info:
        return value
    info = {
        "eigenvalues": top.eigenvalues.detach(),
        "eigenvectors": top.eigenvectors.detach(),
        "bulk_trace": bulk_trace,
        "bulk_dim": bulk_dim,
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
    temperature: float = 0.05,
    bulk_dim: float = 0.0,
    bulk_trace: float = 0.0,
    eps: float = 0.0,
    weights: torch.Tensor | None = None,
    gradient: torch.Tensor | None = None,
    step: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Unbiased random-sign estimate of ``∇_θ S_τ`` from two extra gradients (THEORY.md §7).

    ``w_i = ∂S_τ/∂α_i`` at ``eigenvalues`` (or the given ``weights``); ``u_± = Σ_{±w_i > 0}
    s_i √|w_i| v_i`` with independent random signs ``s_i``; each non-zero direction costs two
    gradients: ``D³L[u, u, ·] ≈ ‖u‖² (∇L(θ + hû) + ∇L(θ − hû) − 2∇L(θ))/h²``, ``û = u/‖u‖``.
    The estimate ``D³L[u₊, u₊, ·] − D³L[u₋, u₋, ·]`` has expectation
    ``Σ_i w_i D³L[v_i, v_i, ·]`` over the signs (up to the ``O(h²)`` difference error).
    The model is never modified (gradients at perturbed copies of the parameters).

    Args:
        model: the ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them.
        lr: learning rate of the GD map in the surrogate.
        eigenvalues: ``(k,)`` Ritz values.
        eigenvectors: ``(d, k)`` Ritz vectors (orthonormal columns).
        temperature: surrogate temperature ``τ``.
        bulk_dim: bulk size (see :func:`~sdopt.dimension.smooth_sharpness_dimension`).
        bulk_trace: bulk trace.
        eps: ``ε ≥ 0`` inside the logarithm.
        weights: ``(k,)`` weights to use instead of ``∂S_τ/∂α_i``.
        gradient: ``∇L(θ)`` if already known (saves one gradient).
        step: difference step ``h`` (default ``ε_mach^{1/4}·max(1, ‖θ‖/√d)``).
        generator: random source of the signs.

    Returns:
        flat ``(d,)`` tensor in the parameters' dtype.
    """
    lr = check_positive("lr", lr)
    from sdopt.curvature import make_functional_loss

    f = make_functional_loss(model, loss_fn, data)
    vecs = eigenvectors.detach().to(torch.float64)
    if vecs.ndim != 2 or vecs.shape[0] != f.dim:
        raise ValueError(
            f"Invalid eigenvectors: shape {tuple(eigenvectors.shape)} (must be ({f.dim}, k))"
        )
    if weights is None:
        _, w = surrogate_weights(
            eigenvalues, lr, temperature=temperature, bulk_dim=bulk_dim, bulk_trace=bulk_trace,
            eps=eps,
        )  # fmt: skip
    else:
        w = weights.detach().to(torch.float64)
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
    total = torch.zeros(f.dim, dtype=torch.float64)
    for sign, mask in ((1.0, w > 0), (-1.0, w < 0)):
        if not bool(mask.any()):
            continue
        u = vecs[:, mask] @ (signs[mask] * w[mask].abs().sqrt())
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
