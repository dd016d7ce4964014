"""Curvature operators: :class:`HessianOperator` and the one-shot :func:`hvp`.

The Hessian ``H = ∇²L(θ)`` of the mean training loss ``L(θ) = (1/B) Σ_b ℓ_b(θ)`` is the matrix
whose spectrum the sharpness dimension of Tuci et al. ("Generalization at the Edge of
Stability", arXiv:2604.19740, Def. 4.1–4.2) is built from. It is never formed: the operator
gives products ``v ↦ H v`` on flat vectors of length ``dim`` (the number of trainable scalars).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sdopt._checks import check_choice, check_int
from sdopt.curvature.distributed import average_across_ranks, resolve_distributed
from sdopt.curvature.functional import FunctionalLoss, make_functional_loss
from sdopt.curvature.products import (
    ENGINES,
    ProductEngine,
    flat_gradient,
    plain_evaluation_error,
)

__all__ = ["MODES", "CurvatureFallbackWarning", "HessianOperator", "default_mode", "hvp"]

MODES = (
    "auto",
    "autotune",
    "reuse",
    "fwd-rev",
    "rev-rev",
    "double-backward",
    "linearize",
    "finite-difference",
)
_FALLBACK_ORDER = ("reuse", "fwd-rev", "finite-difference")
# modes that rely on the same autodiff capability fail together
_FAMILIES = {
    "reuse": "double backward",
    "double-backward": "double backward",
    "rev-rev": "double backward",
    "fwd-rev": "forward-mode AD",
    "linearize": "forward-mode AD",
}


def _all_finite(x: Tensor) -> bool:
    """Cheap test first (one reduction; NaN/inf propagate through a sum), exact test if needed."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class CurvatureFallbackWarning(UserWarning):
    """A product mode failed on this model and another one is used instead."""


def default_mode(device: torch.device | str) -> str:
    """The mode ``mode="auto"`` resolves to on ``device``.

    Chosen by measurement (``python benchmarks/curvature.py``, see docs/curvature.md): on the
    CPU the reused gradient graph (``"reuse"``) is the fastest exact mode on both benchmark
    workloads (about 1.6–2.0 gradients per product, against 2.9–4.4 for the others), so CPU
    resolves to ``"reuse"``. On other devices no measurement was available to the authors, so
    ``"auto"`` resolves to ``"autotune"``: the first products time ``"reuse"``, ``"fwd-rev"``
    and ``"rev-rev"`` on the actual model and keep the fastest.
    """
    return "reuse" if torch.device(device).type == "cpu" else "autotune"


