"""Stochastic trace estimators: Hutchinson and Hutch++.

``tr A = E[z^T A z]`` for probes with ``E[z z^T] = I`` (Hutchinson 1989). Hutch++ (Meyer, Musco,
Musco and Woodruff 2021) first takes the trace of ``A`` exactly on a sketched dominant subspace
``Q`` and applies Hutchinson only to the remainder ``(I - QQ^T) A (I - QQ^T)``: for a matrix with
a few large eigenvalues (a Hessian) its variance is far lower at the same number of products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdopt._checks import check_choice, check_int
from sdopt.spectrum.lanczos import checked_product, default_generator, random_vectors
from sdopt.spectrum.operators import as_operator

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace"]

DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of ``tr A``.

    Attributes:
        value: the estimate (mean of ``samples``).
        std_error: standard error of the mean across probes (``nan`` with one probe).
        num_products: operator products used.
        samples: ``(num_probes,)`` float64, one unbiased estimate of ``tr A`` per probe.
    """

    value: float
    std_error: float
    num_products: int
    samples: Tensor


def _std_error(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.nan
    return float(samples.std(unbiased=True) / math.sqrt(samples.numel()))


def _quadratic_forms(op: Any, Z: Tensor, block_size: int) -> Tensor:
    out = []
    for start in range(0, Z.shape[1], block_size):
        Zb = Z[:, start : start + block_size]
        out.append((Zb * checked_product(op, Zb)).sum(dim=0).to(torch.float64).cpu())
    return torch.cat(out)


def hutchinson_trace(
    op: Any,
    num_probes: int = 100,
    *,
    distribution: str = "rademacher",
    block_size: int = 1,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``tr A ≈ (1/N) Σ_i z_i^T A z_i``.

    Rademacher probes (default) give the lowest variance, ``2 Σ_{i≠j} A_ij²`` per probe; Gaussian
    probes give ``2 ‖A‖_F²``.

    Args:
        op: operator or dense symmetric tensor (see :func:`~sdopt.spectrum.as_operator`).
        num_probes: number of probes (= products), ``>= 1``.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        block_size: probes per ``matmat`` call (a batched product may be cheaper per vector).
        generator: ``torch.Generator`` of the probes (default: fresh, seeded with 0).

    Returns:
        :class:`TraceEstimate`.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> hutchinson_trace(A, 10).value  # diagonal: Rademacher probes are exact
        55.0
    """
    A = as_operator(op)
    num_probes = check_int("num_probes", num_probes, minimum=1)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    block_size = check_int("block_size", block_size, minimum=1)
    gen = default_generator(generator)
    Z = random_vectors(
        (A.dim, num_probes), gen, dtype=A.dtype, device=A.device, distribution=distribution
    )
    samples = _quadratic_forms(A, Z, block_size)
    return TraceEstimate(float(samples.mean()), _std_error(samples), num_probes, samples)


def hutchpp_trace(
    op: Any,
    num_products: int = 102,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    With ``s = num_products // 3`` (the remainder goes to the Hutchinson part):
    ``Q = orth(A S)`` for ``s`` random probes ``S``, then
    ``tr A ≈ tr(Q^T A Q) + (1/N) Σ_i g_i^T (I - QQ^T) A (I - QQ^T) g_i`` with
    ``N = num_products - 2 s`` probes ``g_i``.

    Args:
        op: operator or dense symmetric tensor.
        num_products: total products, ``>= 3``.
        distribution: probe distribution, ``"rademacher"`` or ``"gaussian"``.
        generator: ``torch.Generator`` of the probes (default: fresh, seeded with 0).

    Returns:
        :class:`TraceEstimate` whose ``samples`` are ``tr(Q^T A Q) + g_i^T (…) g_i``;
        ``std_error`` is their standard error.
    """
    A = as_operator(op)
    num_products = check_int("num_products", num_products, minimum=3)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    gen = default_generator(generator)
    s = num_products // 3
    N = num_products - 2 * s
    kw = {"dtype": A.dtype, "device": A.device, "distribution": distribution}
    S = random_vectors((A.dim, s), gen, **kw)
    Q, _ = torch.linalg.qr(checked_product(A, S))
    exact = float((Q * checked_product(A, Q)).sum().to(torch.float64))
    G = random_vectors((A.dim, N), gen, **kw)
    G = G - Q @ (Q.T @ G)
    AG = checked_product(A, G)
    AG = AG - Q @ (Q.T @ AG)
    samples = exact + (G * AG).sum(dim=0).to(torch.float64).cpu()
    return TraceEstimate(float(samples.mean()), _std_error(samples), 2 * s + N, samples)
