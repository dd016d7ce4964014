"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v`` and ``m`` Lanczos steps, ``T_m = S diag(θ) S^T`` gives the Gauss quadrature
``v^T f(A) v ≈ Σ_j τ_j² f(θ_j)`` with ``τ_j = S_{1j}`` (Golub & Meurant; Ubaru, Chen and Saad
2017). With ``n`` the dimension, ``tr f(A) ≈ n · mean_r Σ_j τ_{rj}² f(θ_{rj})`` over ``R`` probes, and
the measure ``(n/R) Σ_r Σ_j τ_{rj}² δ_{θ_{rj}}`` approximates the eigenvalue counting measure
(Ghorbani, Krishnan and Xiao 2019 use it for neural-network Hessians). The sharpness dimension of
Tuci et al. (arXiv:2604.19740) integrates ``log|1 - lr λ|`` against exactly this measure.

Deflation: with ``k`` eigenpairs known (``EigenResult``), probes and operator are projected onto
their orthogonal complement, the quadrature then covers the other ``n - k`` eigenvalues, and the
known eigenvalues enter as exact point masses of weight one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdopt._checks import check_int, check_positive
from sdopt.spectrum.lanczos import (
    EigenResult,
    _orthogonalise,
    checked_product,
    default_generator,
    random_vectors,
    small_eigh,
)
from sdopt.spectrum.operators import as_operator

__all__ = ["SpectralDensity", "lanczos_quadrature", "stochastic_lanczos_quadrature"]


@dataclass(frozen=True)
class SpectralDensity:
    """The eigenvalue measure of a symmetric operator from SLQ (plus exact deflated eigenvalues).

    The measure is ``μ = Σ_i δ_{λ_i} (deflated) + ((dim - k)/R) Σ_r Σ_j weights[r, j] δ_{nodes[r, j]}``
    with total mass ``dim`` (``k`` deflated eigenvalues, ``R`` probes).

    Attributes:
        nodes: ``(R, m)`` float64 Ritz values per probe (rows padded with weight 0 after an
            early invariant subspace).
        weights: ``(R, m)`` float64 squared first components of the Ritz vectors; rows sum to 1.
        dim: dimension of the operator.
        deflated: ``(k,)`` float64 exactly known eigenvalues, or ``None``.
        num_products: operator products used.
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    deflated: Tensor | None = None
    num_products: int = 0

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def bulk_dim(self) -> int:
        """``dim - k``: the number of eigenvalues the quadrature nodes represent."""
        return self.dim - (0 if self.deflated is None else int(self.deflated.numel()))

    def _atoms(self) -> tuple[Tensor, Tensor]:
        """All atoms and their masses (summing to ``dim``)."""
        R = self.num_probes
        points = self.nodes.reshape(-1)
        masses = self.weights.reshape(-1) * (self.bulk_dim / R)
        if self.deflated is not None and self.deflated.numel():
            points = torch.cat([points, self.deflated])
            masses = torch.cat([masses, torch.ones_like(self.deflated)])
        return points, masses

    def per_probe(self, f: Callable[[Tensor], Tensor]) -> Tensor:
        """``(R,)``: each probe's unbiased estimate of ``tr f(A)``."""
        values = f(self.nodes)
        if not isinstance(values, Tensor) or values.shape != self.nodes.shape:
            raise ValueError(
                "Invalid f: must map a float64 tensor to a tensor of the same shape (elementwise)"
            )
        est = self.bulk_dim * (self.weights * values.to(torch.float64)).sum(dim=1)
        if self.deflated is not None and self.deflated.numel():
            est = est + f(self.deflated).to(torch.float64).sum()
        return est

    def integrate(self, f: Callable[[Tensor], Tensor]) -> tuple[float, float]:
        """Estimate of ``tr f(A) = Σ_i f(λ_i)`` and its standard error across probes.

        ``f`` is applied elementwise to a float64 tensor of nodes (e.g. ``torch.log1p``,
        ``lambda x: x**2``). The standard error is ``nan`` with one probe.
        """
        est = self.per_probe(f)
        err = math.nan if est.numel() < 2 else float(est.std() / math.sqrt(est.numel()))
        return float(est.mean()), err

    def moment(self, p: int) -> tuple[float, float]:
        """``tr A^p`` and its standard error (``integrate(lambda x: x**p)``)."""
        p = check_int("p", p, minimum=0)
        return self.integrate(lambda x: x**p)

    def density(self, grid: Tensor, *, sigma: float | None = None) -> Tensor:
        """Gaussian-smoothed density on ``grid`` (integrates to ``dim`` over the real line).

        ``sigma`` defaults to ``(max node - min node) / (4 m)`` (``m`` Lanczos steps).
        """
        points, masses = self._atoms()
        if sigma is None:
            spread = float(points.max() - points.min())
            sigma = max(spread, 1e-12 * max(float(points.abs().max()), 1.0)) / (
                4 * self.nodes.shape[1]
            )
        sigma = check_positive("sigma", sigma)
        grid = torch.as_tensor(grid, dtype=torch.float64)
        z = (grid.reshape(-1, 1) - points.reshape(1, -1)) / sigma
        dens = (torch.exp(-0.5 * z**2) * masses).sum(dim=1) / (sigma * math.sqrt(2 * math.pi))
        return dens.reshape(grid.shape)

    def quantiles(self, num: int) -> Tensor:
        """``num`` equal-mass points of the measure, increasing.

        Point ``i`` is the smallest atom where the cumulative mass reaches ``(i + 1/2) dim / num``;
        ``quantiles(dim)`` is a synthetic full spectrum with this density.
        """
        num = check_int("num", num, minimum=1)
        points, masses = self._atoms()
        order = torch.argsort(points)
        points, cum = points[order], torch.cumsum(masses[order], dim=0)
        targets = (torch.arange(num, dtype=torch.float64) + 0.5) * (float(cum[-1]) / num)
        idx = torch.searchsorted(cum, targets).clamp_max(points.numel() - 1)
        return points[idx]

    def histogram(self, bins: int | Tensor = 50) -> tuple[Tensor, Tensor]:
        """Expected eigenvalue counts per bin (summing to ``dim``) and the bin edges."""
        points, masses = self._atoms()
        if isinstance(bins, Tensor):
            edges = bins.to(torch.float64)
            if edges.ndim != 1 or edges.numel() < 2 or not bool((edges.diff() > 0).all()):
                raise ValueError("Invalid bins: edges must be a 1-D increasing tensor")
        else:
            bins = check_int("bins", bins, minimum=1)
            lo, hi = float(points.min()), float(points.max())
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        idx = (torch.searchsorted(edges, points, right=True) - 1).clamp(0, edges.numel() - 2)
        inside = (points >= edges[0]) & (points <= edges[-1])
        counts = torch.zeros(edges.numel() - 1, dtype=torch.float64)
        counts.index_add_(0, idx[inside], masses[inside])
        return counts, edges


