"""Kaplan–Yorke (Lyapunov) dimension and the sharpness dimension of the gradient-descent map.

Implements Definitions 4.1 and 4.2 of Tuci, Korkmaz, Şimşekli and Birdal, "Generalization at the
Edge of Stability" (arXiv:2604.19740): with Lyapunov exponents sorted decreasingly
``λ_1 ≥ … ≥ λ_d`` and partial sums ``S_j = λ_1 + … + λ_j``,

    j* = max{ j : S_j ≥ 0 }                       (j* = 0 if λ_1 < 0)
    SD = 0                        if λ_1 < 0
    SD = j* + S_{j*} / |λ_{j*+1}|  if 1 ≤ j* < d
    SD = d                        if j* = d

For gradient descent with learning rate ``η`` the exponents are ``z(α) = log(|1 − ηα| + ε)`` of
the Hessian eigenvalues ``α``; with minibatch Hessians they are sorted per batch and averaged
position by position (the paper's experimental protocol).

Besides the exact formula this module holds the *weighted* form used by the estimators: a measure
``Σ_r w_r δ_{z_r}`` of exponents with weights (multiplicities) ``w_r > 0`` is read as the
decreasing rearrangement ``Z(x)`` on ``[0, Σ w_r]`` and

    SD = sup{ x : ∫_0^x Z(s) ds ≥ 0 },

which is exactly the Kaplan–Yorke number when every weight is 1 (the integral of a step function
is the piecewise-linear interpolation of the partial sums).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sdopt._checks import check_positive

__all__ = [
    "as_float64",
    "kaplan_yorke_dimension",
    "sharpness_dimension",
    "weighted_kaplan_yorke",
]


def as_float64(values: Any, name: str) -> torch.Tensor:
    """Convert a tensor, array, list or scalar sequence to a detached CPU float64 tensor.

    Complex input is rejected, never cast: the Hessian is symmetric, so its eigenvalues are
    real (use ``torch.linalg.eigvalsh``), and dropping imaginary parts would silently change
    the exponents.
    """
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise ValueError(
                f"Invalid {name}: a tensor of dtype {values.dtype} (must be real; the "
                "eigenvalues of a symmetric matrix are real: use torch.linalg.eigvalsh, or "
                ".real if the imaginary parts are zero)"
            )
        out = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            array = np.asarray(values)
            complex_input = np.iscomplexobj(array)
            if not complex_input:
                out = torch.as_tensor(array.astype(np.float64))
        except (TypeError, ValueError):
            raise ValueError(
                f"Invalid {name}: {values!r} (must be a tensor, array or list of real numbers)"
            ) from None
        if complex_input:
            raise ValueError(
                f"Invalid {name}: complex values of dtype {array.dtype} (must be real; the "
                "eigenvalues of a symmetric matrix are real: use numpy.linalg.eigvalsh, or "
                ".real if the imaginary parts are zero)"
            )
    return out


def _check_exponents(z: torch.Tensor, name: str) -> None:
    if z.numel() == 0:
        raise ValueError(f"Invalid {name}: empty (need at least one exponent)")
    if torch.isnan(z).any():
        raise ValueError(f"Invalid {name}: contains NaN")
    if torch.isposinf(z).any():
        raise ValueError(f"Invalid {name}: contains +inf (exponents must be < +inf)")


def kaplan_yorke_dimension(exponents: Any) -> float:
    """Kaplan–Yorke dimension of Lyapunov exponents given in any order.

    Args:
        exponents: 1-D tensor, array or list of exponents. ``-inf`` is allowed (a direction
            contracted to a point, e.g. ``α = 1/η`` with ``ε = 0``); NaN and ``+inf`` are not.

    Returns:
        ``SD ∈ [0, d]`` by THEORY.md §2: ``j* + S_{j*} / |λ_{j*+1}|``.

    Raises:
        ValueError: if ``exponents`` is not 1-D, is empty, or contains NaN or ``+inf``.

    Example:
        >>> round(kaplan_yorke_dimension([0.693, 0.0, -0.010, -0.693]), 3)
        3.986
    """
    z = as_float64(exponents, "exponents")
    if z.ndim != 1:
        raise ValueError(f"Invalid exponents: shape {tuple(z.shape)} (must be 1-D)")
    _check_exponents(z, "exponents")
    return _kaplan_yorke_sorted(torch.sort(z, descending=True).values)


def _kaplan_yorke_sorted(z: torch.Tensor) -> float:
    """Kaplan–Yorke number of exponents already sorted decreasingly (float64, no checks)."""
    d = z.numel()
    if z[0] < 0:
        return 0.0
    partial = torch.cumsum(z, 0)  # -inf propagates; no +inf by the checks
    nonneg = torch.nonzero(partial >= 0).flatten()
    j = int(nonneg[-1]) + 1  # number of exponents in the non-negative partial sum
    if j == d:
        return float(d)
    nxt = float(z[j])
    if math.isinf(nxt):
        return float(j)
    return float(j + float(partial[j - 1]) / abs(nxt))


def weighted_kaplan_yorke(exponents: torch.Tensor, weights: torch.Tensor) -> float:
    """Kaplan–Yorke number of a weighted measure of exponents ``Σ_r w_r δ_{z_r}``.

    Each exponent ``z_r`` occupies a block of width ``w_r`` in the decreasing rearrangement;
    the result is the largest ``x`` at which the running integral is still ``≥ 0``:
    ``SD = W_j + S_j / |z_{j+1}|`` with ``W_j``, ``S_j`` the cumulative weight and weighted sum
    of the ``j`` largest exponents. With unit weights this is :func:`kaplan_yorke_dimension`.

    Args:
        exponents: 1-D float64 tensor (``-inf`` allowed).
        weights: 1-D tensor of non-negative weights, same length; zero weights are ignored.

    Returns:
        A float in ``[0, Σ w]``.

    Raises:
        ValueError: ``exponents`` or ``weights`` are not 1-D real arrays of the same length,
            ``weights`` contain a negative, NaN or infinite entry or no positive one, or an
            exponent with positive weight is NaN or ``+inf``.
    """
    z = as_float64(exponents, "exponents")
    w = as_float64(weights, "weights")
    if z.ndim != 1:
        raise ValueError(f"Invalid exponents: shape {tuple(z.shape)} (must be 1-D)")
    if w.shape != z.shape:
        raise ValueError(
            f"Invalid weights: shape {tuple(w.shape)} (must match exponents, {tuple(z.shape)})"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("Invalid weights: contains a negative, NaN or infinite weight")
    if not bool((w > 0).any()):
        raise ValueError("Invalid weights: no positive weight (need at least one)")
    return weighted_kaplan_yorke_unchecked(z, w)


def weighted_kaplan_yorke_unchecked(z: torch.Tensor, w: torch.Tensor) -> float:
    """:func:`weighted_kaplan_yorke` on float64 tensors without argument checks (hot loops)."""
    z = z.to(torch.float64)
    w = w.to(torch.float64)
    keep = w > 0
    z, w = z[keep], w[keep]
    _check_exponents(z, "exponents")
    order = torch.argsort(z, descending=True)
    z, w = z[order], w[order]
    total_w = float(w.sum())
    if z[0] < 0:
        return 0.0
    contrib = torch.where(torch.isinf(z), z, w * z)  # -inf * w stays -inf
    partial = torch.cumsum(contrib, 0)
    nonneg = torch.nonzero(partial >= 0).flatten()
    j = int(nonneg[-1]) + 1
    if j == z.numel():
        return total_w
    cum_w = float(w[:j].sum())
    nxt = float(z[j])
    if math.isinf(nxt):
        return cum_w
    frac = min(float(partial[j - 1]) / abs(nxt), float(w[j]))
    return cum_w + frac


def gd_exponents(eigenvalues: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """``log(|1 − ηα| + ε)`` elementwise, float64."""
    return torch.log(torch.abs(1.0 - lr * eigenvalues) + eps)


def check_eigenvalues(values: Any, name: str = "eigenvalues") -> torch.Tensor:
    """Finite 1-D or 2-D float64 eigenvalues (shape ``(d,)`` or ``(batches, d)``)."""
    ev = as_float64(values, name)
    if ev.ndim not in (1, 2):
        raise ValueError(
            f"Invalid {name}: shape {tuple(ev.shape)} (must be 1-D (d,) or 2-D (batches, d))"
        )
    if ev.numel() == 0:
        raise ValueError(f"Invalid {name}: empty (need at least one eigenvalue)")
    if not torch.isfinite(ev).all():
        raise ValueError(f"Invalid {name}: contains NaN or inf (must be finite)")
    return ev


def averaged_sorted_exponents(z: torch.Tensor) -> torch.Tensor:
    """Sort each row decreasingly and average position by position (rows = minibatches)."""
    if z.ndim == 1:
        return torch.sort(z, descending=True).values
    return torch.sort(z, dim=-1, descending=True).values.mean(dim=0)


def sharpness_dimension(eigenvalues: Any, lr: float, *, eps: float = 0.0) -> float:
    """Sharpness dimension of the gradient-descent map (Def. 4.2 of arXiv:2604.19740).

    The exponents are ``λ_i = log(|1 − η α_i| + ε)``, the log singular values of the step
    Jacobian ``I − ηH``. For a 2-D input of minibatch spectra (shape ``(batches, d)``) each row's
    exponents are sorted decreasingly and averaged position by position, which estimates
    ``E_B[log σ_k(I − η H_B)]``; the Kaplan–Yorke formula is applied to the result.

    Args:
        eigenvalues: Hessian eigenvalues, 1-D ``(d,)`` (one full spectrum) or 2-D
            ``(batches, d)`` (minibatch spectra); tensor, array or list.
        lr: learning rate ``η > 0``.
        eps: ``ε ≥ 0`` added inside the logarithm (``ε = 0`` gives ``-inf`` at ``α = 1/η``).

    Returns:
        ``SD ∈ [0, d]`` as a float.

    Raises:
        ValueError: for a bad shape, NaN/inf eigenvalues, ``lr ≤ 0`` or ``eps < 0``.

    Example:
        >>> round(sharpness_dimension([3.0, 0.5, 0.01, 0.0], 1.0), 3)
        3.986
    """
    lr = check_positive("lr", lr)
    eps = check_positive("eps", eps, allow_zero=True)
    ev = check_eigenvalues(eigenvalues)
    z = averaged_sorted_exponents(gd_exponents(ev, lr, eps))
    return _kaplan_yorke_sorted(z)
