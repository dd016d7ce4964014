"""Extreme eigenpairs by thick-restart Lanczos with full reorthogonalisation.

The top of the Hessian spectrum is what the sharpness dimension of Tuci, Korkmaz, Şimşekli and
Birdal ("Generalization at the Edge of Stability", arXiv:2604.19740, Def. 4.2) needs first: every
eigenvalue ``λ`` with ``|1 - lr λ| > 1`` makes an expanding direction of the gradient-descent map.

Algorithm (one product per step, everything else BLAS-2/3 on the basis):

1. Krylov basis ``V = [v_1 … v_m]`` with ``A V_m = V_m T_m + β_m v_{m+1} e_m^T``; each new vector
   is orthogonalised against the whole basis by two passes of classical Gram–Schmidt
   (``w -= V (V^T w)`` twice: two matrix–vector products with the basis, no per-vector loop).
2. ``T_m`` (kept in float64 whatever the operator's dtype) is diagonalised after every product;
   the Ritz residual of the pair ``(θ_i, V_m s_i)`` is ``|β_m s_{m,i}|`` (no extra product).
3. When the basis reaches ``max_basis`` vectors it is compressed in place to the best Ritz
   vectors plus the residual direction (thick restart, Wu & Simon 2000).

Memory budget: the basis is ``max_basis + 1`` vectors of the operator's dtype, allocated once;
Gram–Schmidt (``addmv`` into the next free row), restarts and the final Ritz vectors (column
chunks of the small rotation) work in place, and the product's output is the only other vector
alive, so the peak is ``max_basis + 2`` vectors besides the operator's own memory (default
``max_basis = k + 10``: ``k + 12`` vectors; ``k + 32`` for ``which="SA"``). The returned
eigenvectors are the first ``k`` rows of the basis, as a ``(dim, k)`` transposed view of a block
of exactly ``k`` vectors: nothing else of the basis outlives the call.
4. A breakdown (an invariant subspace, e.g. degenerate eigenvalues) continues with a fresh random
   vector orthogonal to the basis, so multiplicities are found.

Warm start: with ``init`` (previous eigenvectors, ``(dim, j)``), the first Krylov vector is their
normalised sum plus a small random part. If ``A`` has changed little, the Krylov space of that
vector holds the ``j`` eigenvectors after about ``j`` products, instead of the ``3–4 k`` a random
start needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdopt._checks import check_choice, check_int, check_positive
from sdopt.spectrum.operators import LinearOperator, as_operator

__all__ = ["EigenResult", "top_eigenpairs"]

WHICH = ("LA", "SA", "LM")
# default basis beyond the k wanted vectors (the memory budget: module docstring). The top of a
# Hessian spectrum is a few separated outliers: 10 more vectors cost no extra products there.
# The bottom is the edge of a dense bulk, where a restarted basis stalls: 30 more.
BASIS_EXTRA = {"LA": 10, "LM": 10, "SA": 30}
CRITERIA = ("residual", "eigenvalue")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs at one end of a spectrum, with diagnostics.

    Attributes:
        eigenvalues: ``(k,)``; decreasing for ``"LA"``, increasing for ``"SA"``, decreasing in
            magnitude for ``"LM"``.
        eigenvectors: ``(dim, k)``, orthonormal columns (the operator's dtype and device;
            column-major: each eigenvector is contiguous).
        residuals: ``(k,)`` float64, Ritz residual norms ``‖A v - θ v‖`` (unit ``v``).
        iterations: Lanczos steps taken (basis vectors built, restarts included).
        converged: whether every requested pair met the tolerance.
        num_products: operator products used (columns of ``matmat`` counted one each).
        which: the end of the spectrum, ``"LA"``, ``"SA"`` or ``"LM"``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    iterations: int
    converged: bool
    num_products: int
    which: str

    @property
    def k(self) -> int:
        return int(self.eigenvalues.numel())


def default_generator(generator: torch.Generator | None, seed: int = 0) -> torch.Generator:
    """The caller's generator, or a fresh CPU one seeded with ``seed`` (never the global RNG)."""
    if generator is None:
        return torch.Generator().manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
    return generator


