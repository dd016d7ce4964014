"""``SDOptimizer``: monitor, control the learning rate by, or penalise the sharpness dimension.

A drop-in ``torch.optim.Optimizer`` around any constructed optimizer. Every ``every`` steps it
estimates the top of the Hessian spectrum and the sharpness dimension (SD, Def. 4.2 of Tuci,
Korkmaz, Şimşekli, Birdal, "Generalization at the Edge of Stability", arXiv:2604.19740) on a
curvature batch, records it (:class:`sdopt.records.EstimateRecord`), sends it to loggers and,
depending on ``mode``:

- ``"monitor"``: nothing else. Training is unchanged bit for bit: estimates run on a snapshot
  of the parameters, draw random numbers from the optimizer's own ``torch.Generator`` and leave
  the global RNG, parameters, buffers, ``.grad`` fields and train/eval flags untouched.
- ``"lr"``: after each estimate a pure controller (:mod:`sdopt.control`) picks an LR scale from
  the SD predicted for any learning rate from the stored spectrum (no extra products); the
  scale multiplies every group's ``lr`` just around the base ``step()`` and is restored right
  after, so the user's learning rates and schedulers are never overwritten.
- ``"penalty"``: before each base step, ``weight × ∇S`` is added to the parameters' ``.grad``,
  where ``S`` is the smooth SD surrogate (:func:`sdopt.dimension.smooth_sharpness_dimension`)
  and ``∇S`` its gradient estimated from the cached eigenpairs (THEORY.md §7).

Schedule (``t`` counts ``step()`` calls, starting at 0): at every ``t`` with
``t % every == 0`` an estimate is made *before* the base step, at the parameters the step starts
from. In penalty mode the penalty gradient is recomputed at ``t % penalty_every == 0`` from the
cached eigenvectors (refreshed at the estimates) and the cached penalty gradient is added at
every step in between.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from sdopt._checks import check_choice, check_int, check_positive
from sdopt.control import LRControllerConfig, LRControllerState, penalty_weight, update_lr_scale
from sdopt.curvature.functional import _check_not_empty, _is_tensor_pair
from sdopt.records import EstimateRecord

__all__ = ["EXPONENT_MAPS", "MODES", "SDOptimizer"]

MODES = ("monitor", "lr", "penalty")
EXPONENT_MAPS = ("gd", "momentum", "adam")
# methods of estimate_sharpness_dimension with eigenpairs (warm starts and the penalty need them)
ESTIMATORS = ("deflated", "exact", "topk")
DEFAULT_EVERY = 20_000
# kinds of failure caught (warned, counted in SDOptimizer.failures) so that training goes on
FAILURE_KINDS = ("logger", "estimate", "penalty", "sdopt")
_STATE_VERSION = 3  # 3: torch's layout with 'sdopt'; 1, 2: {'base': ..., 'sdopt': ...}
# keyword arguments of sdopt.top_eigenpairs accepted in estimate_kwargs (-> solver_options)
_SOLVER_KEYS = ("max_iters", "max_basis", "init_noise", "criterion")
# keyword arguments of estimate_sharpness_dimension accepted in estimate_kwargs
_ESTIMATE_KEYS = (
    "k_bottom", "num_probes", "num_steps", "bins", "bandwidth", "num_quantiles", "max_dim",
    "eps", "operator_options", "solver_options",
)  # fmt: skip


PENALTY_TARGETS = ("sd", "edge", "negative")


def _is_batch(obj: Any, model_loss: bool = False) -> bool:
    """One curvature batch as :mod:`sdopt.curvature` accepts it: an ``(inputs, targets)`` pair
    or a mapping of the model's keyword arguments (``model(**batch)``); with a
    :class:`~sdopt.curvature.ModelLoss`, anything but ``None``, a string or bytes."""
    if model_loss:
        return obj is not None and not isinstance(obj, (str, bytes))
    return _is_tensor_pair(obj) or isinstance(obj, Mapping)


_BATCH_FORMS = (
    "an (inputs, targets) batch, a mapping batch (model(**batch)), a list of batches, an "
    "iterable such as a DataLoader, or a callable returning a batch"
)


def _check_batch(batch: Any, where: str) -> None:
    """An ``(inputs, targets)`` pair of tensors must hold the same, non-zero number of rows
    (mappings and :class:`~sdopt.curvature.ModelLoss` batches are checked by the curvature
    engine when the loss is built)."""
    if not _is_tensor_pair(batch):
        return
    _check_not_empty(batch, where)
    x, y = batch
    rows = [t.shape[0] for t in (x, y) if isinstance(t, Tensor) and t.dim() > 0]
    if len(rows) == 2 and rows[0] != rows[1]:
        raise ValueError(
            f"Invalid {where}: inputs of shape {tuple(x.shape)} and targets of shape "
            f"{tuple(y.shape)} (mismatched batch sizes {rows[0]} != {rows[1]})"
        )


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _pass_seed(seed: int, index: int) -> int:
    """The global-RNG seed under which pass ``index`` over an iterable is started."""
    return (seed * 1_000_003 + index * 7919 + 0x5D0) % (2**63 - 1)


def _loader_generators(source: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a ``DataLoader``'s shuffling draws from (if any)."""
    found: list[torch.Generator] = []
    for obj in (
        source,
        getattr(source, "sampler", None),
        getattr(getattr(source, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


class _CurvatureData:
    """The curvature data: a fixed batch / list of batches, an iterable drawn from, or a callable.

    Drawing happens under ``torch.random.fork_rng`` so a shuffling ``DataLoader`` or a sampling
    callable never advances the training loop's global RNG. Every pass over an iterable starts
    from a global-RNG seed derived from the optimizer's ``seed`` and the pass number (and from
    the saved state of the loader's own generators, if it has any), so that a resumed run
    recreates the pass it was in and skips the batches already drawn: the batches after a
    resume are exactly those of the uninterrupted run. A callable is not replayed.
    """

    def __init__(self, data: Any, seed: int = 0, *, model_loss: bool = False) -> None:
        if data is None:
            raise ValueError(f"Invalid data: None (must be {_BATCH_FORMS})")
        if isinstance(data, Tensor) and not model_loss:
            raise ValueError(
                f"Invalid data: a bare tensor of shape {tuple(data.shape)} (must be "
                f"{_BATCH_FORMS}; a tensor is a batch only with loss_fn=ModelLoss(fn))"
            )
        self.seed = int(seed)
        self.model_loss = model_loss
        self.fixed: Any = None
        self.source: Any = None
        self.callable: Callable[[], Any] | None = None
        if isinstance(data, (str, bytes)):
            raise ValueError(f"Invalid data: a {type(data).__name__} (must be {_BATCH_FORMS})")
        # one batch: a pair, a mapping; with a ModelLoss any tuple, tensor, or object that is
        # neither a list, an iterable nor a callable (as sdopt.curvature reads ModelLoss data)
        if (
            _is_tensor_pair(data)
            or isinstance(data, Mapping)
            or (model_loss and isinstance(data, (tuple, Tensor)))
            or (model_loss and not isinstance(data, Iterable) and not callable(data))
        ):
            _check_batch(data, "data")
            self.fixed = (data[0], data[1]) if _is_tensor_pair(data) else data
        elif isinstance(data, list) or (isinstance(data, tuple) and not model_loss):
            if not data or not all(_is_batch(b, model_loss) for b in data):
                raise ValueError(
                    f"Invalid data: a {type(data).__name__} of length {len(data)} (must be one "
                    "batch, an (inputs, targets) pair or a mapping (model(**batch)), or a "
                    "non-empty list of them)"
                )
            for i, b in enumerate(data):
                _check_batch(b, f"data[{i}]")
            self.fixed = list(data)
        elif callable(data) and not isinstance(data, Iterable):
            self.callable = data
        elif isinstance(data, Iterable):
            self.source = data
        else:
            raise ValueError(f"Invalid data: {type(data).__name__} (must be {_BATCH_FORMS})")
        self._iterator: Iterator[Any] | None = None
        self.passes = 0  # passes started over ``source``
        self.drawn = 0  # batches drawn from the current pass over ``source``
        self._pass_states: list[Tensor] = []  # the loader's generators at the pass's start
        self._replay = False  # recreate the current pass and skip ``drawn`` at the next draw
        # a batch handed back by an interrupted estimate, with the cursor after it
        self._pending: tuple[Any, int, int, list[Tensor]] | None = None

    @property
    def kind(self) -> str:
        if self.fixed is not None:
            return "fixed"
        return "callable" if self.callable is not None else "iterable"

    def cursor(self) -> dict[str, Any]:
        """The position to resume from (``passes``, ``drawn``, the pass's generator states)."""
        return {
            "passes": self.passes,
            "drawn": self.drawn,
            "pass_states": [s.clone() for s in self._pass_states],
        }

    def _start_pass(self, index: int, states: list[Tensor] | None) -> None:
        generators = _loader_generators(self.source)
        if states is not None and len(states) == len(generators):
            for g, s in zip(generators, states):
                g.set_state(s)
        self._pass_states = [g.get_state() for g in generators]
        torch.manual_seed(_pass_seed(self.seed, index))  # inside draw's fork_rng
        self._iterator = iter(self.source)

    def draw(self) -> Any:
        if self.fixed is not None:
            return self.fixed
        if self._pending is not None:
            batch, self.passes, self.drawn, self._pass_states = self._pending
            self._pending = None
            return batch
        with torch.random.fork_rng(devices=[]):
            if self.callable is not None:
                return self.callable()
            if self._replay:
                self._replay = False
                if self.passes > 0:
                    self._start_pass(self.passes - 1, self._pass_states)
                    for _ in range(self.drawn):
                        next(self._iterator)  # type: ignore[arg-type]
            for _ in range(2):
                if self._iterator is None:
                    self._start_pass(self.passes, None)
                    self.passes += 1
                    self.drawn = 0
                try:
                    batch = next(self._iterator)  # type: ignore[arg-type]
                except StopIteration:
                    self._iterator = None
                    continue
                self.drawn += 1
                return batch
        raise ValueError("Invalid data: the curvature iterable yields no batches")

    def unread(self, batch: Any, before: dict[str, Any]) -> None:
        """Hand ``batch`` back (an interrupted estimate): the next draw returns it again, and
        the cursor is ``before`` (the position before it was drawn) until then."""
        if self.kind != "iterable":
            return
        self._pending = (batch, self.passes, self.drawn, self._pass_states)
        self.passes, self.drawn = before["passes"], before["drawn"]
        self._pass_states = before["pass_states"]

    def restore(self, cursor: dict[str, Any]) -> None:
        """Resume at ``cursor``: the next draw recreates that pass (same seed, same generator
        states) and skips the batches already drawn (exact when the iterable replays)."""
        if self.source is None:
            return
        self._iterator = None
        self._pending = None
        self.passes = int(cursor.get("passes", 1 if cursor.get("drawn", 0) else 0))
        self.drawn = int(cursor.get("drawn", 0))
        self._pass_states = list(cursor.get("pass_states") or [])
        self._replay = self.passes > 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["_iterator"] is not None:  # live iterators (DataLoader's) cannot be pickled
            state["_iterator"] = None
            state["_replay"] = True
        return state


def _estimate_options(options: dict[str, Any]) -> dict[str, Any]:
    """``estimate_kwargs`` checked and normalised for :func:`estimate_sharpness_dimension`:
    eigen-solver keywords go to ``solver_options``; ``trace_probes`` (first release) is
    ``num_probes``; anything else is an error naming the key."""
    out: dict[str, Any] = {}
    for key in ("solver_options", "operator_options"):
        value = options.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"Invalid estimate_kwargs[{key!r}]: {value!r} (must be a dict)")
    solver = dict(options.get("solver_options") or {})
    for key, value in options.items():
        if key == "solver_options":
            continue
        if key in _SOLVER_KEYS:
            solver[key] = value
        elif key == "trace_probes":
            out["num_probes"] = value
        elif key in _ESTIMATE_KEYS:
            out[key] = value
        else:
            known = ", ".join(sorted((*_ESTIMATE_KEYS, *_SOLVER_KEYS, "trace_probes")))
            raise ValueError(f"Invalid estimate_kwargs: unknown key {key!r} (known: {known})")
    if solver:
        out["solver_options"] = solver
    return out


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps Adam's second moment (``exp_avg_sq``, ``betas``, ``eps``)."""
    adams = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
    if isinstance(optimizer, adams):
        return True
    if isinstance(optimizer, (torch.optim.Adamax, torch.optim.SparseAdam)):
        return False  # exp_inf / sparse moments: not the preconditioner sdopt reads
    groups = optimizer.param_groups
    return bool(groups) and all("betas" in g and "eps" in g for g in groups)


def _describe(value: Any) -> str:
    """A short description of a batch part for error messages."""
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


def _loss_error(f: Any, loss_fn: Any, index: int, where: str, exc: Exception) -> ValueError:
    """A ``ValueError`` naming ``data`` or ``loss_fn`` for the failure ``exc`` of
    ``f.batch_loss(f.params, index)`` (inside ``f.evaluation()``)."""
    name = getattr(loss_fn, "__name__", None) or repr(loss_fn)
    text = str(exc)
    if isinstance(exc, ValueError) and text.startswith("Invalid loss_fn: "):
        if loss_fn is None:
            return exc
        # the curvature engine's own check (not a 0-d loss, no outputs.loss): name the loss
        return ValueError(f"Invalid loss_fn: {name!r} " + text[len("Invalid loss_fn: ") :])
    inputs, targets = f.batches[index]
    if f.model_loss is not None:
        return ValueError(
            f"Invalid {where} or loss_fn: loss_fn(model, batch) raised on {_describe(inputs)} "
            f"({type(exc).__name__}: {exc})"
        )
    try:  # which one failed, the model or the loss? (a second pass, on the error path only)
        f.batch_outputs(f.params, index)
    except Exception:
        what = "inputs of " + _describe(inputs) if isinstance(inputs, Tensor) else _describe(inputs)
        return ValueError(
            f"Invalid {where}: the model cannot evaluate {what} ({type(exc).__name__}: {exc})"
        )
    call = (
        "loss_fn(outputs, batch)" if isinstance(targets, Mapping) else "loss_fn(outputs, targets)"
    )
    return ValueError(
        f"Invalid {where} or loss_fn: {call} raised on targets of {_describe(targets)} "
        f"({type(exc).__name__}: {exc})"
    )


def _loss_of(
    model: nn.Module, loss_fn: Callable[..., Any] | None, data: Any, dropout: str
) -> Tensor:
    """The curvature loss on ``data``, evaluated by the curvature engine itself
    (:meth:`sdopt.curvature.FunctionalLoss.batch_loss`: dropout per ``dropout``, attention on
    its math kernel, BatchNorm statistics frozen, buffers copied, global RNG restored), without
    autograd. Raises ``ValueError`` naming ``data`` or ``loss_fn`` for what cannot be
    evaluated; returns the mean loss (possibly non-finite)."""
    from sdopt.curvature.functional import make_functional_loss

    f = make_functional_loss(model, loss_fn, data, dropout=dropout)
    total = None
    with torch.no_grad(), f.evaluation():
        for i in range(len(f.batches)):
            where = "data" if len(f.batches) == 1 else f"data[{i}]"
            try:
                loss = f.batch_loss(f.params, i)
            except Exception as exc:
                raise _loss_error(f, loss_fn, i, where, exc) from exc
            total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    return total / len(f.batches)


def _exact_vectors(est: Any) -> Tensor:
    """The Ritz vectors of the exact eigenvalues ``_exact_values(est)``: top, then bottom."""
    parts = [est.eigenvectors]
    if est.bottom_eigenvectors is not None:
        parts.append(est.bottom_eigenvectors)
    return torch.cat(parts, dim=1).detach()


def _exact_values(est: Any) -> Tensor:
    """The eigenvalues with Ritz vectors (top decreasing, then bottom increasing), float64."""
    row = est.eigenvalues[-1].detach().to(torch.float64)
    if est.method != "exact":
        return row.clone()
    top = row.flip(0)[: est.eigenvectors.shape[1]]
    n_bottom = 0 if est.bottom_eigenvectors is None else est.bottom_eigenvectors.shape[1]
    return torch.cat([top, row[:n_bottom]])


def _bulk_of(est: Any) -> tuple[Tensor, Tensor] | None:
    """The last operator's spectrum outside the exact eigenvalues, as ``(nodes, weights)``."""
    if est.method == "exact":
        row = est.eigenvalues[-1].detach().to(torch.float64)
        n_top = est.eigenvectors.shape[1]
        n_bottom = 0 if est.bottom_eigenvectors is None else est.bottom_eigenvectors.shape[1]
        rest = row[n_bottom : row.numel() - n_top]
        return (rest.clone(), torch.ones_like(rest)) if rest.numel() else None
    groups = est.extra.get("groups")
    if not groups or groups[-1].bulk_dim == 0:
        return None
    g = groups[-1]
    scale = g.bulk_dim / g.nodes.shape[0]
    return g.nodes.reshape(-1).clone(), (g.weights * scale).reshape(-1).clone()


class SDOptimizer(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` to monitor, control the learning rate by, or penalise the SD.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own objects, so LR
    schedulers attached to either the wrapper or the base work, ``add_param_group`` reaches the
    base, and ``zero_grad`` is the base's. ``step(closure)`` calls the closure at once under
    ``torch.enable_grad()`` and returns its loss.

    Args:
        base_optimizer: A constructed ``torch.optim.Optimizer`` over the model's parameters.
        model: The ``nn.Module`` being trained (its trainable parameters define the Hessian).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss; for mapping batches
            ``loss_fn(outputs, batch)``; ``None`` for the model's own ``outputs.loss`` (Hugging
            Face models given ``labels``); or :class:`sdopt.curvature.ModelLoss` ``(fn)`` with
            ``fn(model, batch)`` for any other batch form. Exactly as :mod:`sdopt.curvature`
            reads it (one implementation: :class:`sdopt.curvature.FunctionalLoss`).
        data: Curvature data: one batch or a list of them (fixed), an iterable such as a
            ``DataLoader`` (one batch drawn per estimate, re-iterated when exhausted), or a
            zero-argument callable returning a batch. A batch is an ``(inputs, targets)`` pair
            (``model(inputs)``), a mapping of the model's keyword arguments (``model(**batch)``,
            e.g. a Hugging Face batch) or, with a ``ModelLoss``, anything ``fn`` accepts.
        mode: ``"monitor"``, ``"lr"`` or ``"penalty"``.
        every: Estimate every ``every`` steps (``>= 1``; default 20,000: one warm estimate of
            the grokking transformer on its whole training set, ≈ 540 Hessian-vector products,
            costs ≈ 1,250 plain AdamW steps, so that monitoring costs 6 % of training time
            there, under the 10 % target, see ``benchmarks/overhead.py``).
        k: Number of top Hessian eigenpairs computed at each estimate (``>= 1``; default that
            of :func:`sdopt.estimate_sharpness_dimension`, 8).
        estimator: The method of :func:`sdopt.estimate_sharpness_dimension` that produces every
            record: ``"deflated"`` (default: both ends of the spectrum exact, the top end
            warm-started from the previous estimate, the bulk by SLQ on the deflated Hessian),
            ``"exact"`` (dense
            full spectrum; small models) or ``"topk"`` (the bulk as its mean: a cheap baseline
            that cannot see negative curvature in the bulk).
        exponent_map: ``"gd"`` (the paper's map ``I - ηH``), ``"momentum"`` (heavy ball with
            the base optimizer's momentum / ``betas[0]``) or ``"adam"`` (preconditioned by the
            base optimizer's second-moment estimate; an estimate due before the base
            optimizer's first step, when there is no second moment yet, is made at the next
            step).
        target_sd: ``mode="lr"``: largest allowed predicted SD (shortcut for
            ``controller=LRControllerConfig(target_sd=...)``).
        controller: ``mode="lr"``: an :class:`sdopt.control.LRControllerConfig` or a dict of
            its fields.
        penalty_strength: ``mode="penalty"``: weight of the surrogate's gradient (``>= 0``).
        penalty_temperature: ``mode="penalty"``: temperature of the smooth surrogate (``> 0``,
            in exponent units), or ``None`` (default): the surrogate's own rule, which keeps it
            within a small fraction of the SD it smooths (:func:`smooth_sharpness_dimension`).
        penalty_every: ``mode="penalty"``: recompute the penalty gradient every this many steps
            and reuse it in between (``>= 1``; default 8: a recomputation costs 3–5
            gradients).
        penalty_warmup: ``mode="penalty"``: linear ramp of the strength over this many steps.
        penalty_target: ``mode="penalty"``: what the penalty descends on. ``"sd"`` (default):
            the smooth SD surrogate (every exact eigenvalue, weighted by ``∂S/∂α_i``);
            ``"edge"``: the sum of the top eigenvalues at or beyond 0.9 of the map's edge
            (``η·λ_i ≥ 0.9·edge``: the expanding directions a learning rate could stabilise,
            and those about to be); ``"negative"``: minus the sum of the bottom eigenvalues
            below −1 % of the spectral radius (negative curvature, expanding at every
            learning rate). The two variants are measured against the default in
            docs/results/steering.md.
        penalty_max_ratio: ``mode="penalty"``: the penalty's share of a step is at most this
            many times the loss gradient's norm (``‖w_t ∇S‖ ≤ r ‖∇L‖``: the penalty gradient is
            scaled down when larger; ``> 0``, default 1), or ``None``: no cap. Without the cap
            the default strength diverged on the ``sdopt grok`` job, where SD is thousands and
            ``∂S/∂α`` large (docs/results/steering.md).
        loggers: Objects with ``log(record)`` (and optionally ``close()``), e.g.
            :class:`sdopt.loggers.WandbLogger`.
        seed: Seed of the optimizer's own ``torch.Generator`` (same on every rank).
        tol: Relative tolerance of the eigen-solver on the eigenvalues (default that of the
            estimator, ``1e-2``: the uncertainty of SD is dominated by the bulk).
        dropout: How the curvature forward passes treat dropout (``"off"`` or ``"fixed"``).
        max_history: Keep at most this many records in :attr:`history` (oldest dropped).
        estimate_kwargs: Further keyword arguments of
            :func:`sdopt.estimate_sharpness_dimension` (``k_bottom``, ``num_probes``,
            ``num_steps``, ``max_dim``, ``eps``, ``operator_options``, ``solver_options``, ...)
            and of :func:`sdopt.spectrum.top_eigenpairs` (``max_iters``, ``max_basis``,
            ``init_noise``, ``criterion``: passed as ``solver_options``). With none, every
            record is what ``estimate_sharpness_dimension`` gives at its defaults.

    Raises:
        ValueError: For any invalid argument, naming it and its value.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        data: Any,
        mode: str = "monitor",
        every: int = DEFAULT_EVERY,
        k: int | None = None,
        estimator: str = "deflated",
        exponent_map: str = "gd",
        target_sd: float | None = None,
        controller: LRControllerConfig | dict[str, Any] | None = None,
        penalty_strength: float = 1e-3,
        penalty_temperature: float | None = None,
        penalty_every: int = 8,
        penalty_warmup: int = 0,
        penalty_target: str = "sd",
        penalty_max_ratio: float | None = 1.0,
        loggers: Sequence[Any] | Any = (),
        seed: int = 0,
        tol: float | None = None,
        dropout: str = "off",
        max_history: int = 100_000,
        estimate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"Invalid base_optimizer: {type(base_optimizer).__name__} "
                "(must be a constructed torch.optim.Optimizer)"
            )
        if isinstance(base_optimizer, SDOptimizer):
            raise ValueError("Invalid base_optimizer: SDOptimizer (cannot wrap an SDOptimizer)")
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"Invalid loss_fn: {loss_fn!r} (must be callable: loss_fn(outputs, targets), "
                "loss_fn(outputs, batch) for mapping batches, sdopt.curvature.ModelLoss(fn) "
                "for fn(model, batch), or None for the model's own outputs.loss)"
            )
        self.mode = check_choice("mode", mode, MODES)
        self.every = check_int("every", every, minimum=1)
        from sdopt.dimension.estimators import DEFAULTS

        self.k = check_int("k", DEFAULTS["k"] if k is None else k, minimum=1)
        self._k_arg = None if k is None else self.k  # the estimator's default clamps to d
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.exponent_map = check_choice("exponent_map", exponent_map, EXPONENT_MAPS)
        if controller is None:
            controller = LRControllerConfig()
        elif isinstance(controller, dict):
            from dataclasses import fields

            known = {f.name for f in fields(LRControllerConfig)}
            unknown = sorted(str(key) for key in controller if key not in known)
            if unknown:
                raise ValueError(
                    f"Invalid controller: unknown key(s) {unknown} (known: {sorted(known)})"
                )
            controller = LRControllerConfig(**controller)
        elif not isinstance(controller, LRControllerConfig):
            raise ValueError(
                f"Invalid controller: {controller!r} (must be an LRControllerConfig or a dict)"
            )
        if target_sd is not None:
            check_positive("target_sd", target_sd, allow_zero=True)
            controller = LRControllerConfig(**{**asdict(controller), "target_sd": float(target_sd)})
        self.controller = controller
        self.penalty_strength = check_positive(
            "penalty_strength", penalty_strength, allow_zero=True
        )
        self.penalty_temperature = (
            None
            if penalty_temperature is None
            else check_positive("penalty_temperature", penalty_temperature)
        )
        self.penalty_every = check_int("penalty_every", penalty_every, minimum=1)
        if penalty_target not in PENALTY_TARGETS:
            raise ValueError(
                f"Invalid penalty_target: {penalty_target!r} (must be one of {PENALTY_TARGETS})"
            )
        self.penalty_target = penalty_target
        self.penalty_max_ratio = (
            None
            if penalty_max_ratio is None
            else check_positive("penalty_max_ratio", penalty_max_ratio)
        )
        self.penalty_warmup = check_int("penalty_warmup", penalty_warmup, minimum=0)
        self.tol = check_positive("tol", DEFAULTS["tol"] if tol is None else tol)
        self.dropout = check_choice("dropout", dropout, ("off", "fixed"))
        self.max_history = check_int("max_history", max_history, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if estimate_kwargs is not None and not isinstance(estimate_kwargs, dict):
            raise ValueError(f"Invalid estimate_kwargs: {estimate_kwargs!r} (must be a dict)")
        self.estimate_kwargs = _estimate_options(estimate_kwargs or {})
        if loggers is None:
            loggers = ()
        if not isinstance(loggers, (list, tuple)):
            loggers = (loggers,)
        for lg in loggers:
            if not callable(getattr(lg, "log", None)):
                raise ValueError(
                    f"Invalid loggers: {lg!r} (each logger needs a log(record) method)"
                )
        self.loggers = list(loggers)

        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("Invalid model: it has no parameters with requires_grad=True")
        dim = sum(p.numel() for p in trainable)
        if self._k_arg is not None and self._k_arg > dim:
            raise ValueError(
                f"Invalid k: {self._k_arg} (the model has only {dim} trainable parameters)"
            )
        model_ids = {id(p) for p in model.parameters()}
        for group in base_optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in model_ids:
                    raise ValueError(
                        "Invalid base_optimizer: it optimizes a tensor of shape "
                        f"{tuple(p.shape)} that is not a parameter of model"
                    )

        if self.exponent_map == "adam" and not _is_adam(base_optimizer):
            raise ValueError(
                f"Invalid exponent_map: 'adam' over a {type(base_optimizer).__name__} base "
                "optimizer (needs Adam, AdamW, NAdam or RAdam: param groups with 'betas' and "
                "'eps' and a state 'exp_avg_sq'; use exponent_map='gd' or 'momentum')"
            )
        positive = False
        for i, group in enumerate(base_optimizer.param_groups):
            lr = group.get("lr")
            value = float(lr) if isinstance(lr, (int, float, Tensor)) else math.nan
            if group["params"] and not value >= 0:
                raise ValueError(
                    f"Invalid lr: {lr!r} in param group {i} of the base optimizer (must be >= 0)"
                )
            positive = positive or (bool(group["params"]) and value > 0)
        if not positive:
            lrs = [g.get("lr") for g in base_optimizer.param_groups if g["params"]]
            raise ValueError(
                f"Invalid lr: {lrs[0] if len(lrs) == 1 else lrs!r} (at least one param group "
                "of the base optimizer needs lr > 0: the sharpness dimension is a function of "
                "the learning rate)"
            )

        self.model = model
        self.loss_fn = loss_fn
        from sdopt.curvature.functional import ModelLoss

        self.data = _CurvatureData(data, self.seed, model_loss=isinstance(loss_fn, ModelLoss))
        if self.data.kind == "fixed":
            _loss_of(model, loss_fn, self.data.fixed, dropout)  # a dry run: ValueError if not

        # torch.optim.Optimizer's own __init__ sets up its plumbing (hooks, the patched step,
        # whatever a later torch release adds). While it runs, ``param_groups``, ``state`` and
        # ``defaults`` are this object's own (a copy of the base's groups, validated by torch's
        # add_param_group); then they are dropped and the properties read and write the base's.
        groups = [{**g, "params": list(g["params"])} for g in base_optimizer.param_groups]
        torch.optim.Optimizer.__init__(self, groups, base_optimizer.defaults)
        for name in self._OWN_DURING_INIT:
            self.__dict__.pop(name, None)
        self.base_optimizer = base_optimizer
        self._warned_infeasible = False

        device = trainable[0].device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

        self.step_count = 0
        self.lr_scale = 1.0
        self.controller_state = LRControllerState()
        self.history: list[EstimateRecord] = []
        self._eigenvalues: Tensor | None = None  # exact eigenvalues: top k, then bottom
        self._eigenvectors: Tensor | None = None  # top-k Ritz vectors (warm start, penalty)
        self._bottom_vectors: Tensor | None = None  # bottom Ritz vectors (penalty)
        self._penalty_grad: Tensor | None = None
        self._directions: Tensor | None = None  # P^{-1/2} v_i for a preconditioned map
        self._penalty_batch: Any = None  # the curvature batch of the last estimate
        # the bulk's quadrature (nodes, weights) of the last estimate, for the penalty surrogate
        self._bulk: tuple[Tensor, Tensor] | None = None
        self._spectrum: Any = None  # the last SharpnessDimensionEstimate (not saved)
        self._sdopt_seconds = 0.0  # sdopt's own time since the last estimate started
        self._interval_start: float | None = None  # when the last estimate started
        # exponent_map='adam' before the base optimizer's first step: no preconditioner yet, the
        # estimate due is made at the next step instead
        self._deferred = False
        # failures that sdopt caught so that training goes on: counts by kind ("logger",
        # "estimate", "penalty", "sdopt") and the latest events (step, kind, message)
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)
        self.failure_events: list[dict[str, Any]] = []
        self._warned_loggers: set[int] = set()  # indices of loggers already warned about
        self._last_draw: Any = None  # the curvature batch of the latest draw
        self._draws = 0  # draws so far (an interrupted step hands its batch back)

    # ------------------------------------------------------------------ torch.optim contract

    # ``param_groups``, ``state`` and ``defaults`` are the base optimizer's; until the base is
    # attached (inside Optimizer.__init__) they are this object's own, under these names
    _OWN_DURING_INIT = ("_own_param_groups", "_own_state", "_own_defaults")

    def _shared(self, name: str) -> Any:
        base = self.__dict__.get("base_optimizer")
        return getattr(base, name) if base is not None else self.__dict__["_own_" + name]

    def _share(self, name: str, value: Any) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_own_" + name] = value
        else:
            setattr(base, name, value)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's ``param_groups`` (the same list object)."""
        return self._shared("param_groups")

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._share("param_groups", value)

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's per-parameter ``state``."""
        return self._shared("state")

    @state.setter
    def state(self, value: Any) -> None:
        self._share("state", value)

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's ``defaults``."""
        return self._shared("defaults")

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._share("defaults", value)

    @property
    def last_estimate(self) -> EstimateRecord | None:
        """The most recent record (``None`` before the first estimate)."""
        return self.history[-1] if self.history else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (visible here too: ``param_groups`` is shared)."""
        if self.__dict__.get("base_optimizer") is None:  # inside Optimizer.__init__
            torch.optim.Optimizer.add_param_group(self, param_group)
            return
        model_ids = {id(p) for p in self.model.parameters()}
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and id(p) not in model_ids:
                raise ValueError(
                    f"Invalid param_group: a tensor of shape {tuple(p.shape)} that is not a "
                    "parameter of model"
                )
        self.base_optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (
            f"SDOptimizer(mode={self.mode!r}, every={self.every}, k={self.k}, "
            f"base={self.base_optimizer!r})"
        )

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step (and an estimate when ``step_count % every == 0``).

        Order: (1) the closure, if given, under ``enable_grad``; (2) the estimate, if due;
        (3) ``mode="penalty"``: the penalty gradient is added to ``.grad``; (4) the base step,
        with every group's ``lr`` multiplied by :attr:`lr_scale` (``mode="lr"``) and restored
        right after. With a closure, the base step receives one that returns the loss already
        computed on its first call and re-evaluates the user's closure on later calls (so
        ``LBFGS`` works and ``SGD``/``Adam`` evaluate the closure once).

        A non-finite closure loss (or loss on the curvature batch) skips the estimate and the
        penalty, with a warning and a ``"skipped"`` record; the base step is still called, so
        the parameters change exactly as the base optimizer alone would change them.

        Nothing sdopt does stops training: an exception raised by a logger, an estimate,
        the penalty or the controller is caught, warned about and counted in
        :attr:`failures` (events in :attr:`failure_events`); the base step and the step counter
        happen regardless. A ``KeyboardInterrupt`` (or ``SystemExit``) inside the step undoes
        sdopt's share of it (generator state, caches, LR scale, history, the curvature batch
        drawn) and propagates: a checkpoint saved then resumes exactly where the step started.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: ``closure`` is not callable, or returns something other than a
                tensor, a number or ``None``.
        """
        if closure is not None and not callable(closure):
            raise ValueError(
                f"Invalid closure: {closure!r} (must be a callable returning the loss)"
            )
        if closure is None and self._is_state_initialisation():
            self.base_optimizer.step()  # moves nothing; only creates the base's state
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss is not None and not isinstance(loss, (Tensor, int, float)):
                raise ValueError(
                    f"Invalid closure: it returned a {type(loss).__name__} (must return the "
                    "loss as a tensor or a number, or None)"
                )
        t = self.step_count
        saved = self._snapshot()
        try:
            try:
                self._sdopt_part(t, loss)
            except Exception as exc:  # nothing sdopt does may stop training
                self._fail(t, "sdopt", exc)
            if self.mode == "lr" and self.lr_scale != 1.0:
                lrs = [group["lr"] for group in self.param_groups]
                try:
                    for group, lr in zip(self.param_groups, lrs):
                        group["lr"] = lr * self.lr_scale
                    self._base_step(closure, loss)
                finally:
                    for group, lr in zip(self.param_groups, lrs):
                        group["lr"] = lr
            else:
                self._base_step(closure, loss)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: undo sdopt's
                self._rollback(saved)  # share of the step, so a resumed run replays it exactly
            raise
        self.step_count += 1
        return loss

    def _is_state_initialisation(self) -> bool:
        """Whether this ``step()`` is a state initialisation, not a training step: every group's
        ``lr`` is 0 and every gradient is zero, so it moves nothing. That is how
        ``torch.distributed.checkpoint.state_dict`` creates an optimizer's state before it
        saves or loads it (``_init_optim_state``); sdopt neither counts nor estimates there, so
        a checkpoint taken through DCP leaves the run exactly as it was."""
        groups = [g for g in self.param_groups if g["params"]]
        if not groups or any(float(g.get("lr", 1.0)) != 0.0 for g in groups):
            return False
        return all(
            p.grad is not None and not bool(p.grad.any())
            for g in groups
            for p in g["params"]
            if p.requires_grad
        )

    def _sdopt_part(self, t: int, loss: Any) -> None:
        """The estimate (if due) and the penalty (``mode="penalty"``) of step ``t``."""
        start = time.perf_counter()
        estimate_due = t % self.every == 0 or self._deferred
        penalty_due = self.mode == "penalty" and t % self.penalty_every == 0
        loss_ok = self._loss_is_finite(loss, agree=estimate_due or penalty_due)
        if estimate_due:
            self._estimate(t, loss_ok)
        if self.mode == "penalty":
            if loss_ok:
                self._apply_penalty(t)
            elif self._eigenvectors is not None and penalty_weight(
                t, self.penalty_strength, self.penalty_warmup
            ):
                self._penalty_grad = None  # recomputed at the next finite step
                self._fail(t, "penalty", None, "non-finite loss: the penalty is not applied")
        self._sdopt_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ failures, interrupts

    def _fail(
        self, t: int, kind: str, exc: BaseException | None, text: str = "", *, warn: bool = True
    ) -> str:
        """Record a caught failure: count it, keep the event, warn; return the message."""
        message = text or f"{type(exc).__name__}: {exc}"
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self.failure_events.append({"step": t, "kind": kind, "message": message})
        if len(self.failure_events) > self.max_history:
            del self.failure_events[: len(self.failure_events) - self.max_history]
        if kind == "estimate" or not warn:
            return message  # an estimate's caller warns (with the skipped record)
        warnings.warn(
            f"sdopt: {kind} failure at step {t} ({message}); training goes on "
            f"(counted in optimizer.failures[{kind!r}])",
            RuntimeWarning,
            stacklevel=4,
        )
        return message

    _SNAPSHOT = (
        "_eigenvalues", "_eigenvectors", "_bottom_vectors", "_penalty_grad", "_directions",
        "_penalty_batch", "_bulk", "_spectrum", "_deferred", "lr_scale", "controller_state",
        "_warned_infeasible",
    )  # fmt: skip

    def _snapshot(self) -> dict[str, Any]:
        """What sdopt's share of a step changes (references: it replaces, never mutates)."""
        state = {name: getattr(self, name) for name in self._SNAPSHOT}
        state["generator"] = self.generator.get_state()
        state["history"] = len(self.history)
        state["data"] = self.data.cursor() if self.data.kind == "iterable" else None
        state["draws"] = self._draws
        return state

    def _rollback(self, state: dict[str, Any]) -> None:
        """Undo an interrupted step's estimate and penalty: the generator, caches, scale and
        history as before it, and a batch it drew handed back to the curvature data."""
        for name in self._SNAPSHOT:
            setattr(self, name, state[name])
        self.generator.set_state(state["generator"])
        del self.history[state["history"] :]
        if state["data"] is not None and self._draws != state["draws"]:
            self.data.unread(self._last_draw, state["data"])
        self._draws = state["draws"]
        self._last_draw = None

    def _base_step(self, closure: Callable[[], Any] | None, loss: Any) -> None:
        """The base optimizer's step. With a closure, the base gets one too: its first call
        returns the loss the closure already produced (the gradients are in place), later
        calls re-evaluate — so ``SGD``/``Adam`` evaluate the closure once, as they would alone,
        and optimizers that re-evaluate (``LBFGS``) work."""
        if closure is None:
            self.base_optimizer.step()
            return
        first = True

        def replay() -> Any:
            nonlocal first
            if first:
                first = False
                return loss
            with torch.enable_grad():
                return closure()

        self.base_optimizer.step(replay)

    def _loss_is_finite(self, loss: Any, *, agree: bool) -> bool:
        """Whether the closure's loss is finite; with ``agree`` (an estimate or a penalty
        recomputation is due) all ranks agree on the answer, so that every rank takes the same
        branch and the collectives inside the estimate stay matched."""
        if loss is None:
            return True
        value = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        ok = bool(torch.isfinite(value).all())
        if agree and _dist_initialized():
            import torch.distributed as dist

            flag = torch.tensor([0.0 if ok else 1.0], device=self._device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            ok = flag.item() == 0.0
        return ok

    @property
    def _device(self) -> torch.device:
        return next(p for p in self.model.parameters() if p.requires_grad).device

    # ------------------------------------------------------------------ helpers

    def reference_lr(self) -> float:
        """The learning rate SD is computed for: the largest ``lr`` among groups with parameters
        (groups with other learning rates enter through :meth:`_lr_preconditioner`)."""
        lrs = [float(g["lr"]) for g in self.param_groups if g["params"]]
        return max(lrs)

    def _momentum(self) -> float:
        group = self.param_groups[0]
        if "momentum" in group:
            return float(group["momentum"])
        if "betas" in group:
            return float(group["betas"][0])
        return 0.0

    def _emit(self, record: EstimateRecord) -> None:
        self.history.append(record)
        if len(self.history) > self.max_history:
            del self.history[: len(self.history) - self.max_history]
        for i, lg in enumerate(self.loggers):
            try:
                lg.log(record)
            except Exception as exc:  # a logger never changes training
                first = i not in self._warned_loggers
                self._warned_loggers.add(i)
                self._fail(
                    record.step,
                    "logger",
                    exc,
                    f"logger {i} ({type(lg).__name__}) raised {type(exc).__name__}: {exc}"
                    + ("" if not first else "; later failures of this logger are not warned"),
                    warn=first,
                )

    def _skip(self, t: int, reason: str, **fields: Any) -> None:
        self._fail(t, "estimate", None, reason)
        warnings.warn(
            f"sdopt: estimate at step {t} skipped ({reason})", RuntimeWarning, stacklevel=3
        )
        base_lr = self.reference_lr()
        self._emit(
            EstimateRecord(
                step=t,
                mode=self.mode,
                status="skipped",
                reason=reason,
                base_lr=base_lr,
                lr=base_lr * self.lr_scale,
                lr_scale=self.lr_scale,
                method=self.estimator,
                **fields,
            )
        )

    @contextlib.contextmanager
    def _isolated(self) -> Iterator[None]:
        """Own RNG stream, no autocast, no grad-mode leaks, global RNG restored."""
        device = self._device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with torch.autocast(device_type=device.type, enabled=False):
                yield

    # ------------------------------------------------------------------ estimates

    def _estimate(self, t: int, loss_ok: bool) -> None:
        self._deferred = self.exponent_map == "adam" and not self.base_optimizer.state
        if self._deferred:  # Adam's preconditioner does not exist before its first step
            return
        if not loss_ok:
            self._skip(t, "non-finite loss")
            return
        start = time.perf_counter()
        overhead = math.nan
        if self._interval_start is not None and start > self._interval_start:
            overhead = self._sdopt_seconds / (start - self._interval_start)
        self._interval_start = start
        self._sdopt_seconds = 0.0
        base_lr = self.reference_lr()
        from sdopt.dimension.estimators import NonFiniteLossError

        distributed = _dist_initialized()
        failure: str | None = None
        try:
            with self._isolated():
                batch = self._draw()
                precond = self._preconditioner()
                if distributed:
                    # every rank checks its shard's loss before the first collective of the
                    # estimate, so that a failure on one rank skips the estimate on all ranks
                    value = float(_loss_of(self.model, self.loss_fn, batch, self.dropout))
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"the loss on the curvature data is {value}")
        except NonFiniteLossError:
            failure = "non-finite loss on the curvature batch"
        except Exception as exc:
            failure = f"estimate failed: {type(exc).__name__}: {exc}"
        failure = self._agree(failure)
        if failure is not None:
            self._skip(t, failure)
            return
        try:
            with self._isolated():
                est = self._compute_estimate(batch, base_lr * self.lr_scale, precond)
            if not math.isfinite(est.value) or not bool(torch.isfinite(est.eigenvalues).all()):
                failure = "non-finite estimate"
        except NonFiniteLossError:
            failure = "non-finite loss on the curvature batch"
        except Exception as exc:  # a failed estimate must never stop training
            failure = f"estimate failed: {type(exc).__name__}: {exc}"
        failure = self._agree(failure)
        if failure is not None:
            self._skip(t, failure)
            return
        predicted = math.nan
        lr_in_force = base_lr * self.lr_scale  # what made these parameters, before an update
        if self.mode == "lr":
            self._update_scale(t, est, base_lr)
            predicted = self.controller_state.predicted_sd
        lr = base_lr * self.lr_scale
        if lr != est.lr:  # the scale moved: the same spectrum read at the new learning rate
            est = est.at_lr(lr)
        self._eigenvalues = _exact_values(est)
        self._eigenvectors = est.eigenvectors
        self._bottom_vectors = est.bottom_eigenvectors
        self._directions = self._adam_directions(est, precond)
        self._bulk = _bulk_of(est)
        self._penalty_batch = batch if self.mode == "penalty" else None
        self._spectrum = est
        seconds = time.perf_counter() - start
        penalty = math.nan
        if self.mode == "penalty":
            penalty = penalty_weight(t, self.penalty_strength, self.penalty_warmup) * (
                self._surrogate_value(lr)
            )
        top = _exact_values(est)[: est.eigenvectors.shape[1]]
        self._emit(
            EstimateRecord(
                step=t,
                mode=self.mode,
                sharpness_dimension=est.value,
                uncertainty=est.uncertainty,
                sd_low=est.low,
                sd_high=est.high,
                n_edge=est.n_edge,
                n_neg=est.n_neg,
                total_exponent=est.total_exponent,
                j_star=est.j_star,
                lambda_max=est.lambda_max,
                lambda_min=est.lambda_min,
                trace=est.trace,
                eigenvalues=[float(x) for x in top[: self.k]],
                lr=lr,
                base_lr=base_lr,
                lr_scale=self.lr_scale,
                predicted_sharpness_dimension=predicted,
                edge_ratio=lr * est.lambda_max / self._edge(),
                edge_ratio_in_force=lr_in_force * est.lambda_max / self._edge(),
                penalty=penalty,
                loss=est.loss,
                num_products=est.num_products,
                seconds=seconds,
                overhead_fraction=overhead,
                method=self.estimator,
                protocol="full-batch" if self.data.kind == "fixed" else "minibatch",
                converged=bool(est.settings.get("converged", True)),
            )
        )

    def _update_scale(self, t: int, est: Any, base_lr: float) -> None:
        """``mode="lr"``: the controller's new scale from the estimate (no new products).

        It steers by what a learning rate can change, the directions beyond the edge: the edge
        scale uses ``λ_max`` plus its residual bound. An SD target (``target_sd``) that no scale
        meets — negative curvature expands at every learning rate — is reported once with a
        warning and ``feasible=False``, and the edge scale is kept instead of collapsing it."""
        lam = est.lambda_max
        if est.residuals is not None:
            lam = lam + float(est.residuals[:, 0].mean())
        edge_scale = self._edge() * self.controller.target_edge_ratio / (base_lr * lam)
        if not lam > 0:
            edge_scale = math.inf
        predict = None
        if self.controller.target_sd is not None:

            def predict(s: float) -> float:
                return est.predict(s * base_lr)[0]

        self.lr_scale, self.controller_state = update_lr_scale(
            predict,
            self.controller_state,
            self.controller,
            edge_scale=edge_scale,
            sharpness=lam,
        )
        self.lr_scale = self._broadcast_scale(self.lr_scale)
        if not self.controller_state.feasible and not self._warned_infeasible:
            self._warned_infeasible = True
            warnings.warn(
                f"sdopt: at step {t} no learning-rate scale in [{self.controller.min_scale}, "
                f"{self.controller.max_scale}] meets target_sd={self.controller.target_sd} "
                f"(n_neg = {est.n_neg:.0f} negative eigenvalues expand at every learning rate); "
                "steering by the edge of stability instead (recorded as feasible=False)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _target_weights(self, lr: float) -> Tensor:
        """``∂P/∂α_i`` of the ``"edge"`` and ``"negative"`` penalties (see ``penalty_target``)."""
        values = self._eigenvalues
        weights = torch.zeros_like(values, dtype=torch.float64)
        n_top = self._eigenvectors.shape[1]
        if self.penalty_target == "edge":
            beyond = lr * values[:n_top] >= 0.9 * self._edge()
            weights[:n_top] = beyond.to(torch.float64)
        else:
            from sdopt.dimension.estimators import NEGATIVE_RESOLUTION

            radius = float(values.abs().max()) if values.numel() else 0.0
            negative = values[n_top:] < -NEGATIVE_RESOLUTION * radius
            weights[n_top:] = -negative.to(torch.float64)
        return weights

    def _surrogate_value(self, lr: float) -> float:
        if self.penalty_target != "sd":
            return float((self._target_weights(lr) * self._eigenvalues).sum())
        from sdopt.dimension import smooth_sharpness_dimension

        try:
            return float(
                smooth_sharpness_dimension(
                    self._eigenvalues,
                    lr,
                    temperature=self.penalty_temperature,
                    **self._bulk_kwargs(),
                )
            )
        except ValueError:
            return math.nan

    def _bulk_kwargs(self) -> dict[str, Any]:
        if self._bulk is None:
            return {}
        return {"bulk_nodes": self._bulk[0], "bulk_weights": self._bulk[1]}

    def _broadcast_scale(self, scale: float) -> float:
        if not _dist_initialized():
            return scale
        import torch.distributed as dist

        value = torch.tensor([scale], dtype=torch.float64, device=self._device)
        dist.broadcast(value, src=0)
        return float(value.item())

    def _preconditioner(self) -> Tensor | None:
        """The diagonal preconditioner ``P`` of the exponent map in the curvature engine's
        parameter order, or ``None`` (the plain map ``I - η_ref H``).

        The map is ``I - η_ref P^{-1} H``: its spectrum is that of
        ``I - η_ref P^{-1/2} H P^{-1/2}`` (similar matrices), which is what the estimator
        computes. ``P`` is the product of Adam's frozen ``sqrt(v̂) + ε`` (``exponent_map="adam"``)
        and of the layer-wise learning rates' ``η_ref / η`` (:meth:`_lr_preconditioner`);
        ``inf`` marks a coordinate the map leaves where it is.
        """
        lr_part = self._lr_preconditioner()
        if self.exponent_map != "adam":
            return lr_part
        from sdopt.dimension import adam_preconditioner

        adam = adam_preconditioner(self.base_optimizer, self._curvature_params(), missing="frozen")
        return adam if lr_part is None else adam * lr_part.to(adam)

    def _curvature_params(self) -> list[Tensor]:
        """The optimizer's own parameters, found through DDP / compile wrappers, in the order of
        ``HessianOperator``'s flat vectors (``named_parameters``, trainable, tied once)."""
        from sdopt.curvature.functional import _unwrap

        return [p for _, p in _unwrap(self.model).named_parameters() if p.requires_grad]

    def _lr_preconditioner(self) -> Tensor | None:
        """Layer-wise learning rates as a preconditioner: ``P = η_ref / η`` per coordinate.

        The map of gradient descent with per-group learning rates is ``I - diag(η) H``, with
        ``η`` the ``lr`` of each parameter's group (0 for a parameter in no group). With the
        reference ``η_ref`` = :meth:`reference_lr` it is ``I - η_ref P^{-1} H`` for
        ``P = η_ref / η`` (``inf`` where ``η = 0``: the map leaves the coordinate where it
        is). ``None`` when every trainable coordinate has ``η = η_ref`` (the plain map).
        """
        ref = self.reference_lr()
        if not ref > 0:
            return None
        lr_of = {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}
        params = self._curvature_params()
        etas = [lr_of.get(id(p), 0.0) for p in params]
        if all(eta == ref for eta in etas):
            return None
        return torch.cat(
            [
                torch.full(
                    (p.numel(),),
                    ref / eta if eta > 0 else math.inf,
                    dtype=torch.float64,
                    device=p.device,
                )
                for p, eta in zip(params, etas)
            ]
        )

    @staticmethod
    def _adam_directions(est: Any, precond: Tensor | None) -> Tensor | None:
        """``P^{-1/2} v_i`` for a preconditioned map (adam, layer-wise learning rates): the
        penalty differentiates along them."""
        if precond is None or est.eigenvectors is None:
            return None
        vectors = _exact_vectors(est)
        return precond.to(vectors).rsqrt()[:, None] * vectors

    def _edge(self) -> float:
        """``η·λ_max`` at the edge of stability of the exponent map (2 for ``"gd"``)."""
        from sdopt.dimension import edge_of_stability

        return edge_of_stability(self.exponent_map, self._sd_kwargs()["momentum"])

    def _sd_kwargs(self) -> dict[str, Any]:
        beta = self._momentum() if self.exponent_map != "gd" else 0.0
        return {"exponent_map": self.exponent_map, "momentum": beta}

    def _draw(self) -> Any:
        """The next curvature batch (checked: an ``(inputs, targets)`` pair of equal sizes or a
        mapping; anything with a ``ModelLoss``)."""
        batch = self.data.draw()
        self._draws += 1
        self._last_draw = batch
        if self.data.kind != "fixed":
            if not _is_batch(batch, self.data.model_loss):
                raise ValueError(
                    f"Invalid data: the curvature {self.data.kind} gave a "
                    f"{type(batch).__name__} (each batch must be an (inputs, targets) pair or a "
                    "mapping of the model's keyword arguments, or anything with "
                    "loss_fn=ModelLoss(fn))"
                )
            _check_batch(batch, "data")
        return batch

    def _agree(self, failure: str | None) -> str | None:
        """Under ``torch.distributed``, whether any rank failed (all ranks take the same
        branch: one ``all_reduce`` of a flag); ``failure`` itself otherwise."""
        if not _dist_initialized():
            return failure
        import torch.distributed as dist

        flag = torch.tensor([0.0 if failure is None else 1.0], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0.0:
            return None
        return failure if failure is not None else "failed on another rank"

    def _compute_estimate(self, batch: Any, lr: float, precond: Tensor | None) -> Any:
        """One estimate on ``batch`` at learning rate ``lr``: exactly
        :func:`sdopt.estimate_sharpness_dimension` (``method=estimator``, ``k``, ``tol`` and
        ``estimate_kwargs``), its top end warm-started from the cached eigenvectors, on this
        optimizer's generator, with the exponent map's momentum and ``precond`` (Adam's
        preconditioner from :meth:`_preconditioner`, or ``None``)."""
        from sdopt.dimension import estimate_sharpness_dimension

        options = dict(self.estimate_kwargs)
        operator_options = {"dropout": self.dropout, **options.pop("operator_options", {})}
        return estimate_sharpness_dimension(
            self.model,
            self.loss_fn,
            batch,
            lr,
            method=self.estimator,
            protocol="full-batch",
            k=self._k_arg,
            tol=self.tol,
            init=self._eigenvectors,
            # the bottom end starts cold: warm-started from the previous bottom vectors (a
            # cluster near 0) Lanczos hit its 200-product cap unconverged on the grokking
            # transformer, against 92 products cold (benchmarks/overhead.py, 2026-12-01)
            init_bottom=None,
            generator=self.generator,
            preconditioner=precond,
            operator_options=operator_options,
            **self._sd_kwargs(),
            **options,
        )

    def _apply_penalty(self, t: int) -> None:
        """Add ``w_t · ∇S_τ`` to ``.grad`` (recomputing ``∇S_τ`` when ``t % penalty_every == 0``).

        ``∇S_τ`` comes from :func:`sdopt.dimension.penalty_gradient` (random-sign two-gradient
        estimator) at the current parameters, with the eigenpairs, bulk summary and curvature
        batch of the last estimate, the effective learning rate and this optimizer's generator.
        For ``exponent_map="adam"`` the directions are ``P^{-1/2} v_i`` (the Rayleigh quotients
        of ``P^{-1/2} H P^{-1/2}``). Under ``torch.distributed`` the estimate is averaged across
        ranks (each rank differentiates its shard's loss along the same directions).
        """
        if self._eigenvectors is None or self._penalty_batch is None:
            return  # no estimate yet
        weight = penalty_weight(t, self.penalty_strength, self.penalty_warmup)
        if weight == 0.0:
            return
        if self._penalty_grad is None or t % self.penalty_every == 0:
            from sdopt.dimension import penalty_gradient, surrogate_weights

            directions = self._directions
            if directions is None:
                parts = [self._eigenvectors]
                if self._bottom_vectors is not None:
                    parts.append(self._bottom_vectors)
                directions = torch.cat(parts, dim=1)
            lr = self.reference_lr() * self.lr_scale
            failure: str | None = None
            try:
                with self._isolated():
                    try:
                        if self.penalty_target == "sd":
                            _, weights = surrogate_weights(
                                self._eigenvalues,
                                lr,
                                temperature=self.penalty_temperature,
                                **self._bulk_kwargs(),
                            )
                        else:
                            weights = self._target_weights(lr)
                    except RuntimeError:  # surrogate saturated at d: no graph, zero gradient
                        weights = torch.zeros_like(self._eigenvalues, dtype=torch.float64)
                    if not bool(weights.any()):  # nothing to descend on: no gradients spent
                        self._penalty_grad = torch.zeros(
                            sum(p.numel() for p in self._trainable_params()),
                            dtype=self._eigenvectors.dtype,
                            device=self._device,
                        )
                        return
                    grad = penalty_gradient(
                        self.model,
                        self.loss_fn,
                        self._penalty_batch,
                        lr,
                        eigenvalues=self._eigenvalues,
                        eigenvectors=directions,
                        weights=weights,
                        generator=self.generator,
                    ).detach()
                    grad = grad.to(device=self._device)
            except Exception as exc:  # never stop training for a failed penalty
                failure = f"{type(exc).__name__}: {exc}"
            failure = self._agree(failure)  # every rank skips, or none does
            if failure is not None:
                self._fail(t, "penalty", None, f"penalty skipped ({failure})")
                self._penalty_grad = None
                return
            if _dist_initialized():
                import torch.distributed as dist

                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad /= dist.get_world_size()
            if not bool(torch.isfinite(grad).all()):
                self._fail(t, "penalty", None, "penalty skipped (non-finite penalty gradient)")
                self._penalty_grad = None
                return
            self._penalty_grad = grad
        in_optimizer = {id(p) for group in self.param_groups for p in group["params"]}
        if self.penalty_max_ratio is not None:  # the penalty never outweighs the loss
            grads = [p.grad for p in self._trainable_params() if id(p) in in_optimizer]
            loss_norm = math.sqrt(
                sum(float(g.double().square().sum()) for g in grads if g is not None)
            )
            penalty_norm = weight * float(self._penalty_grad.double().norm())
            if penalty_norm > self.penalty_max_ratio * loss_norm:
                weight *= self.penalty_max_ratio * loss_norm / penalty_norm
        offset = 0
        for p in self._trainable_params():
            n = p.numel()
            if id(p) in in_optimizer:
                piece = self._penalty_grad[offset : offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = weight * piece
                else:
                    p.grad.add_(piece, alpha=weight)
            offset += n

    def _trainable_params(self) -> list[Tensor]:
        """Trainable parameters in the flat-vector order of the curvature engine (tied once)."""
        seen: set[int] = set()
        out = []
        for _, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, in ``torch.optim``'s layout.

        ``"state"`` and ``"param_groups"`` (and any other entry) are the base optimizer's
        ``state_dict()``; sdopt's own state (step counter, LR scale, controller state,
        generator state, eigenvector cache, penalty-gradient cache, curvature-iterator position,
        history) is under ``"sdopt"`` and, the same object, under ``param_groups[0]["sdopt"]``:
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only
        ``state`` and ``param_groups`` (with every key of each group), so that is where it
        travels through DCP. The wrapper's ``register_state_dict_pre_hook`` /
        ``post_hook`` hooks run around it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        base = self.base_optimizer.state_dict()
        extras = self._sdopt_state()
        groups = [dict(g) for g in base["param_groups"]]
        if groups:
            groups[0]["sdopt"] = extras
        out = {**base, "param_groups": groups, "sdopt": extras}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def _sdopt_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "step_count": self.step_count,
            "deferred": self._deferred,
            "lr_scale": self.lr_scale,
            "controller_state": self.controller_state.to_dict(),
            "generator": self.generator.get_state(),
            "eigenvalues": None if self._eigenvalues is None else self._eigenvalues.clone(),
            "eigenvectors": None if self._eigenvectors is None else self._eigenvectors.clone(),
            "bottom_vectors": (
                None if self._bottom_vectors is None else self._bottom_vectors.clone()
            ),
            "penalty_grad": None if self._penalty_grad is None else self._penalty_grad.clone(),
            "directions": None if self._directions is None else self._directions.clone(),
            "penalty_batch": self._penalty_batch if self.data.kind != "fixed" else None,
            "bulk": None if self._bulk is None else [t.clone() for t in self._bulk],
            "data_drawn": self.data.drawn,
            "data_cursor": self.data.cursor(),
            "history": [asdict(r) for r in self.history],
            "failures": dict(self.failures),
            "failure_events": [dict(e) for e in self.failure_events],
        }

    @staticmethod
    def _split_state_dict(state_dict: Any) -> tuple[dict[str, Any], Any]:
        """``(base optimizer's state dict, sdopt's state)`` of a checkpoint in any layout:
        torch's with ``"sdopt"`` (version 3; from DCP only ``param_groups[0]["sdopt"]``) or
        ``{"base": ..., "sdopt": ...}`` (versions 1 and 2)."""
        if isinstance(state_dict, dict) and "base" in state_dict and "sdopt" in state_dict:
            return state_dict["base"], state_dict["sdopt"]
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and "state" in state_dict:
            first = groups[0] if groups and isinstance(groups[0], dict) else {}
            if "sdopt" in state_dict or "sdopt" in first:
                s = state_dict["sdopt"] if "sdopt" in state_dict else first["sdopt"]
                base = {k: v for k, v in state_dict.items() if k != "sdopt"}
                base["param_groups"] = [
                    {k: v for k, v in g.items() if k != "sdopt"} if isinstance(g, dict) else g
                    for g in groups
                ]
                return base, s
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            f"Invalid state_dict: keys {keys} (must come from SDOptimizer.state_dict(): "
            "'state' and 'param_groups' with sdopt's state under 'sdopt'; to load a plain "
            "optimizer checkpoint use opt.base_optimizer.load_state_dict)"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the base optimizer's state included).

        Reads torch's layout with ``"sdopt"`` (also as it comes back from
        ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict``, with sdopt's state
        in ``param_groups[0]``) and the earlier ``{"base": ..., "sdopt": ...}`` checkpoints
        (versions 1 and 2). The wrapper's ``register_load_state_dict_pre_hook`` /
        ``post_hook`` hooks run around it.

        Raises:
            ValueError: If ``state_dict`` was not produced by :meth:`SDOptimizer.state_dict`.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_state, s = self._split_state_dict(state_dict)
        if not isinstance(s, dict):
            raise ValueError(
                f"Invalid state_dict: 'sdopt' entry is a {type(s).__name__} (must be a dict)"
            )
        if s.get("version") not in (1, 2, _STATE_VERSION):
            raise ValueError(
                f"Invalid state_dict: version {s.get('version')!r} (expected {_STATE_VERSION}, "
                "or 1 or 2 of earlier releases)"
            )
        if s.get("mode") != self.mode:
            raise ValueError(
                f"Invalid state_dict: mode {s.get('mode')!r} (this optimizer has "
                f"mode={self.mode!r}; load a checkpoint of the same mode)"
            )
        dim = sum(p.numel() for p in self._trainable_params())
        for key in ("eigenvectors", "bottom_vectors", "directions", "penalty_grad"):
            value = s.get(key)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.dim() not in (1, 2):
                raise ValueError(
                    f"Invalid state_dict: {key} is a {type(value).__name__} (must be a tensor)"
                )
            if value.shape[0] != dim:
                raise ValueError(
                    f"Invalid state_dict: {key} of size {value.shape[0]} (this model has "
                    f"{dim} trainable parameters; the checkpoint is of another model)"
                )
        try:
            self.base_optimizer.load_state_dict(base_state)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"Invalid state_dict: its base-optimizer part ('state', 'param_groups') does not "
                f"fit the base optimizer {type(self.base_optimizer).__name__} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        device = self._device
        self.step_count = int(s["step_count"])
        self._deferred = bool(s.get("deferred", False))
        self.lr_scale = float(s["lr_scale"])
        self.controller_state = LRControllerState.from_dict(s["controller_state"])
        self.generator.set_state(s["generator"])
        self._eigenvalues = None if s["eigenvalues"] is None else s["eigenvalues"].to(device)
        self._eigenvectors = None if s["eigenvectors"] is None else s["eigenvectors"].to(device)
        bottom = s.get("bottom_vectors")
        self._bottom_vectors = None if bottom is None else bottom.to(device)
        self._penalty_grad = None if s["penalty_grad"] is None else s["penalty_grad"].to(device)
        self._directions = None if s["directions"] is None else s["directions"].to(device)
        bulk = s.get("bulk")
        # version 1 stored (bulk_dim, bulk_trace) numbers: its bulk model is not restored
        valid = isinstance(bulk, (list, tuple)) and all(isinstance(t, Tensor) for t in bulk)
        self._bulk = (bulk[0], bulk[1]) if valid and len(bulk) == 2 else None
        self._penalty_batch = s["penalty_batch"]
        if (
            self._penalty_batch is None
            and self.mode == "penalty"
            and self._eigenvectors is not None
        ):
            self._penalty_batch = self.data.fixed
        self.history = [EstimateRecord.from_dict(r) for r in s["history"]]
        self.data.restore(s.get("data_cursor") or {"drawn": int(s.get("data_drawn", 0))})
        self.failures = {**dict.fromkeys(FAILURE_KINDS, 0), **dict(s.get("failures") or {})}
        self.failure_events = [dict(e) for e in s.get("failure_events") or []]
        self._warned_loggers = set()
        self._last_draw = None
        self._spectrum = None
        self._sdopt_seconds = 0.0
        self._interval_start = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def close(self) -> None:
        """Close every logger that has a ``close()`` method."""
        for i, lg in enumerate(self.loggers):
            close = getattr(lg, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # one logger's failure never stops the others closing
                    self._fail(self.step_count, "logger", exc, f"logger {i} close() failed: {exc}")