def lanczos_quadrature(
    op: Any, v: Tensor, num_steps: int, *, reorthogonalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of ``v^T f(A) v / ‖v‖²`` from ``num_steps`` Lanczos steps.

    With ``reorthogonalize=True`` (default) every new vector is orthogonalised against all the
    previous ones (two passes of Gram–Schmidt, in place): the solver stores ``num_steps``
    vectors of the operator's dtype (``min(num_steps, dim)``), and each product's output is
    the only other vector alive. With ``False`` the three-term recurrence keeps three vectors
    whatever ``num_steps``: finite precision then duplicates converged Ritz values ("ghosts"),
    which share the weight of the one eigenvalue they approximate, so the quadrature of a
    smooth ``f`` stays accurate (Greenbaum 1989; Chen, Trogdon and Ubaru 2021) while single
    nodes lose their meaning.

    Stops early (padding with zero weights) on an invariant subspace.
    Returns float64 ``(nodes, weights)`` of length ``num_steps``.
    """
    from sdopt.spectrum.lanczos import _Basis

    A = as_operator(op)
    m = min(num_steps, A.dim)
    T = torch.zeros(m, m, dtype=torch.float64)
    V = _Basis(m if reorthogonalize else 3, 0, A.dim, A.dtype, A.device)
    V.row(0).copy_(v).div_(v.norm())
    size = m
    for j in range(m):
        row = j if reorthogonalize else j % 3
        w = checked_product(A, V.row(row))
        if reorthogonalize:
            out = V.row(j + 1) if j + 1 < m else torch.empty_like(w)
            h = V.orthogonalise_into(w, j + 1, out)
            alpha = float(h[j])
        else:  # w - α v_j - β v_{j-1}, with one local reorthogonalisation against v_j
            out = V.row((j + 1) % 3)
            out.copy_(w)
            if j > 0:
                out.sub_(V.row((j - 1) % 3), alpha=float(T[j, j - 1]))
            alpha = float(V.row(row) @ out)
            out.sub_(V.row(row), alpha=alpha)
            out.sub_(V.row(row), alpha=float(V.row(row) @ out))
        del w
        T[j, j] = alpha
        beta = float(out.norm())
        if j + 1 == m:
            break
        if beta <= 100 * torch.finfo(A.dtype).eps * max(
            float(T[: j + 1, : j + 1].abs().max()), 1e-300
        ):
            size = j + 1
            break
        out.div_(beta)
        T[j + 1, j] = T[j, j + 1] = beta
    del V
    theta, S = small_eigh(T[:size, :size])
    nodes = torch.full((num_steps,), float(theta[-1]), dtype=torch.float64)
    weights = torch.zeros(num_steps, dtype=torch.float64)
    nodes[:size] = theta
    weights[:size] = S[0] ** 2
    return nodes, weights


def stochastic_lanczos_quadrature(
    op_or_ops: Any,
    num_probes: int = 10,
    num_steps: int = 80,
    *,
    generator: torch.Generator | None = None,
    deflate: EigenResult | None = None,
    distribution: str = "rademacher",
    reorthogonalize: bool = True,
) -> SpectralDensity:
    """Spectral density by SLQ: ``num_probes`` probes × ``num_steps`` Lanczos steps.

    Args:
        op_or_ops: one operator (or dense symmetric tensor); or a sequence of operators, probe
            ``r`` using ``ops[r % len(ops)]``; or a callable ``probe_index -> operator`` (the
            paper's protocol: a fresh minibatch Hessian per probe).
        num_probes: ``R >= 1`` probes (``R >= 2`` for standard errors).
        num_steps: Lanczos steps per probe (= products per probe), ``>= 1``.
        generator: ``torch.Generator`` of the probes (default: fresh, seeded with 0).
        deflate: known eigenpairs (an :class:`EigenResult`, e.g. from :func:`top_eigenpairs`):
            projected out of probes and operator, added back as exact point masses.
        distribution: probe distribution, ``"rademacher"`` or ``"gaussian"`` (normalised
            either way).
        reorthogonalize: full reorthogonalisation (default; memory ``num_steps`` vectors) or
            the three-term recurrence (three vectors); see :func:`lanczos_quadrature`.

    Memory: besides the operator's own, ``min(num_steps, dim) + 2`` vectors of its dtype
    (``3 + 2`` with ``reorthogonalize=False``), plus the ``k`` deflated eigenvectors and about
    three vectors for the projections around each product when ``deflate`` is given.

    Returns:
        :class:`SpectralDensity` with ``num_products = R · num_steps``.

    Raises:
        ValueError: invalid counts, operator, ``deflate`` or operators of different sizes.
        FloatingPointError: a product contains NaN or inf.
    """
    num_probes = check_int("num_probes", num_probes, minimum=1)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(
            f"Invalid distribution: {distribution!r} (must be one of 'rademacher', 'gaussian')"
        )
    if not isinstance(reorthogonalize, bool):
        raise ValueError(f"Invalid reorthogonalize: {reorthogonalize!r} (must be a bool)")
    if deflate is not None and not isinstance(deflate, EigenResult):
        raise ValueError(f"Invalid deflate: {type(deflate).__name__} (must be an EigenResult)")
    gen = default_generator(generator)

    if (
        isinstance(op_or_ops, Tensor)
        or hasattr(op_or_ops, "matmat")
        or hasattr(op_or_ops, "matvec")
    ):
        single = as_operator(op_or_ops)

        def get(r: int) -> Any:
            return single
    elif isinstance(op_or_ops, Sequence) and not isinstance(op_or_ops, str):
        if len(op_or_ops) == 0:
            raise ValueError("Invalid op_or_ops: empty sequence")
        ops = [as_operator(o) for o in op_or_ops]

        def get(r: int) -> Any:
            return ops[r % len(ops)]
    elif callable(op_or_ops):

        def get(r: int) -> Any:
            return as_operator(op_or_ops(r))
    else:
        raise ValueError(
            f"Invalid op_or_ops: {type(op_or_ops).__name__} (must be an operator, a sequence of "
            "operators or a callable probe_index -> operator)"
        )

    nodes, weights = [], []
    dim = None
    U = None
    deflated_values = None
    for r in range(num_probes):
        A = get(r)
        if dim is None:
            dim = A.dim
            if deflate is not None:
                if deflate.eigenvectors.shape[0] != dim:
                    raise ValueError(
                        f"Invalid deflate: eigenvectors of shape "
                        f"{tuple(deflate.eigenvectors.shape)} (must be ({dim}, k))"
                    )
                if deflate.eigenvectors.shape[1] >= dim:
                    raise ValueError("Invalid deflate: deflates the whole space")
                U = deflate.eigenvectors.to(dtype=A.dtype, device=A.device)
                deflated_values = deflate.eigenvalues.detach().to(torch.float64).cpu()
        elif A.dim != dim:
            raise ValueError(f"Invalid op_or_ops: operator {r} has dim {A.dim} (expected {dim})")
        z = random_vectors((dim,), gen, dtype=A.dtype, device=A.device, distribution=distribution)
        op = A
        if U is not None:
            Ud = U.to(dtype=A.dtype, device=A.device)
            z, _ = _orthogonalise(z, Ud)

            def project(X: Tensor, Ud: Tensor = Ud) -> Tensor:
                return torch.addmm(X, Ud, Ud.T @ X, alpha=-1.0)  # one new vector

            from sdopt.spectrum.operators import LinearOperator

            op = LinearOperator(
                dim,
                lambda X, A=A, project=project: project(A.matmat(project(X))),
                dtype=A.dtype,
                device=A.device,
            )
        th, w = lanczos_quadrature(op, z, num_steps, reorthogonalize=reorthogonalize)
        nodes.append(th)
        weights.append(w)
    assert dim is not None
    return SpectralDensity(
        nodes=torch.stack(nodes),
        weights=torch.stack(weights),
        dim=dim,
        deflated=deflated_values,
        num_products=num_probes * min(num_steps, dim),
    )
