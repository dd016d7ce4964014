"""Linear operators for the eigen-solvers: a normal form for anything with ``matmat``.

The solvers in :mod:`sdopt.spectrum` only ever call ``op.matmat(V)`` on blocks ``(dim, m)``
(or ``op.matvec(v)``). :func:`as_operator` turns a dense symmetric tensor, a
:class:`~sdopt.curvature.HessianOperator` or any duck-typed object with ``dim`` and
``matmat``/``matvec`` into a :class:`LinearOperator`; the helpers below compose operators
without forming matrices (shift, scale, deflation, the squared gradient-descent map
``(I - lr H)^2`` and the preconditioned ``P^{-1/2} H P^{-1/2}``), each costing one product of the
underlying operator per column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdopt._checks import check_finite, check_positive

__all__ = [
    "LinearOperator",
    "as_operator",
    "deflated",
    "gd_map_squared",
    "preconditioned",
    "scaled",
    "shifted",
]


class LinearOperator:
    """A symmetric linear map on flat vectors of length ``dim``, given by a block product.

    Args:
        dim: size of the vectors.
        matmat: ``V (dim, m) -> A V (dim, m)``.
        dtype: dtype of the vectors the product accepts (default float64).
        device: device of those vectors (default CPU).
        matvec: optional ``v (dim,) -> A v`` when a single product is cheaper than a block of one.
        source: the operator this one was built from (kept for introspection).

    Attributes:
        num_products: products done by *this* operator so far (a block of ``m`` counts ``m``).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> op = LinearOperator(2, lambda V: A @ V)
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist(), op.num_products
        ([3.0, 1.0], 1)
    """

    def __init__(
        self,
        dim: int,
        matmat: Callable[[Tensor], Tensor],
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        matvec: Callable[[Tensor], Tensor] | None = None,
        source: Any = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Invalid dim: {dim!r} (must be an integer >= 1)")
        if not callable(matmat):
            raise ValueError(f"Invalid matmat: {matmat!r} (must be callable)")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"Invalid dtype: {dtype!r} (must be a real floating-point torch.dtype: the "
                "solvers need a real symmetric operator)"
            )
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.source = source
        self._matmat = matmat
        self._matvec = matvec
        self.num_products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(dim, m)``; counts ``m`` products."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"Invalid V: shape {tuple(V.shape)} (must be ({self.dim}, m))")
        out = self._matmat(V)
        self.num_products += V.shape[1]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(dim,)``; counts one product."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"Invalid v: shape {tuple(v.shape)} (must be ({self.dim},))")
        if self._matvec is not None:
            out = self._matvec(v)
        else:
            out = self._matmat(v[:, None])[:, 0]
        self.num_products += 1
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matmat(x) if x.ndim == 2 else self.matvec(x)

    def to_dense(self) -> Tensor:
        """The ``dim x dim`` matrix (``dim`` products; for tests and small operators)."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    # composition shortcuts -------------------------------------------------------------
    def shift(self, sigma: float) -> LinearOperator:
        """``A + sigma I``."""
        return shifted(self, sigma)

    def scale(self, c: float) -> LinearOperator:
        """``c A``."""
        return scaled(self, c)

    def __repr__(self) -> str:
        return (
            f"LinearOperator(dim={self.dim}, dtype={self.dtype}, device={self.device}, "
            f"num_products={self.num_products})"
        )


def _dense_operator(A: Tensor, *, symmetry_tol: float | None = None) -> LinearOperator:
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"Invalid op: tensor of shape {tuple(A.shape)} (must be square (n, n))")
    if not A.is_floating_point():
        raise ValueError(f"Invalid op: tensor of dtype {A.dtype} (must be floating point)")
    if not torch.isfinite(A).all():
        raise ValueError("Invalid op: tensor contains NaN or inf")
    tol = symmetry_tol
    if tol is None:
        tol = 100 * torch.finfo(A.dtype).eps
    asym = (A - A.T).abs().max()
    if asym > tol * max(float(A.abs().max()), 1e-300):
        raise ValueError(f"Invalid op: tensor is not symmetric (max |A - A^T| = {float(asym):.3g})")
    A = A.detach()
    return LinearOperator(
        A.shape[0],
        lambda V: A @ V,
        dtype=A.dtype,
        device=A.device,
        matvec=lambda v: A @ v,
        source=A,
    )