class CurvatureOperator:
    """Shared machinery of the curvature operators (validation, fallback, averaging, state)."""

    _modes: tuple[str, ...] = MODES
    _fallback_order: tuple[str, ...] = _FALLBACK_ORDER

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        mode: str = "auto",
        chunk_size: int | None = None,
        vectorize: bool = False,
        dropout: str = "off",
        dropout_seed: int = 0,
        distributed: bool | None = None,
        fallback: bool = True,
        check_finite: bool = True,
    ) -> None:
        check_choice("mode", mode, self._modes)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        for name, flag in (
            ("vectorize", vectorize),
            ("fallback", fallback),
            ("check_finite", check_finite),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r} (must be True or False)")
        self.functional: FunctionalLoss = make_functional_loss(
            model, loss_fn, data, dropout=dropout, dropout_seed=dropout_seed
        )
        self.distributed = resolve_distributed(distributed)
        self.requested_mode = mode
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.fallback = fallback
        self.check_finite = check_finite
        self.num_products = 0
        resolved = default_mode(self.device) if mode == "auto" else mode
        self._engine = self._make_engine(resolved)
        self._verified = False
        self._failed_families: set[str] = set()
        self._loss_and_gradient: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ engines and fallback
    def _make_engine(self, mode: str) -> ProductEngine:
        return ENGINES[mode](self.functional, vectorize=self.vectorize, chunk_size=self.chunk_size)

    @property
    def mode(self) -> str:
        """The product mode in use (after ``"auto"`` resolution, autotuning and any fallback)."""
        chosen = getattr(self._engine, "chosen", None)
        return chosen.name if chosen is not None else self._engine.name

    def _run(self, x: Tensor, block: bool) -> Tensor:
        while True:
            engine = self._engine
            call = engine.matmat if block else engine.matvec
            if self._verified or not self.fallback:
                return call(x)
            try:
                out = call(x)
            except (RuntimeError, NotImplementedError) as error:
                if plain_evaluation_error(self.functional) is not None:
                    # the user's model or loss_fn raises on a plain evaluation too: the error
                    # is theirs, not this mode's, and no other mode would avoid it
                    raise
                # a mode that fails rules out the modes sharing its AD machinery
                if engine.name == "autotune":  # every candidate failed
                    self._failed_families.update(_FAMILIES.values())
                else:
                    self._failed_families.add(_FAMILIES.get(engine.name, engine.name))
                remaining = [
                    m
                    for m in self._fallback_order
                    if _FAMILIES.get(m, m) not in self._failed_families
                ]
                if not remaining:
                    raise
                reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
                warnings.warn(
                    f"sdopt: Hessian-vector product mode {engine.name!r} is not supported by "
                    f"this model ({type(error).__name__}: {reason}); falling back to "
                    f"{remaining[0]!r}",
                    CurvatureFallbackWarning,
                    stacklevel=4,
                )
                engine.release()
                self._engine = self._make_engine(remaining[0])
                continue
            self._verified = True
            return out

    # ------------------------------------------------------------------ public attributes
    @property
    def dim(self) -> int:
        """Number of trainable scalars (parameters with ``requires_grad=True``, tied once)."""
        return self.functional.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.functional.dtype

    @property
    def device(self) -> torch.device:
        return self.functional.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def names(self) -> list[str]:
        """Names of the trainable parameters, in ``named_parameters()`` order."""
        return list(self.functional.names)

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters (detached views of the module's tensors)."""
        return list(self.functional.params)

    def flatten(self, tensors: Any) -> Tensor:
        """Per-parameter tensors (e.g. ``[p.grad for p in op.params]``) -> flat ``(dim,)``."""
        return self.functional.flatten(list(tensors))

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Flat ``(dim,)`` vector -> list of tensors shaped like :attr:`params`."""
        self._check_vector(vec, 1, "vec")
        return self.functional.unflatten(vec)

    # ------------------------------------------------------------------ products
    def _check_vector(self, v: Any, ndim: int, name: str) -> None:
        expected = f"({self.dim},)" if ndim == 1 else f"({self.dim}, m) with m >= 1"
        if not isinstance(v, Tensor):
            raise ValueError(
                f"Invalid {name}: {type(v).__name__} (must be a torch.Tensor of shape {expected})"
            )
        if v.ndim != ndim or v.shape[0] != self.dim or (ndim == 2 and v.shape[1] == 0):
            raise ValueError(f"Invalid {name}: shape {tuple(v.shape)} (must be {expected})")
        if v.dtype != self.dtype:
            raise ValueError(
                f"Invalid {name}: dtype {v.dtype} (must be {self.dtype}, the parameters' dtype)"
            )
        if v.device != self.device:
            raise ValueError(
                f"Invalid {name}: device {v.device} (must be {self.device}, the parameters' device)"
            )
        if self.check_finite and not _all_finite(v):
            raise ValueError(f"Invalid {name}: contains NaN or inf")

    def _product(self, x: Tensor, block: bool) -> Tensor:
        self.functional.check_unchanged()
        with self.functional.evaluation():
            out = self._run(x, block)
        if self.distributed:
            out = average_across_ranks(out.contiguous())
        if self.check_finite and not _all_finite(out):
            raise FloatingPointError(
                f"{type(self).__name__} product is not finite (NaN or inf) in mode "
                f"{self.mode!r}: the loss or its derivatives are not finite at these parameters"
            )
        self.num_products += x.shape[1] if block else 1
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of shape ``(dim,)``.

        Raises:
            ValueError: ``v`` has the wrong type, shape, dtype or device, or is not finite.
            FloatingPointError: the product contains NaN or inf.
        """
        self._check_vector(v, 1, "v")
        return self._product(v, block=False)

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for a block ``V`` of shape ``(dim, m)``; counts ``m`` products."""
        self._check_vector(V, 2, "V")
        return self._product(V, block=True)

    def __matmul__(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.ndim == 2:
            return self.matmat(x)
        return self.matvec(x)

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Mean loss (0-d) and flat gradient ``∇L(θ)`` (``(dim,)``), detached.

        Free when the ``"reuse"`` graph already exists (it holds both); averaged across ranks
        when distributed.
        """
        if self._loss_and_gradient is None:
            self.functional.check_unchanged()
            cached = self._engine.loss_and_gradient()
            if cached is None:
                with self.functional.evaluation():
                    cached = flat_gradient(self.functional)
            loss, gradient = cached[0].clone(), cached[1].clone()
            if self.distributed:
                loss, gradient = average_across_ranks(loss), average_across_ranks(gradient)
            self._loss_and_gradient = (loss, gradient)
        loss, gradient = self._loss_and_gradient
        return loss.clone(), gradient.clone()

    def to_dense(self, *, max_dim: int = 8192, chunk: int = 64) -> Tensor:
        """The full ``dim x dim`` matrix from ``dim`` products (for tests and small models).

        Raises:
            ValueError: ``dim > max_dim`` (the matrix would need ``dim²`` entries).
        """
        check_int("max_dim", max_dim, minimum=1)
        check_int("chunk", chunk, minimum=1)
        if self.dim > max_dim:
            raise ValueError(
                f"Invalid max_dim: {max_dim!r} (the operator has dim={self.dim}; a dense matrix "
                f"needs dim² = {self.dim**2:,} entries: raise max_dim deliberately)"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.cat(
            [self.matmat(eye[:, j : j + chunk]) for j in range(0, self.dim, chunk)], dim=1
        )

    def release(self) -> None:
        """Free cached graphs now (they are rebuilt on the next product)."""
        self._engine.release()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, mode={self.mode!r}, dtype={self.dtype}, "
            f"device={self.device}, batches={len(self.functional.batches)}, "
            f"num_products={self.num_products})"
        )


class HessianOperator(CurvatureOperator):
    """The Hessian ``H = ∇²L(θ)`` of the mean loss over ``data`` as a linear operator.

    ``L(θ) = (1/B) Σ_{b=1}^{B} loss_fn(model(x_b; θ), y_b)`` over the trainable parameters θ
    (``requires_grad=True``; tied weights once), so ``H = (1/B) Σ_b ∇²ℓ_b(θ)``. The operator is
    a snapshot at construction (which is cheap and computes nothing): build a new one after an
    optimizer step; a product after an in-place change of a parameter raises ``RuntimeError``.

    Args:
        model: any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``; for mapping batches
            ``loss_fn(outputs, batch)``; ``None`` for the model's own ``outputs.loss``
            (Hugging Face models given ``labels``); or :class:`~sdopt.curvature.ModelLoss`
            ``(fn)`` with ``fn(model, batch)`` for any other batch.
        data: one batch or a sequence / ``DataLoader`` of batches; a batch is an
            ``(inputs, targets)`` pair or a mapping of the model's keyword arguments
            (``model(**batch)``); see :func:`sdopt.curvature.functional.normalize_batches`.
        mode: ``"auto"`` (default: :func:`default_mode`, ``"reuse"`` on CPU, ``"autotune"``
            elsewhere), ``"autotune"``, ``"reuse"``, ``"fwd-rev"``, ``"rev-rev"``,
            ``"double-backward"``, ``"linearize"`` or ``"finite-difference"``
            (see :mod:`sdopt.curvature.products`).
        chunk_size: most columns per vectorised block product (``None``: the whole block).
        vectorize: compute the columns of :meth:`matmat` together (``vmap`` or
            ``is_grads_batched``) rather than one after another. Off by default: on the CPU
            it was slower per vector on both benchmark workloads.
        dropout: ``"off"`` (dropout as identity) or ``"fixed"`` (seeded masks, the same on
            every pass); see :mod:`sdopt.curvature.functional`.
        dropout_seed: seed for ``dropout="fixed"``.
        distributed: ``None`` averages products and gradients across ranks when
            ``torch.distributed`` is initialised; ``True`` requires it; ``False`` never averages.
        fallback: when the first product fails because an op lacks double backward or
            forward-mode AD, warn (:class:`CurvatureFallbackWarning`) and switch mode
            (``"reuse"`` → ``"fwd-rev"`` → ``"finite-difference"``). An error that the
            model or ``loss_fn`` raises on a plain forward and backward pass too is the
            user's, not the mode's: it is re-raised as is, with no fallback.
        check_finite: reject non-finite vectors (``ValueError``) and raise
            ``FloatingPointError`` on a non-finite product.

    Attributes:
        dim: number of trainable scalars; ``shape == (dim, dim)``.
        num_products: Hessian-vector products so far (a ``(dim, m)`` block counts ``m``).
        mode: the resolved product mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> X = torch.randn(32, 3, dtype=torch.float64)
        >>> y = torch.randn(32, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False, dtype=torch.float64)
        >>> op = HessianOperator(model, nn.functional.mse_loss, (X, y))
        >>> torch.allclose(op.to_dense(), 2 / 32 * X.T @ X)  # least squares: H = 2/N XᵀX
        True
    """


def hvp(
    model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any, v: Tensor, **kwargs: Any
) -> Tensor:
    """One-shot Hessian-vector product ``H v`` (``v`` of shape ``(dim,)`` or ``(dim, m)``).

    Builds a :class:`HessianOperator` (``kwargs`` are its keyword arguments) and applies it.
    For several products at the same parameters keep the operator instead: it reuses its
    gradient graph.
    """
    return HessianOperator(model, loss_fn, data, **kwargs) @ v
