"""A functional view of ``loss_fn(model(inputs), targets)`` over the trainable parameters.

:class:`FunctionalLoss` turns a stateful ``nn.Module`` into a pure function of a tuple of
parameter tensors, ``L(θ) = (1/B) Σ_b loss_fn(model(x_b; θ, buffers), y_b)``, through
:func:`torch.func.functional_call`. Every Hessian-vector product mode of
:mod:`sdopt.curvature` and the differentiable sharpness-dimension penalty are built on it; it
is differentiable to any order (``torch.func.grad``/``jvp``/``vjp``/``vmap`` or
``torch.autograd.grad(..., create_graph=True)``), so third derivatives
``D³L[u, u, ·]`` work through it.

Side effects are confined (Tuci et al., "Generalization at the Edge of Stability",
arXiv:2604.19740, need the Hessian of the training loss *at one weight vector*, with nothing
else changing):

- only parameters with ``requires_grad=True`` are variables (tied weights once, the first name
  ``named_parameters()`` reports); frozen parameters are read from the module as constants;
- buffers are cloned once at construction and BatchNorm layers in training mode are evaluated
  with batch statistics *without* updating running statistics, so the module's buffers are
  never mutated;
- attention: every pass runs scaled-dot-product attention on its math kernel and with the
  ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` fast paths off, the only path with a
  double backward and forward-mode AD (fused kernels have neither);
- dropout: ``dropout="off"`` (default) puts every module except BatchNorm / InstanceNorm in
  eval mode for the pass, so dropout modules *and* dropout a module gates on its own
  ``training`` flag (Hugging Face attention, ``F.dropout(x, training=self.training)``, LSTM
  inter-layer dropout) are off; ``dropout="fixed"`` keeps dropout active but reseeds the
  random number generator with ``dropout_seed`` before every forward pass, so every pass
  draws the *same* masks. In both modes the generator is reseeded before each pass, so
  randomness that no flag gates is at least the same draw each time (with ``"off"`` it is
  reported once by a :class:`CurvatureRandomnessWarning`). Either way the loss is a fixed
  deterministic function of θ, which a linear operator needs (a fresh mask per product
  would make every product belong to a different matrix, and Lanczos would silently break);
- batches: ``(inputs, targets)`` pairs, mappings (``model(**batch)``, ``loss_fn(outputs,
  batch)``, ``loss_fn=None`` for ``outputs.loss``) or, with :class:`ModelLoss`, anything
  ``fn(model, batch)`` accepts (see :func:`normalize_batches`);
- module ``training`` and ``track_running_stats`` flags, the attention backend flags,
  ``.grad`` fields and the global RNG state are exactly as before after every evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from sdopt._checks import check_choice, check_int

__all__ = [
    "CurvatureRandomnessWarning",
    "FunctionalLoss",
    "ModelLoss",
    "make_functional_loss",
    "normalize_batches",
]

DROPOUT_CHOICES = ("off", "fixed")

Batch = tuple[Any, Any]


class CurvatureRandomnessWarning(UserWarning):
    """The model draws random numbers during a curvature pass with ``dropout="off"``."""


def _math_attention() -> contextlib.AbstractContextManager[Any]:
    """Scaled-dot-product attention on its math kernel (the only one with double backward
    and forward-mode AD; fused CPU/CUDA kernels have neither)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel(SDPBackend.MATH)


def _get_fastpath() -> bool:
    getter = getattr(torch.backends.mha, "get_fastpath_enabled", None)
    return bool(getter()) if getter is not None else True


def _set_fastpath(value: bool) -> None:
    """The ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` fused inference fast path."""
    setter = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    if setter is not None:
        setter(value)


def _is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2


def _is_tensor_pair(obj: Any) -> bool:
    """An ``(inputs, targets)`` pair: two elements, at least one of them a tensor."""
    return _is_pair(obj) and (isinstance(obj[0], Tensor) or isinstance(obj[1], Tensor))