class _Wrapped(LinearOperator):
    """Duck-typed operator: counts products here and forwards to the object."""

    def __init__(self, obj: Any) -> None:
        dim = getattr(obj, "dim", None)
        if dim is None and hasattr(obj, "shape"):
            dim = obj.shape[0]
        has_matmat = callable(getattr(obj, "matmat", None))
        has_matvec = callable(getattr(obj, "matvec", None))
        if not (has_matmat or has_matvec) or not isinstance(dim, int):
            raise ValueError(
                f"Invalid op: {type(obj).__name__} (must be a square symmetric torch.Tensor or an "
                "object with an integer .dim and .matmat or .matvec)"
            )
        dtype = getattr(obj, "dtype", torch.float64)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"Invalid op: {type(obj).__name__} of dtype {dtype!r} (must be real floating "
                "point: the solvers need a real symmetric operator)"
            )
        if has_matmat:
            matmat = obj.matmat
        else:

            def matmat(V: Tensor) -> Tensor:
                return torch.stack([obj.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

        super().__init__(
            int(dim),
            matmat,
            dtype=dtype,
            device=getattr(obj, "device", "cpu"),
            matvec=obj.matvec if has_matvec else None,
            source=obj,
        )


def as_operator(op: Any) -> LinearOperator:
    """Normalise ``op`` to a :class:`LinearOperator`.

    Accepts a :class:`LinearOperator` (returned as is), a dense symmetric floating-point tensor
    ``(n, n)`` (checked for symmetry to ``100·eps`` relative), or any object with an integer
    ``.dim`` and ``.matmat`` or ``.matvec`` (``.dtype`` and ``.device`` are read when present,
    e.g. :class:`~sdopt.curvature.HessianOperator`).

    Raises:
        ValueError: ``op`` is none of these, or is a non-square, non-symmetric or non-finite tensor.
    """
    if isinstance(op, LinearOperator):
        return op
    if isinstance(op, Tensor):
        return _dense_operator(op)
    return _Wrapped(op)


def shifted(op: Any, sigma: float) -> LinearOperator:
    """``A + sigma I`` (one product of ``A`` per column)."""
    base = as_operator(op)
    sigma = check_finite("sigma", sigma)
    return LinearOperator(
        base.dim,
        lambda V: base.matmat(V) + sigma * V,
        dtype=base.dtype,
        device=base.device,
        source=base,
    )


def scaled(op: Any, c: float) -> LinearOperator:
    """``c A`` (one product of ``A`` per column)."""
    base = as_operator(op)
    c = check_finite("c", c)
    return LinearOperator(
        base.dim, lambda V: c * base.matmat(V), dtype=base.dtype, device=base.device, source=base
    )


def deflated(op: Any, vectors: Tensor) -> LinearOperator:
    """``P A P`` with ``P = I - U U^T``: the known directions ``U`` (orthonormal columns) removed.

    The eigenpairs of ``A`` whose eigenvectors are the columns of ``U`` become eigenvalue 0 of
    the deflated operator; all other eigenpairs are unchanged.
    """
    base = as_operator(op)
    U = _check_basis(vectors, base, "vectors")

    def project(V: Tensor) -> Tensor:
        return V - U @ (U.T @ V)

    return LinearOperator(
        base.dim,
        lambda V: project(base.matmat(project(V))),
        dtype=base.dtype,
        device=base.device,
        source=base,
    )


def gd_map_squared(op: Any, lr: float) -> LinearOperator:
    """``(I - lr A)^2``: its eigenvalues are the squared singular values of the GD map's Jacobian.

    Two products of ``A`` per column.
    """
    base = as_operator(op)
    lr = check_positive("lr", lr)

    def step(V: Tensor) -> Tensor:
        return V - lr * base.matmat(V)

    return LinearOperator(
        base.dim, lambda V: step(step(V)), dtype=base.dtype, device=base.device, source=base
    )


def preconditioned(op: Any, preconditioner: Tensor) -> LinearOperator:
    """``P^{-1/2} A P^{-1/2}`` for a positive diagonal preconditioner ``P`` (shape ``(dim,)``).

    Same spectrum as ``P^{-1} A`` (similar matrices); one product of ``A`` per column.
    ``P = inf`` marks a frozen coordinate (``P^{-1/2} = 0``: e.g. a parameter Adam never
    moved), whose row and column of the result are zero.
    """
    base = as_operator(op)
    check_preconditioner(preconditioner, base.dim)
    d = preconditioner.to(dtype=base.dtype, device=base.device).rsqrt()[:, None]
    return LinearOperator(
        base.dim,
        lambda V: d * base.matmat(d * V),
        dtype=base.dtype,
        device=base.device,
        source=base,
    )


def check_preconditioner(preconditioner: Any, dim: int) -> Tensor:
    """A real tensor of shape ``(dim,)`` with entries ``> 0`` (``inf`` allowed, NaN not)."""
    if (
        not isinstance(preconditioner, Tensor)
        or preconditioner.is_complex()
        or preconditioner.shape != (dim,)
        or torch.isnan(preconditioner).any()
        or not (preconditioner > 0).all()
    ):
        what = (
            f"shape {tuple(preconditioner.shape)}"
            if isinstance(preconditioner, Tensor)
            else type(preconditioner).__name__
        )
        raise ValueError(
            f"Invalid preconditioner: {what} (must be a real tensor of shape ({dim},) with "
            "entries > 0; inf marks a frozen coordinate)"
        )
    return preconditioner


def _check_basis(vectors: Tensor, base: LinearOperator, name: str) -> Tensor:
    if not isinstance(vectors, Tensor) or vectors.ndim not in (1, 2):
        raise ValueError(f"Invalid {name}: {type(vectors).__name__} (must be a (dim, j) tensor)")
    U = vectors[:, None] if vectors.ndim == 1 else vectors
    if U.shape[0] != base.dim or U.shape[1] < 1:
        raise ValueError(f"Invalid {name}: shape {tuple(vectors.shape)} (must be ({base.dim}, j))")
    if not torch.isfinite(U).all():
        raise ValueError(f"Invalid {name}: contains NaN or inf")
    return U.to(dtype=base.dtype, device=base.device)