def random_vectors(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device,
    distribution: str = "gaussian",
) -> Tensor:
    """Probe vectors drawn from ``generator`` on its own device, then moved to ``device``."""
    gen_device = generator.device
    if distribution == "rademacher":
        x = torch.randint(0, 2, shape, generator=generator, device=gen_device).to(dtype) * 2 - 1
    else:
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return x.to(device=device, dtype=dtype)


def checked_product(op: LinearOperator, X: Tensor) -> Tensor:
    """``op.matmat(X)`` (or ``matvec``), raising ``FloatingPointError`` on NaN or inf."""
    out = op.matvec(X) if X.ndim == 1 else op.matmat(X)
    if out.shape != X.shape:
        raise ValueError(
            f"Invalid op: product of shape {tuple(out.shape)} for input {tuple(X.shape)}"
        )
    # min and max propagate NaN: no temporary (isfinite would allocate a vector and a mask)
    low, high = torch.aminmax(out)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise FloatingPointError(
            "operator product is not finite (NaN or inf): the operator (e.g. the loss or its "
            "derivatives at these parameters) is not finite"
        )
    return out


def _orthogonalise(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Two passes of classical Gram–Schmidt: ``w - B (B^T w)``; returns (w, coefficients)."""
    h = basis.T @ w
    w = w - basis @ h
    h2 = basis.T @ w
    w = w - basis @ h2
    return w, h + h2


def small_eigh(T: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a small float64 matrix on one thread.

    LAPACK's thread pool makes a 60 × 60 ``eigh`` take ~0.1 s instead of ~0.4 ms when the CPU is
    busy (measured on a shared 2-core machine), so the intra-op threads are set to 1 around it.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return torch.linalg.eigh(T.contiguous())
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(T.contiguous())
    finally:
        torch.set_num_threads(threads)


def _select(theta: Tensor, which: str, count: int) -> Tensor:
    """Indices of the ``count`` wanted Ritz values, in the output order of ``which``."""
    if which == "LA":
        order = torch.argsort(theta, descending=True)
    elif which == "SA":
        order = torch.argsort(theta)
    else:
        order = torch.argsort(theta.abs(), descending=True)
    return order[:count]


def _fresh_direction(V: _Basis, m: int, generator: torch.Generator) -> None:
    """Row ``m`` of ``V`` becomes a random unit vector orthogonal to rows ``[0, m)``."""
    out = V.row(m)
    for _ in range(5):
        v = random_vectors((V.n,), generator, dtype=out.dtype, device=out.device)
        V.orthogonalise_into(v, m, out)
        del v
        norm = out.norm()
        if norm > 1e-3:
            out.div_(norm)
            return
    raise RuntimeError("could not extend the Krylov basis (it spans the whole space)")


def top_eigenpairs(
    op: Any,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    criterion: str = "eigenvalue",
    max_iters: int | None = None,
    max_basis: int | None = None,
    init: Tensor | None = None,
    init_noise: float = 0.05,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator (thick-restart Lanczos).

    A Ritz pair ``(θ_i, x_i)`` with residual ``r_i = ‖A x_i - θ_i x_i‖ = |β_m s_{m,i}|`` is
    converged when its error bound ``e_i`` satisfies

    ``e_i <= tol * max(|θ_i|, sqrt(eps) * ‖T_m‖)``

    with ``eps`` the machine epsilon of the operator's dtype and ``‖T_m‖ = max_j |θ_j|``:

    - ``criterion="eigenvalue"`` (default): ``e_i = min(r_i, r_i² / δ_i)``, the residual bound
      on the eigenvalue error sharpened by the gap ``δ_i = min_j (|θ_i - θ_j| - r_j)`` to the
      other Ritz values, each widened by its own residual (Kato–Temple), so ``tol`` is a
      relative accuracy of the *eigenvalues*;
    - ``criterion="residual"``: ``e_i = r_i`` (stricter: the eigenvectors converge too; the
      eigenvalue error is then below ``tol`` relative in any case, by Weyl's bound).

    Args:
        op: a dense symmetric tensor ``(n, n)``, a :class:`~sdopt.curvature.HessianOperator`, a
            :class:`~sdopt.spectrum.LinearOperator` or any object with ``.dim`` and
            ``.matmat``/``.matvec``.
        k: number of eigenpairs, ``1 <= k <= dim``.
        which: ``"LA"`` largest algebraic (sorted decreasing), ``"SA"`` smallest algebraic
            (sorted increasing), ``"LM"`` largest magnitude (sorted by decreasing ``|θ|``).
        tol: relative tolerance (see above), ``> 0``.
        criterion: ``"eigenvalue"`` or ``"residual"`` (see above).
        max_iters: maximum number of products (default ``max(20 k, 200)``, at most
            ``10 dim``). When it is reached the best pairs are returned with
            ``converged=False``.
        max_basis: most Krylov vectors kept: the memory budget, a peak of ``max_basis + 2``
            vectors of the operator's dtype (module docstring); default ``k + 10`` (``"LA"``,
            ``"LM"``) or ``k + 30`` (``"SA"``: the edge of a dense bulk converges slowly with
            a small basis), at most ``dim``; must exceed ``k`` unless it equals ``dim``.
        init: warm start, previous eigenvectors ``(dim, j)`` (or ``(dim,)``); the first Krylov
            vector is their normalised sum plus ``init_noise`` of a random unit vector.
        init_noise: weight of the random part of a warm start (``>= 0``); it keeps new
            directions (an eigenvalue that overtook the old ones) reachable.
        generator: the ``torch.Generator`` of the random start vectors (default: a fresh one
            seeded with 0; the global RNG is never touched).

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: invalid ``k``, ``which``, ``tol``, ``criterion``, ``max_iters``,
            ``max_basis``, ``init`` or ``op``.
        FloatingPointError: a product contains NaN or inf.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> top_eigenpairs(A, 3, tol=1e-10).eigenvalues.tolist()
        [100.0, 99.0, 98.0]
    """
    A = as_operator(op)
    n = A.dim
    k = check_int("k", k, minimum=1)
    if k > n:
        raise ValueError(f"Invalid k: {k} (must be <= dim = {n})")
    check_choice("which", which, WHICH)
    tol = check_positive("tol", tol)
    check_choice("criterion", criterion, CRITERIA)
    init_noise = check_positive("init_noise", init_noise, allow_zero=True)
    if max_iters is None:
        max_iters = min(max(20 * k, 200), 10 * n)
    max_iters = check_int("max_iters", max_iters, minimum=1)
    if max_basis is None:
        max_basis = default_max_basis(k, n, which)
    max_basis = check_int("max_basis", max_basis, minimum=1)
    if max_basis > n:
        raise ValueError(f"Invalid max_basis: {max_basis} (must be <= dim = {n})")
    if max_basis <= k and max_basis < n:
        raise ValueError(f"Invalid max_basis: {max_basis} (must be > k = {k} or equal dim = {n})")
    gen = default_generator(generator)
    dtype, device = A.dtype, A.device

    Y = None if init is None else _check_init(init, n)
    V = _Basis(max_basis + 1, k, n, dtype, device)
    V.row(0).copy_(_start_vector(n, Y, init_noise, gen, dtype, device))
    return _thick_restart_lanczos(A, k, which, tol, criterion, max_iters, max_basis, V, gen)


def _start_vector(
    n: int, Y: Tensor | None, init_noise: float, gen: torch.Generator, dtype: torch.dtype,
    device: torch.device,
) -> Tensor:  # fmt: skip
    """A random unit vector, or the normalised sum of the columns of ``Y`` plus
    ``init_noise`` of it (its temporaries are freed on return: nothing outlives the basis)."""
    v0 = random_vectors((n,), gen, dtype=dtype, device=device)
    v0 = v0 / v0.norm()
    if Y is not None:
        # the sum of the normalised columns, as one product (no copy of init)
        inverse_norms = 1.0 / Y.norm(dim=0).to(torch.float64).clamp_min(torch.finfo(dtype).tiny)
        start = Y @ inverse_norms.to(dtype=Y.dtype, device=Y.device)
        start = start.to(dtype=dtype, device=device)
        norm = start.norm()
        if norm > 0:
            v0 = start / norm + init_noise * v0
            v0 = v0 / v0.norm()

    return v0


def default_max_basis(k: int, dim: int, which: str = "LA") -> int:
    """The default ``max_basis``: ``k + 10`` (``"LA"``, ``"LM"``) or ``k + 30`` (``"SA"``),
    at most ``dim``."""
    return min(k + BASIS_EXTRA[which], dim)


def restart_size(k: int, max_basis: int) -> int:
    """Ritz vectors kept at a thick restart of a full ``max_basis`` basis (``k`` wanted):
    ``k`` plus half the rest (Wu & Simon)."""
    return min(max_basis - 1, k + (max_basis - k) // 2)


def _check_init(init: Any, n: int) -> Tensor:
    if not isinstance(init, Tensor) or init.ndim not in (1, 2):
        raise ValueError(
            f"Invalid init: {type(init).__name__} (must be a tensor of shape ({n}, j) or ({n},))"
        )
    Y = init[:, None] if init.ndim == 1 else init
    if Y.shape[0] != n or Y.shape[1] < 1:
        raise ValueError(f"Invalid init: shape {tuple(init.shape)} (must be ({n}, j) with j >= 1)")
    if not Y.is_floating_point() or not bool(torch.isfinite(Y).all()):
        raise ValueError("Invalid init: must be floating point without NaN or inf")
    return Y.detach()


class _Basis:
    """The Krylov vectors, as the rows of two blocks allocated once: ``head`` (the first ``k``
    rows, where the returned eigenvectors are formed) and ``tail`` (freed on return).

    Every operation works in place (Gram–Schmidt with ``addmv``; rotations by the small
    ``Y`` over column chunks of about ``dim / (4 rows)``), so the solver's memory is the
    ``rows`` vectors plus at most a quarter of a vector of scratch.
    """

    def __init__(self, rows: int, k: int, n: int, dtype: torch.dtype, device: torch.device):
        self.k = min(k, rows)
        self.head = torch.empty(self.k, n, dtype=dtype, device=device)
        self.tail = torch.empty(rows - self.k, n, dtype=dtype, device=device)
        self.rows = rows
        self.n = n

    def row(self, i: int) -> Tensor:
        return self.head[i] if i < self.k else self.tail[i - self.k]

    def blocks(self, m: int) -> list[tuple[int, Tensor]]:
        """``(first row, block)`` pairs covering rows ``[0, m)``."""
        if m <= self.k:
            return [(0, self.head[:m])]
        return [(0, self.head), (self.k, self.tail[: m - self.k])]

    def orthogonalise_into(self, w: Tensor, m: int, out: Tensor) -> Tensor:
        """``out = w - V_m^T (V_m w)`` twice (classical Gram–Schmidt, two passes) without a
        temporary vector; returns the coefficients ``V_m w`` (both passes summed)."""
        blocks = self.blocks(m)
        h = torch.cat([B @ w for _, B in blocks])
        out.copy_(w)
        for first, B in blocks:
            out.addmv_(B.T, h[first : first + B.shape[0]], alpha=-1.0)
        h2 = torch.cat([B @ out for _, B in blocks])
        for first, B in blocks:
            out.addmv_(B.T, h2[first : first + B.shape[0]], alpha=-1.0)
        return h + h2

    def rotate(self, Y: Tensor, m: int) -> None:
        """Rows ``[0, j)`` become ``Y^T V_m`` (``Y``: ``(m, j)``, ``j <= m``), in place."""
        j = Y.shape[1]
        Yt = Y.T.to(dtype=self.head.dtype, device=self.head.device)
        blocks = self.blocks(m)
        chunk = max(2048, -(-self.n // (4 * max(j, 1))))
        for c0 in range(0, self.n, chunk):
            cols = slice(c0, min(c0 + chunk, self.n))
            new = None
            for first, B in blocks:
                part = Yt[:, first : first + B.shape[0]] @ B[:, cols]
                new = part if new is None else new.add_(part)
            assert new is not None
            for first, B in self.blocks(j):
                B[:, cols] = new[first : first + B.shape[0]]

    def take(self, count: int) -> Tensor:
        """The first ``count <= k`` rows as ``(dim, count)`` columns; frees the tail."""
        self.tail = self.tail[:0]
        return self.head[:count].T


def _thick_restart_lanczos(
    A: LinearOperator,
    k: int,
    which: str,
    tol: float,
    criterion: str,
    max_iters: int,
    max_basis: int,
    V: _Basis,
    gen: torch.Generator,
) -> EigenResult:
    n, dtype, device = A.dim, A.dtype, A.device
    m_max = max_basis
    T = torch.zeros(m_max + 1, m_max + 1, dtype=torch.float64)
    j = 0  # index of the vector to expand next
    products = 0
    steps = 0
    floor_factor = math.sqrt(torch.finfo(dtype).eps)
    while True:
        w = checked_product(A, V.row(j))
        products += 1
        steps += 1
        # the new direction is formed in the next free row: no vector besides the product
        nxt = V.row(j + 1)
        h = V.orthogonalise_into(w, j + 1, nxt)
        del w
        beta = float(nxt.norm())
        h64 = h.to(torch.float64).cpu()
        T[: j + 1, j] = h64
        T[j, : j + 1] = h64
        m = j + 1
        theta, S = small_eigh(T[:m, :m])
        count = min(k, m)
        idx = _select(theta, which, count)
        residuals = (beta * S[m - 1, idx]).abs()
        anorm = float(theta.abs().max())
        scale = torch.clamp(theta[idx].abs(), min=floor_factor * anorm)
        if criterion == "eigenvalue" and m > 1:
            # gap to the other Ritz values, each widened by its own residual (conservative:
            # an unconverged neighbour may hide an eigenvalue closer than its Ritz value)
            all_res = (beta * S[m - 1, :]).abs()
            gaps = (theta[idx, None] - theta[None, :]).abs() - all_res[None, :]
            gaps[torch.arange(count), idx] = math.inf
            gap = gaps.min(dim=1).values.clamp_min(0.0)
            errors = torch.minimum(residuals, residuals**2 / gap)
        else:
            errors = residuals
        converged = count == k and bool((errors <= tol * scale).all())
        if converged or products >= max_iters or m == n:
            if m == n:
                converged = count == k  # the whole space: the Ritz pairs are exact
            V.rotate(S[:, idx], m)
            X = V.take(count)
            return EigenResult(
                eigenvalues=theta[idx].to(dtype=dtype, device=device),
                eigenvectors=X,
                residuals=residuals,
                iterations=steps,
                converged=converged,
                num_products=products,
                which=which,
            )
        if beta <= 100 * torch.finfo(dtype).eps * max(anorm, 1e-300):
            _fresh_direction(V, m, gen)  # invariant subspace: a new direction in row m
            beta = 0.0
        else:
            nxt.div_(beta)
        if m == m_max:  # thick restart: keep the best Ritz vectors and the residual direction
            keep = restart_size(k, m_max)
            keep_idx = _select(theta, which, keep)
            V.rotate(S[:, keep_idx], m)
            V.row(keep).copy_(V.row(m))
            s = beta * S[m - 1, keep_idx]
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[keep_idx])
            T[keep, :keep] = s
            T[:keep, keep] = s
            j = keep
        else:
            T[m, m - 1] = beta
            T[m - 1, m] = beta
            j = m