class ModelLoss:
    """A loss that calls the model itself: ``fn(model, batch) -> 0-d tensor``.

    For batches that are neither an ``(inputs, targets)`` pair nor a mapping of the model's
    keyword arguments (a 3-tuple with sample weights, a custom batch object, a model with two
    inputs and a loss on an intermediate output...). Inside ``fn``, ``model`` is the module
    itself, evaluated at the parameters of the curvature pass: call it (or its submodules)
    any way you like. ``data`` is then one batch, or a ``list`` / ``DataLoader`` / other
    iterable (not a tuple, tensor or mapping) of batches.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from sdopt import HessianOperator
        >>> model = nn.Linear(3, 1, dtype=torch.float64)
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> w = torch.rand(8, 1, dtype=torch.float64)
        >>> loss = ModelLoss(lambda m, b: (b[2] * (m(b[0]) - b[1]) ** 2).mean())
        >>> HessianOperator(model, loss, (x, y, w)).dim
        4
    """

    def __init__(self, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        if not callable(fn):
            raise ValueError(f"Invalid loss_fn: ModelLoss({fn!r}) (fn must be callable)")
        self.fn = fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.fn(model, batch)

    def __repr__(self) -> str:
        return f"ModelLoss({getattr(self.fn, '__name__', self.fn)!r})"


class _ModelLossCaller(nn.Module):
    """``forward(batch) = fn(model, batch)``: lets ``functional_call`` swap the parameters of
    ``model`` (keys prefixed with ``"model."``) for a :class:`ModelLoss`."""

    def __init__(self, model: nn.Module, fn: ModelLoss) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


def _outputs_loss(outputs: Any, batch: Any) -> Tensor:
    """``loss_fn=None``: the loss the model computed itself (``outputs.loss``, as Hugging Face
    models return when the batch has ``labels``)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"Invalid loss_fn: None means the model's own outputs.loss, but the model returned "
            f"{type(outputs).__name__} without a loss (a Hugging Face model computes one when "
            "the batch has 'labels'; otherwise pass loss_fn(outputs, batch))"
        )
    return loss


_BATCH_FORMS = (
    "an (inputs, targets) pair, a mapping of the model's keyword arguments (model(**batch)), "
    "or, with loss_fn=ModelLoss(fn), anything fn(model, batch) accepts"
)


def normalize_batches(data: Any) -> list[Batch]:
    """Return ``data`` as a non-empty list of ``(inputs, targets)`` pairs.

    ``data`` is one batch or an iterable of batches (a list, a ``DataLoader``). A batch is an
    ``(inputs, targets)`` pair (``model(inputs)``, ``loss_fn(outputs, targets)``) or a mapping
    of the model's keyword arguments, such as a Hugging Face batch: it becomes the pair
    ``(batch, batch)``, so that the model is called as ``model(**batch)`` and the loss as
    ``loss_fn(outputs, batch)``. A batch of no samples (inputs or targets with a zero first
    dimension) is rejected.
    """
    if data is None:
        raise ValueError(
            f"Invalid data: None (must be one batch or a sequence of batches: {_BATCH_FORMS})"
        )
    if isinstance(data, Mapping):
        _check_not_empty((data, None), "data")
        return [(data, data)]
    if _is_tensor_pair(data):
        if not (_is_pair(data[0]) and _is_pair(data[1])):
            _check_not_empty(data, "data")
            return [(data[0], data[1])]
    if isinstance(data, Tensor):
        raise ValueError(
            f"Invalid data: a tensor of shape {tuple(data.shape)} (must be one batch or a "
            f"sequence of batches: {_BATCH_FORMS})"
        )
    try:
        batches = list(data)
    except TypeError:
        raise ValueError(
            f"Invalid data: {type(data).__name__} (must be one batch or a sequence of batches: "
            f"{_BATCH_FORMS})"
        ) from None
    if not batches:
        raise ValueError("Invalid data: an empty sequence (need at least one batch)")
    out: list[Batch] = []
    for i, batch in enumerate(batches):
        name = f"data[{i}]" if len(batches) > 1 else "data"
        if isinstance(batch, Mapping):
            _check_not_empty((batch, None), name)
            out.append((batch, batch))
            continue
        if not _is_pair(batch):
            what = (
                f"a {type(batch).__name__} of {len(batch)} elements"
                if isinstance(batch, (tuple, list))
                else type(batch).__name__
            )
            raise ValueError(f"Invalid data[{i}]: {what} (each batch must be {_BATCH_FORMS})")
        _check_not_empty(batch, name)
        out.append((batch[0], batch[1]))
    return out


def normalize_model_loss_batches(data: Any) -> list[Batch]:
    """Batches for a :class:`ModelLoss`: ``[(batch, None), ...]``.

    ``data`` is a sequence of batches when it is a ``list`` or an iterable other than a tuple,
    tensor or mapping (a ``DataLoader``, a generator); anything else is one batch.
    """
    if data is None:
        raise ValueError("Invalid data: None (must be one batch or a list / DataLoader of them)")
    one = isinstance(data, (tuple, Tensor, Mapping)) or not isinstance(data, Iterable)
    batches = [data] if one else list(data)
    if not batches:
        raise ValueError("Invalid data: an empty sequence (need at least one batch)")
    for i, batch in enumerate(batches):
        _check_not_empty((batch, None), f"data[{i}]" if len(batches) > 1 else "data")
    return [(b, None) for b in batches]


def _empty_shape(x: Any) -> tuple[int, ...] | None:
    """The shape of ``x`` if it is a batch of no samples (a tensor with ``shape[0] == 0``, or a
    tuple, list or mapping of tensors that all have one), else ``None``."""
    if isinstance(x, Tensor):
        return tuple(x.shape) if x.ndim >= 1 and x.shape[0] == 0 else None
    values = list(x.values()) if isinstance(x, Mapping) else x
    if isinstance(values, (tuple, list)):
        tensors = [v for v in values if isinstance(v, Tensor)]
        if tensors and all(_empty_shape(t) is not None for t in tensors):
            return tuple(tensors[0].shape)
    return None


def _check_not_empty(batch: Any, name: str) -> None:
    """An empty batch would make the mean loss NaN or 0 and the Hessian silently zero."""
    for part, value in (("inputs", batch[0]), ("targets", batch[1])):
        if value is None:
            continue
        shape = _empty_shape(value)
        if shape is not None:
            raise ValueError(
                f"Invalid {name}: an empty batch ({part} of shape {shape}; each batch needs at "
                "least one sample)"
            )


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``obj`` (nested tuples, lists, mappings) cast to ``dtype``."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_cast(v, dtype) for v in obj)
    if isinstance(obj, list):
        return [_cast(v, dtype) for v in obj]
    return obj


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters the curvature is taken of, without wrappers.

    DistributedDataParallel / DataParallel are stripped (their forward syncs buffers), and so
    is ``torch.compile``'s ``OptimizedModule``: curvature passes run the original module eagerly
    (compiled backward graphs refuse double backward), on the very same parameters.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch builds without dynamo
        return False
    return isinstance(model, OptimizedModule)


def _call_model(model: nn.Module, state: dict[str, Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, state, (), dict(inputs))
    if isinstance(inputs, tuple):
        return functional_call(model, state, inputs)
    return functional_call(model, state, (inputs,))


class FunctionalLoss:
    """``L(θ)``: the mean over batches of ``loss_fn(model(inputs), targets)`` as a pure function.

    Build with :func:`make_functional_loss`. ``loss(params)`` takes a tuple of tensors shaped
    like :attr:`params` (any values, e.g. perturbed or batched under ``vmap``) and returns a
    0-d tensor differentiable to any order.

    Attributes:
        model: the (unwrapped) module.
        names: names of the trainable parameters, in ``named_parameters()`` order.
        params: the trainable parameters, detached (they alias the module's storage).
        batches: the ``(inputs, targets)`` pairs.
        dim: total number of trainable scalars.
        dtype, device: those of the first trainable parameter (flat vectors use them).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        dropout: str = "off",
        dropout_seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"Invalid loss_fn: {loss_fn!r} (must be callable: loss_fn(outputs, targets), "
                "ModelLoss(fn) or None for the model's own outputs.loss)"
            )
        check_choice("dropout", dropout, DROPOUT_CHOICES)
        check_int("dropout_seed", dropout_seed)
        self.model = _unwrap(model)
        #: the loss as given (``None``: outputs.loss); :attr:`loss_fn` is what is called
        self.model_loss: ModelLoss | None = loss_fn if isinstance(loss_fn, ModelLoss) else None
        self.loss_fn: Callable[[Any, Any], Tensor] = _outputs_loss if loss_fn is None else loss_fn
        if self.model_loss is not None:
            self.batches = normalize_model_loss_batches(data)
            self._caller: nn.Module | None = _ModelLossCaller(self.model, self.model_loss)
        else:
            self.batches = normalize_batches(data)
            self._caller = None
        self.dropout = dropout
        self.dropout_seed = int(dropout_seed)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"Invalid model: {type(self.model).__name__} has no trainable parameters "
                "(no parameter with requires_grad=True)"
            )
        for n, p in named:
            if not p.is_floating_point():  # complex: the Hessian of a real loss in complex
                # parameters is not the symmetric operator the solvers assume
                raise ValueError(
                    f"Invalid model: parameter {n!r} has dtype {p.dtype} (curvature needs real "
                    "floating-point trainable parameters)"
                )
        self.names: list[str] = [n for n, _ in named]
        self.params: tuple[Tensor, ...] = tuple(p.detach() for _, p in named)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = int(sum(self.numels))
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self._versions = [p._version for p in self.params]
        # Buffers are cloned once: nothing a forward pass does can reach the module's own.
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        # Every module's flag is saved and restored around a pass; BatchNorm / InstanceNorm in
        # training mode keep it (batch statistics) with their running statistics frozen.
        self._modules = list(self.model.modules())
        self._batchnorms = [m for m in self._modules if isinstance(m, _NormBase)]
        self._random_warned = False

    # ----------------------------------------------------------------------------- flat vectors
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector of length :attr:`dim`."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Split a flat ``(dim,)`` vector into views shaped like :attr:`params`."""
        return [
            chunk.view(shape).to(p.dtype)
            for chunk, shape, p in zip(vec.split(self.numels), self.shapes, self.params)
        ]

    def unflatten_columns(self, mat: Tensor) -> list[Tensor]:
        """Split a ``(dim, m)`` block into per-parameter ``(m, *shape)`` tensors."""
        m = mat.shape[1]
        return [
            chunk.t().reshape(m, *shape).to(p.dtype)
            for chunk, shape, p in zip(mat.split(self.numels, dim=0), self.shapes, self.params)
        ]

    def flatten_columns(self, tensors: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten_columns`: per-parameter ``(m, *shape)`` -> ``(dim, m)``."""
        m = tensors[0].shape[0]
        return torch.cat([t.reshape(m, -1).to(self.dtype) for t in tensors], dim=1).t()

    def astype(self, dtype: torch.dtype) -> FunctionalLoss:
        """The same loss evaluated in ``dtype``: a copy whose parameters, floating buffers and
        floating inputs and targets are cast (the module itself is shared and not changed).

        Used by finite differences to evaluate a low-precision model's gradients in float64;
        a model whose code hard-codes its dtype may fail in another one.
        """
        other = copy.copy(self)
        other.params = tuple(p.detach().to(dtype) for p in self.params)
        other._versions = [p._version for p in other.params]
        other.buffers = {n: _cast(b, dtype) for n, b in self.buffers.items()}
        other.batches = [(_cast(x, dtype), _cast(y, dtype)) for x, y in self.batches]
        other.dtype = dtype
        return other

    # ----------------------------------------------------------------------------- evaluation
    def check_unchanged(self) -> None:
        """Raise if a trainable parameter was modified in place since construction."""
        for name, p, version in zip(self.names, self.params, self._versions):
            if p._version != version:
                raise RuntimeError(
                    f"Parameter {name!r} was modified in place after the curvature operator was "
                    "built; the operator is a snapshot at construction: build a new one after "
                    "each optimizer step"
                )

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Context for every pass: an exact, deterministic, side-effect-free forward pass.

        - attention on a path with double backward and forward-mode AD: scaled-dot-product
          attention restricted to its math kernel, the ``nn.MultiheadAttention`` /
          ``nn.TransformerEncoder`` fast paths off (fused kernels have neither);
        - ``dropout="off"``: every module except BatchNorm / InstanceNorm in eval mode, so
          dropout modules *and* dropout that a module gates on its own ``training`` flag
          (Hugging Face attention dropout, ``F.dropout(x, training=self.training)``) are off;
        - BatchNorm / InstanceNorm in training mode: batch statistics, running statistics not
          updated;
        - every module's ``training`` and ``track_running_stats``, the attention flags and the
          global RNG restored exactly on exit.
        """
        flags = [m.training for m in self._modules]
        tracking = [m.track_running_stats for m in self._batchnorms]
        fastpath = _get_fastpath()
        with torch.random.fork_rng(devices=self._rng_devices(), enabled=True), _math_attention():
            try:
                _set_fastpath(False)
                if self.dropout == "off":
                    for m in self._modules:
                        if not isinstance(m, _NormBase):
                            m.training = False
                for m in self._batchnorms:
                    if m.training:
                        # batch statistics, no running-statistics update (buffers untouched)
                        m.track_running_stats = False
                yield
            finally:
                for m, flag in zip(self._modules, flags):
                    m.training = flag
                for m, flag in zip(self._batchnorms, tracking):
                    m.track_running_stats = flag
                _set_fastpath(fastpath)

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _generators(self) -> list[torch.Generator]:
        """The generators :meth:`evaluation` forks: the CPU one and this device's."""
        gens = [torch.random.default_generator]
        if self.device.type == "cuda":
            gens.append(torch.cuda.default_generators[self.device.index or 0])
        return gens

    def batch_outputs(self, params: Sequence[Tensor], index: int) -> Any:
        """``model(x_b; params)`` for batch ``index``; call inside :meth:`evaluation`.

        The forked generators are reseeded with ``dropout_seed + index`` before the pass in
        both dropout modes, so any randomness the model still draws is the same on every pass
        (one fixed matrix). With ``dropout="off"`` such randomness (noise that no ``training``
        flag gates, e.g. ``F.dropout(x, 0.1)`` or ``torch.bernoulli`` masks) is reported once
        with a :class:`CurvatureRandomnessWarning`.
        """
        if self._caller is not None:
            raise ValueError(
                "Invalid loss_fn: a ModelLoss calls the model itself, so the model's outputs are "
                "not available (GGNOperator and other output-based tools need "
                "loss_fn(outputs, targets))"
            )
        return self._forward(self.model, "", params, index, self.batches[index][0])

    def _forward(
        self, module: nn.Module, prefix: str, params: Sequence[Tensor], index: int, inputs: Any
    ) -> Any:
        """One seeded, watched forward pass of ``module`` (the model or the ModelLoss caller)."""
        state = {prefix + n: b for n, b in self.buffers.items()}
        state.update((prefix + n, p) for n, p in zip(self.names, params))
        gens = self._generators()
        for g in gens:
            g.manual_seed(self.dropout_seed + index)
        watch = self.dropout == "off" and not self._random_warned
        before = [g.get_state() for g in gens] if watch else []
        out = _call_model(module, state, inputs)
        if watch and any(not torch.equal(g.get_state(), b) for g, b in zip(gens, before)):
            self._random_warned = True
            warnings.warn(
                f"sdopt: {type(self.model).__name__} draws random numbers during curvature "
                "passes although dropout='off' put every module except BatchNorm in eval mode "
                "(randomness that no module's training flag gates, e.g. F.dropout(x, p) or "
                "torch.bernoulli masks); each pass reseeds the generator, so the operator is the "
                "Hessian of one fixed random draw. Gate the randomness on self.training to "
                "measure the noise-free loss",
                CurvatureRandomnessWarning,
                stacklevel=2,
            )
        return out

    def batch_loss(self, params: Sequence[Tensor], index: int) -> Tensor:
        """``loss_fn(model(x_b; params), y_b)`` for batch ``index``; call inside :meth:`evaluation`."""
        if self._caller is not None:
            loss = self._forward(self._caller, "model.", params, index, (self.batches[index][0],))
        else:
            loss = self.loss_fn(self.batch_outputs(params, index), self.batches[index][1])
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"Invalid loss_fn: returned {shape} (must return a scalar 0-d tensor; use a "
                "reduction such as 'mean')"
            )
        return loss

    def loss(self, params: Sequence[Tensor]) -> Tensor:
        """Mean of the per-batch losses at ``params``; call inside :meth:`evaluation`."""
        total = self.batch_loss(params, 0)
        for index in range(1, len(self.batches)):
            total = total + self.batch_loss(params, index)
        return total / len(self.batches) if len(self.batches) > 1 else total

    def value_and_gradient(
        self, params: Sequence[Tensor] | None = None, *, create_graph: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(L(params), ∇L(params))`` with the gradient flat, side effects confined.

        Detached unless ``create_graph=True`` (then both stay differentiable in ``params``,
        which must then be tensors requiring grad, e.g. for third derivatives). Two calls at
        ``θ ± εu`` give the finite-difference estimate of ``D³L[u, u, ·]`` of THEORY §7.
        """
        base = self.params if params is None else tuple(params)
        leaves = base if create_graph else tuple(p.detach().requires_grad_(True) for p in base)
        with self.evaluation(), torch.enable_grad():
            loss = self.loss(leaves)
            grads = torch.autograd.grad(
                loss, leaves, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
        if create_graph:
            return loss, self.flatten(grads)
        return loss.detach(), self.flatten(grads).detach()

    def __call__(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """``L(params)`` (default: the stored parameters), with side effects confined."""
        if params is None:
            params = self.params
        with self.evaluation():
            return self.loss(tuple(params))


def make_functional_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    dropout: str = "off",
    dropout_seed: int = 0,
) -> FunctionalLoss:
    """Build the functional loss ``θ -> mean_b loss_fn(model(x_b; θ), y_b)``.

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` wrapper is unwrapped).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor`` (``loss_fn(outputs, batch)`` for
            mapping batches); ``None`` for the model's own ``outputs.loss``; or
            :class:`ModelLoss` ``(fn)`` with ``fn(model, batch)`` for any other batch form.
        data: one batch or a sequence / ``DataLoader`` of batches. A batch is an
            ``(inputs, targets)`` pair (``inputs`` that are a tensor are passed as
            ``model(inputs)``, a tuple as ``model(*inputs)``, a mapping as
            ``model(**inputs)``) or a mapping of the model's keyword arguments.
        dropout: ``"off"`` (dropout as identity) or ``"fixed"`` (same seeded masks every pass).
        dropout_seed: seed for ``dropout="fixed"`` (batch ``b`` uses ``dropout_seed + b``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, dtype=torch.float64)
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> f = make_functional_loss(model, nn.functional.mse_loss, (x, y))
        >>> H = torch.func.hessian(f)(f.params)  # nested tuples of blocks
        >>> f.dim
        4
    """
    return FunctionalLoss(model, loss_fn, data, dropout=dropout, dropout_seed=dropout_seed)
