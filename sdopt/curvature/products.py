"""Hessian-vector product engines, one per mode, all on a :class:`FunctionalLoss`.

Every engine maps flat vectors to flat vectors, ``v -> H v`` with ``H = ∇²L(θ)`` and ``L`` the
mean over batches of the batch losses. Modes:

| mode | how | per product (2-core CPU) |
|---|---|---|
| `"reuse"` | gradient graph built once (`create_graph`), one double backward per product on it (`retain_graph`) | ~1.6–2.0 gradients |
| `"fwd-rev"` | `jvp(grad(L))`: forward-over-reverse | ~3.3–4.4 |
| `"rev-rev"` | `vjp(grad(L))`: reverse-over-reverse | ~3.0–3.3 |
| `"double-backward"` | gradient graph rebuilt for every product | ~2.9–3.3 |
| `"linearize"` | `linearize(grad(L))` traced once, then replayed | ~1.7–2.0 (+20–250 once) |
| `"finite-difference"` | `(∇L(θ + hv) − ∇L(θ − hv)) / 2h`, `h ∝ ε^{1/3}` | 2 gradients, approximate |

Blocks ``V`` of shape ``(dim, m)``: with ``vectorize=True`` the functional modes ``vmap`` one
product over the columns and the graph modes pass ``is_grads_batched=True``, both in chunks
of at most ``chunk_size`` columns (memory grows with the chunk); otherwise columns are done
one after another.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from sdopt.curvature.functional import FunctionalLoss

__all__ = ["ENGINES", "CurvatureApproximationWarning", "ProductEngine", "plain_evaluation_error"]


def _leaves(params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(p.detach().requires_grad_(True) for p in params)


def _differentiate(
    outputs: tuple[Tensor, ...],
    inputs: tuple[Tensor, ...],
    cotangents: list[Tensor],
    *,
    retain_graph: bool,
    batched: bool = False,
) -> list[Tensor]:
    """``autograd.grad`` that tolerates outputs without a graph and inputs left unused."""
    keep = [i for i, out in enumerate(outputs) if out.requires_grad]
    if not keep:
        if batched:
            m = cotangents[0].shape[0]
            return [torch.zeros(m, *p.shape, dtype=p.dtype, device=p.device) for p in inputs]
        return [torch.zeros_like(p) for p in inputs]
    grads = list(
        torch.autograd.grad(
            [outputs[i] for i in keep],
            inputs,
            grad_outputs=[cotangents[i] for i in keep],
            retain_graph=retain_graph,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
    )
    if batched:  # an unused input's materialised zeros come back without the batch dimension
        m = cotangents[keep[0]].shape[0]
        grads = [
            g.expand(m, *p.shape).contiguous() if g.dim() == p.dim() else g
            for g, p in zip(grads, inputs)
        ]
    return grads


class ProductEngine:
    """Base class: ``matvec``/``matmat`` on flat vectors; call inside ``f.evaluation()``."""

    name = "base"

    def __init__(
        self, f: FunctionalLoss, *, vectorize: bool = False, chunk_size: int | None = None
    ):
        self.f = f
        self.vectorize = vectorize
        self.chunk_size = chunk_size

    def matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _columns(self, V: Tensor) -> Tensor:
        """Column by column, each column made contiguous first (strided columns of a
        ``(dim, m)`` block would make every kernel of the product read strided memory)."""
        rows = V.t().contiguous()
        return torch.stack([self.matvec(row) for row in rows], dim=1)

    def _block(self, V: Tensor) -> Tensor:
        """A vectorised block product (``vectorize=True``); default: column by column."""
        return self._columns(V)

    def matmat(self, V: Tensor) -> Tensor:
        if not self.vectorize or V.shape[1] == 1:
            return self._columns(V)
        step = self.chunk_size or V.shape[1]
        return torch.cat(
            [self._block(V[:, j : j + step]) for j in range(0, V.shape[1], step)], dim=1
        )

    def release(self) -> None:
        """Drop cached graphs."""

    def loss_and_gradient(self) -> tuple[Tensor, Tensor] | None:
        """Loss and flat gradient if the engine already holds them, else ``None``."""
        return None


class _FunctionalEngine(ProductEngine):
    """Modes built from ``torch.func`` transforms, one batch at a time (bounded memory)."""

    def _batch_product(self, index: int, tangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        f = self.f
        tangents = tuple(f.unflatten(v))
        total: Tensor | None = None
        for index in range(len(f.batches)):
            flat = f.flatten(self._batch_product(index, tangents))
            total = flat if total is None else total + flat
        assert total is not None
        return total / len(f.batches) if len(f.batches) > 1 else total

    def _block(self, V: Tensor) -> Tensor:
        return vmap(self.matvec, in_dims=1, out_dims=1, randomness="same")(V)


class ForwardOverReverse(_FunctionalEngine):
    name = "fwd-rev"

    def _batch_product(self, index, tangents):
        def gradient(params):
            return grad(lambda p: self.f.batch_loss(p, index))(params)

        return jvp(gradient, (self.f.params,), (tangents,))[1]


class ReverseOverReverse(_FunctionalEngine):
    name = "rev-rev"

    def _batch_product(self, index, tangents):
        gradient = grad(lambda p: self.f.batch_loss(p, index))
        _, vjp_fn = vjp(gradient, self.f.params)
        return vjp_fn(tangents)[0]

    def _block(self, V: Tensor) -> Tensor:
        f = self.f
        total: Tensor | None = None
        for index in range(len(f.batches)):
            gradient = grad(lambda p, i=index: f.batch_loss(p, i))
            _, vjp_fn = vjp(gradient, f.params)

            def product(v, vjp_fn=vjp_fn):
                return f.flatten(vjp_fn(tuple(f.unflatten(v)))[0])

            out = vmap(product, in_dims=1, out_dims=1, randomness="same")(V)
            total = out if total is None else total + out
        assert total is not None
        return total / len(f.batches) if len(f.batches) > 1 else total


class Linearize(ProductEngine):
    """``linearize(grad(L))``: trace ``v -> jvp(grad L)(θ; v)`` once, fold constants, replay.

    Refused (``NotImplementedError``, so the operator falls back) on models with recurrent
    layers (``nn.LSTM``/``GRU``/``RNN``): tracing them crashes torch 2.13.

    Built like ``torch.func.linearize`` (``make_fx`` then constant folding), with one repair:
    in torch 2.13 the traced graph contains in-place ops (e.g. from the backward of
    ``binary_cross_entropy_with_logits``) that overwrite its own folded constants, so a
    second replay of ``torch.func.linearize``'s function returns wrong products. The
    constants that a replay mutates are detected on the first product and restored before
    every later one. Replay is cheap per product, but the one-off trace costs tens to hundreds
    of gradients and the folded constants take memory; blocks are done column by column.
    """

    name = "linearize"

    def __init__(self, f, **kw):
        super().__init__(f, **kw)
        self._graph: Any = None
        self._restore: list[tuple[Tensor, Tensor]] | None = None

    def _build(self) -> None:
        from torch.fx.experimental import const_fold
        from torch.fx.experimental.proxy_tensor import make_fx

        f = self.f
        rnns = sorted({type(m).__name__ for m in f.model.modules() if isinstance(m, nn.RNNBase)})
        if rnns:  # refuse rather than crash the process (not catchable)
            raise NotImplementedError(
                f"mode 'linearize' does not support {', '.join(rnns)}: tracing "
                "forward-over-reverse through a recurrent layer with make_fx crashes torch 2.13 "
                "(segmentation fault); use 'reuse', 'rev-rev' or 'double-backward'"
            )
        gradient = grad(f.loss)

        def trace(*tangents):
            return tuple(jvp(gradient, (f.params,), (tangents,))[1])

        zeros = tuple(torch.zeros_like(p) for p in f.params)
        with warnings.catch_warnings():  # torch's constant folding warns about its own fx graph
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            graph = const_fold.split_const_subgraphs(make_fx(trace)(*zeros))
            graph.run_folding()
        self._graph = graph
        self._constants = [
            value
            for module in graph.modules()
            for value in (
                *vars(module).values(),
                *module._parameters.values(),
                *module._buffers.values(),
            )
            if isinstance(value, Tensor) and value.device.type != "meta"
        ]

    def matvec(self, v: Tensor) -> Tensor:
        if self._graph is None:
            self._build()
        tangents = tuple(self.f.unflatten(v))
        if self._restore is None:  # first replay: find the constants that replays overwrite
            snapshots = [t.detach().clone() for t in self._constants]
            out = self._graph(*tangents)
            self._restore = [
                (t, snap) for t, snap in zip(self._constants, snapshots) if not torch.equal(t, snap)
            ]
            for t, snap in self._restore:
                t.detach().copy_(snap)
            return self.f.flatten(out)
        for t, snap in self._restore:
            t.detach().copy_(snap)
        return self.f.flatten(self._graph(*tangents))

    def _block(self, V: Tensor) -> Tensor:
        return self._columns(V)

    def release(self) -> None:
        self._graph = None
        self._restore = None
        self._constants = []


class DoubleBackward(ProductEngine):
    """Graph rebuilt for every product (or every vectorised block), one batch at a time."""

    name = "double-backward"

    def _graph(self, index: int):
        q = _leaves(self.f.params)
        with torch.enable_grad():
            loss = self.f.batch_loss(q, index)
            g = torch.autograd.grad(
                loss, q, create_graph=True, allow_unused=True, materialize_grads=True
            )
        return q, g

    def matvec(self, v: Tensor) -> Tensor:
        f = self.f
        tangents = f.unflatten(v)
        total: Tensor | None = None
        for index in range(len(f.batches)):
            q, g = self._graph(index)
            flat = f.flatten(_differentiate(g, q, tangents, retain_graph=False))
            total = flat if total is None else total + flat
        assert total is not None
        return total / len(f.batches) if len(f.batches) > 1 else total

    def _block(self, V: Tensor) -> Tensor:
        f = self.f
        tangents = f.unflatten_columns(V)
        total: Tensor | None = None
        for index in range(len(f.batches)):
            q, g = self._graph(index)
            out = f.flatten_columns(
                _differentiate(g, q, tangents, retain_graph=False, batched=True)
            )
            total = out if total is None else total + out
        assert total is not None
        return total / len(f.batches) if len(f.batches) > 1 else total


class ReuseGraph(ProductEngine):
    """One gradient graph for the whole operator (built on the first product), reused."""

    name = "reuse"

    def __init__(self, f, **kw):
        super().__init__(f, **kw)
        self._state: tuple[Any, ...] | None = None

    def _ensure(self):
        if self._state is None:
            q = _leaves(self.f.params)
            with torch.enable_grad():
                loss = self.f.loss(q)
                g = torch.autograd.grad(
                    loss, q, create_graph=True, allow_unused=True, materialize_grads=True
                )
            self._state = (q, g, loss.detach(), self.f.flatten([t.detach() for t in g]))
        return self._state

    def matvec(self, v: Tensor) -> Tensor:
        q, g, _, _ = self._ensure()
        return self.f.flatten(_differentiate(g, q, self.f.unflatten(v), retain_graph=True))

    def _block(self, V: Tensor) -> Tensor:
        q, g, _, _ = self._ensure()
        tangents = self.f.unflatten_columns(V)
        return self.f.flatten_columns(
            _differentiate(g, q, tangents, retain_graph=True, batched=True)
        )

    def release(self) -> None:
        self._state = None

    def loss_and_gradient(self):
        if self._state is None:
            return None
        return self._state[2], self._state[3]


def flat_gradient(
    f: FunctionalLoss, params: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, Tensor]:
    """Mean loss and flat gradient at ``params`` (default: the stored ones), detached."""
    q = _leaves(f.params if params is None else params)
    with torch.enable_grad():
        loss = f.loss(q)
        g = torch.autograd.grad(loss, q, allow_unused=True, materialize_grads=True)
    return loss.detach(), f.flatten(g)


def plain_evaluation_error(f: FunctionalLoss) -> Exception | None:
    """The error a plain loss-and-gradient evaluation of ``f`` raises, or ``None``.

    Plain means one forward pass and one ordinary backward pass: no ``torch.func`` transform,
    no double backward, no forward-mode AD. A product that fails while this succeeds failed in
    the product machinery (an op without a double-backward or forward-mode formula), which
    another mode may avoid; a product that fails *with* it failed in the user's own code
    (``model`` or ``loss_fn``), which no mode can avoid: that error is the user's to see.
    Call inside ``f.evaluation()``.
    """
    try:
        flat_gradient(f)
    except Exception as error:  # any failure of the user's code counts
        return error
    return None


class CurvatureApproximationWarning(UserWarning):
    """Hessian-vector products are finite-difference approximations, not exact."""


class FiniteDifference(ProductEngine):
    """Central differences of the gradient: ``H v ≈ (g(θ + h v) − g(θ − h v)) / (2h)``.

    The last resort, for models with neither double backward nor forward-mode AD (e.g. a
    custom ``autograd.Function`` that is only once differentiable). Approximate, so:

    - **float64 evaluation** where possible: a float32/float16/bfloat16 model's gradients at
      ``θ ± h v`` are evaluated on a float64 copy of the parameters, buffers and floating
      inputs (the module is shared; if its code refuses float64 the model's dtype is used),
      and the difference is accumulated in float64;
    - **a step for the evaluation dtype**: ``‖h v‖ = ε^{1/3} max(1, rms θ)`` with ``ε`` that
      dtype's machine epsilon (about 6e-6 in float64), which balances the ``O(h²)``
      truncation against the ``O(ε/h)`` rounding error per coordinate;
    - **a self-check** on the first product: the estimate at ``h`` is compared with the one at
      ``h/4``; while they disagree by more than ``√ε`` (a kink such as a ReLU crossed, or
      rounding), the step is quartered (at most three times) and the pair that agrees best
      gives the step. The measured discrepancy is :attr:`discrepancy`, and a
      :class:`CurvatureApproximationWarning` says that the products are approximate and how
      far the two steps disagreed.
    """

    name = "finite-difference"
    QUARTERINGS = 3

    def __init__(self, f, **kw):
        super().__init__(f, **kw)
        self._g: FunctionalLoss | None = None
        self._scale = 0.0
        self.discrepancy: float | None = None
        self.evaluation_dtype: torch.dtype | None = None

    def _setup(self) -> None:
        f = self.f
        g = f
        if f.dtype != torch.float64 and f.device.type != "mps":
            try:
                wide = f.astype(torch.float64)
                flat_gradient(wide)
                g = wide
            except Exception:  # the model's code refuses float64: evaluate in its own dtype
                g = f
        self._g = g
        self.evaluation_dtype = g.dtype
        eps = torch.finfo(g.dtype).eps
        sq = sum(float((p.double() ** 2).sum()) for p in g.params)
        rms = math.sqrt(sq / max(g.dim, 1))
        self._scale = eps ** (1.0 / 3.0) * max(1.0, rms)

    def _estimate(self, v64: Tensor, step: float) -> Tensor:
        g = self._g
        assert g is not None
        h = step / float(torch.linalg.vector_norm(v64))
        tangents = g.unflatten(v64.to(g.dtype))
        plus = tuple(p + h * t for p, t in zip(g.params, tangents))
        minus = tuple(p - h * t for p, t in zip(g.params, tangents))
        return (flat_gradient(g, plus)[1].double() - flat_gradient(g, minus)[1].double()) / (
            2.0 * h
        )

    def matvec(self, v: Tensor) -> Tensor:
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0.0 or not math.isfinite(v_norm):
            return torch.zeros_like(v) if v_norm == 0.0 else v * float("nan")
        if self._g is None:
            self._setup()
        v64 = v.double()
        if self.discrepancy is not None:
            return self._estimate(v64, self._scale).to(v.dtype)
        return self._calibrate(v64).to(v.dtype)

    def _calibrate(self, v64: Tensor) -> Tensor:
        """First product: pick the step by the self-check, warn with the discrepancy."""
        assert self._g is not None
        tol = math.sqrt(torch.finfo(self._g.dtype).eps)
        step = self._scale
        current = self._estimate(v64, step)
        best = (math.inf, step, current)
        for _ in range(self.QUARTERINGS + 1):
            finer = self._estimate(v64, step / 4.0)
            scale = float(torch.linalg.vector_norm(finer))
            diff = float(torch.linalg.vector_norm(current - finer))
            delta = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
            if not math.isfinite(delta):  # a non-finite product: reported by the operator
                best = (delta, step, current)
                break
            if delta < best[0]:
                best = (delta, step, current)
            if delta <= tol:
                break
            step, current = step / 4.0, finer
        delta, self._scale, out = best
        self.discrepancy = delta
        if math.isfinite(delta):
            g = self._g
            where = (
                f"evaluated in {g.dtype} for a {self.f.dtype} model"
                if g.dtype != self.f.dtype
                else f"evaluated in {g.dtype}"
            )
            warnings.warn(
                "sdopt: Hessian-vector products by finite differences are approximate "
                f"(central differences of the gradient, {where}, step ‖h v‖ = "
                f"{self._scale:.1e}); on the first product the steps h and h/4 disagree by "
                f"{delta:.1e} relative",
                CurvatureApproximationWarning,
                stacklevel=2,
            )
        return out


ENGINES: dict[str, type[ProductEngine]] = {
    "reuse": ReuseGraph,
    "fwd-rev": ForwardOverReverse,
    "rev-rev": ReverseOverReverse,
    "double-backward": DoubleBackward,
    "linearize": Linearize,
    "finite-difference": FiniteDifference,
}


class Autotune(ProductEngine):
    """Time candidate modes on the first real products, keep the fastest.

    Each candidate does two products (the first absorbs one-off costs such as building the
    graph); the second is timed (with ``torch.cuda.synchronize`` on CUDA). Products made while
    tuning are real products and are returned. A candidate that raises is dropped.
    """

    name = "autotune"
    CANDIDATES = ("reuse", "fwd-rev", "rev-rev")

    def __init__(self, f, **kw):
        super().__init__(f, **kw)
        self._kw = kw
        self._pending = list(self.CANDIDATES)
        self._engines: dict[str, ProductEngine] = {}
        self._calls: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.chosen: ProductEngine | None = None

    def _sync(self):
        if self.f.device.type == "cuda":
            torch.cuda.synchronize(self.f.device)

    def matvec(self, v: Tensor) -> Tensor:
        if self.chosen is not None:
            return self.chosen.matvec(v)
        while self._pending:
            name = self._pending[0]
            engine = self._engines.setdefault(name, ENGINES[name](self.f, **self._kw))
            self._sync()
            start = time.perf_counter()
            try:
                out = engine.matvec(v)
            except (RuntimeError, NotImplementedError) as error:
                if plain_evaluation_error(self.f) is not None:
                    raise  # the user's model or loss_fn fails: no candidate can do better
                first = (str(error).splitlines() or [""])[0]
                self.errors[name] = f"{type(error).__name__}: {first}"
                engine.release()
                del self._engines[name]
                self._pending.pop(0)
                continue
            self._sync()
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] >= 2:
                self.timings[name] = time.perf_counter() - start
                self._pending.pop(0)
            if not self._pending:
                self._choose()
            return out
        self._choose()
        assert self.chosen is not None
        return self.chosen.matvec(v)

    def _choose(self) -> None:
        if not self.timings:
            raise RuntimeError(f"autotune: every candidate mode failed: {self.errors}")
        best = min(self.timings, key=self.timings.__getitem__)
        for name, engine in self._engines.items():
            if name != best:
                engine.release()
        self.chosen = self._engines[best]
        self.chosen.vectorize = self.vectorize
        self._engines = {best: self.chosen}

    def matmat(self, V: Tensor) -> Tensor:
        if self.chosen is not None:
            return self.chosen.matmat(V)
        return self._columns(V)

    def release(self) -> None:
        for engine in self._engines.values():
            engine.release()

    def loss_and_gradient(self):
        return self.chosen.loss_and_gradient() if self.chosen is not None else None


ENGINES["autotune"] = Autotune
