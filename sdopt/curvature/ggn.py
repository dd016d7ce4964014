"""The generalised Gauss–Newton operator ``G = (1/B) Σ_b J_bᵀ H_b J_b``.

With ``z_b = model(x_b; θ)`` the outputs of batch ``b``, ``J_b = ∂z_b/∂θ`` and
``H_b = ∇²_z loss_fn(z_b, y_b)`` the Hessian of the loss in the outputs, the Hessian splits as
``∇²L = G + (1/B) Σ_b Σ_k (∂ℓ_b/∂z_k) ∇²z_k``. ``G`` drops the second term; it is positive
semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE) and is the usual
curvature proxy of natural-gradient and Gauss–Newton methods.

Output Hessians ``H_b`` (``loss=``):

- ``"auto"``: differentiate ``loss_fn`` twice in the outputs (exact for any loss; PSD iff the
  loss is convex in the outputs);
- ``"cross_entropy"``: closed form ``(diag(s) − s sᵀ)/N`` per sample, ``s = softmax(z)`` over
  dimension 1, for ``F.cross_entropy`` with ``reduction="mean"`` over ``N`` samples (hard or soft
  targets, label smoothing; not class weights or ``ignore_index``: use ``"auto"`` there);
- ``"mse"``: closed form ``2/numel(z) · I`` for ``F.mse_loss`` with ``reduction="mean"``.

Products (``mode=``): ``"reuse"`` keeps the output graph and a ``Jᵀu`` graph per batch and gets
``J v`` by differentiating ``Jᵀu`` in ``u`` (double backward, no forward-mode AD needed);
``"fwd-rev"`` gets ``J v`` by ``torch.func.jvp`` and ``Jᵀ`` from a retained ``vjp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from sdopt._checks import check_choice
from sdopt.curvature.functional import FunctionalLoss, ModelLoss
from sdopt.curvature.operators import CurvatureOperator
from sdopt.curvature.products import ProductEngine, _differentiate, _leaves

__all__ = ["GGNOperator"]

GGN_LOSSES = ("auto", "cross_entropy", "mse")


def _output_hessian(
    kind: str, loss_fn: Callable, z: Tensor, targets: Any
) -> Callable[[Tensor], Tensor]:
    """``t -> H_out t`` at outputs ``z`` (detached)."""
    z = z.detach()
    if kind == "cross_entropy":
        if z.ndim < 2:
            raise ValueError(
                f"Invalid loss: 'cross_entropy' needs outputs of shape (N, C, ...), got {tuple(z.shape)}"
            )
        s = torch.softmax(z, dim=1)
        n = z.numel() // z.shape[1]
        return lambda t: (s * t - s * (s * t).sum(dim=1, keepdim=True)) / n
    if kind == "mse":
        scale = 2.0 / z.numel()
        return lambda t: scale * t
    zz = z.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zz, targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("Invalid loss_fn: must return a scalar 0-d tensor")
        (gz,) = torch.autograd.grad(loss, zz, create_graph=True)
    return lambda t: _differentiate((gz,), (zz,), [t], retain_graph=True)[0]


def _outputs(f: FunctionalLoss, params, index: int) -> Tensor:
    z = f.batch_outputs(params, index)
    if not isinstance(z, Tensor):
        raise ValueError(
            f"Invalid model: GGNOperator needs a tensor output, got {type(z).__name__}"
        )
    return z


class _GGNReuse(ProductEngine):
    name = "reuse"

    def __init__(self, f: FunctionalLoss, loss_kind: str, **kw):
        super().__init__(f, **kw)
        self.loss_kind = loss_kind
        self._states: list[tuple[Any, ...]] | None = None

    def _ensure(self):
        if self._states is None:
            states = []
            for index in range(len(self.f.batches)):
                q = _leaves(self.f.params)
                with torch.enable_grad():
                    z = _outputs(self.f, q, index)
                    u = torch.zeros_like(z, requires_grad=True)
                    jt = torch.autograd.grad(
                        z, q, u, create_graph=True, allow_unused=True, materialize_grads=True
                    )
                hout = _output_hessian(self.loss_kind, self.f.loss_fn, z, self.f.batches[index][1])
                states.append((q, z, u, jt, hout))
            self._states = states
        return self._states

    def matvec(self, v: Tensor) -> Tensor:
        tangents = self.f.unflatten(v)
        total: Tensor | None = None
        for q, z, u, jt, hout in self._ensure():
            jv = _differentiate(jt, (u,), tangents, retain_graph=True)[0]
            out = _differentiate((z,), q, [hout(jv)], retain_graph=True)
            flat = self.f.flatten(out)
            total = flat if total is None else total + flat
        assert total is not None
        n = len(self.f.batches)
        return total / n if n > 1 else total

    def release(self) -> None:
        self._states = None


class _GGNForward(ProductEngine):
    name = "fwd-rev"

    def __init__(self, f: FunctionalLoss, loss_kind: str, **kw):
        super().__init__(f, **kw)
        self.loss_kind = loss_kind
        self._states: list[tuple[Any, ...]] | None = None

    def _ensure(self):
        if self._states is None:
            states = []
            for index in range(len(self.f.batches)):
                z, vjp_fn = vjp(lambda p, i=index: _outputs(self.f, p, i), self.f.params)
                hout = _output_hessian(self.loss_kind, self.f.loss_fn, z, self.f.batches[index][1])
                states.append((vjp_fn, hout))
            self._states = states
        return self._states

    def matvec(self, v: Tensor) -> Tensor:
        tangents = tuple(self.f.unflatten(v))
        total: Tensor | None = None
        for index, (vjp_fn, hout) in enumerate(self._ensure()):
            _, jv = jvp(lambda p, i=index: _outputs(self.f, p, i), (self.f.params,), (tangents,))
            flat = self.f.flatten(vjp_fn(hout(jv))[0])
            total = flat if total is None else total + flat
        assert total is not None
        n = len(self.f.batches)
        return total / n if n > 1 else total

    def release(self) -> None:
        self._states = None


class GGNOperator(CurvatureOperator):
    """Generalised Gauss–Newton matrix ``G = (1/B) Σ_b J_bᵀ H_b J_b`` (PSD) as an operator.

    Same interface as :class:`~sdopt.curvature.HessianOperator` (``dim``, ``matvec``,
    ``matmat``, ``num_products``, ``loss_and_gradient``, ``to_dense``, ...).

    Args:
        model: any ``nn.Module`` returning one tensor.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        data: one ``(inputs, targets)`` batch or a sequence of them.
        loss: ``"auto"`` (differentiate ``loss_fn``), ``"cross_entropy"`` or ``"mse"`` (closed
            forms for the mean-reduced losses; see the module docstring).
        mode: ``"auto"`` (= ``"reuse"``), ``"reuse"`` or ``"fwd-rev"``; failures fall back to
            the other one with a warning.
        **kwargs: ``dropout``, ``dropout_seed``, ``distributed``, ``fallback``,
            ``check_finite`` as for :class:`~sdopt.curvature.HessianOperator`.
    """

    _modes = ("auto", "reuse", "fwd-rev")
    _fallback_order = ("reuse", "fwd-rev")

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        loss: str = "auto",
        mode: str = "auto",
        **kwargs: Any,
    ) -> None:
        check_choice("loss", loss, GGN_LOSSES)
        if loss_fn is None or isinstance(loss_fn, ModelLoss):
            raise ValueError(
                f"Invalid loss_fn: {loss_fn!r} (GGNOperator needs loss_fn(outputs, targets): "
                "the Gauss-Newton matrix is built from the loss's Hessian in the model's outputs)"
            )
        self.loss_kind = loss
        for name in ("vectorize", "chunk_size"):
            if name in kwargs:
                raise ValueError(
                    f"Invalid {name}: {kwargs[name]!r} (GGNOperator computes columns one by one)"
                )
        check_choice("mode", mode, self._modes)
        super().__init__(model, loss_fn, data, mode="reuse" if mode == "auto" else mode, **kwargs)
        self.requested_mode = mode

    def _make_engine(self, mode: str) -> ProductEngine:
        engine = {"reuse": _GGNReuse, "fwd-rev": _GGNForward}[mode]
        return engine(self.functional, self.loss_kind)
