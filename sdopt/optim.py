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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from sdopt._checks import check_choice, check_int, check_positive
from sdopt.control import LRControllerConfig, LRControllerState, penalty_weight, update_lr_scale
from sdopt.records import EstimateRecord

__all__ = ["EXPONENT_MAPS", "MODES", "SDOptimizer"]

MODES = ("monitor", "lr", "penalty")
EXPONENT_MAPS = ("gd", "momentum", "adam")
ESTIMATORS = ("topk", "exact")
DEFAULT_EVERY = 400
DEFAULT_K = 3
DEFAULT_TOL = 1e-2
DEFAULT_TRACE_PROBES = 4
_STATE_VERSION = 1


class _NonFiniteLoss(FloatingPointError):
    """The loss on the curvature batch is NaN or infinite."""


def _is_batch(obj: Any) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and (isinstance(obj[0], Tensor) or isinstance(obj[1], Tensor))
    )


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class _CurvatureData:
    """The curvature data: a fixed batch / list of batches, an iterable drawn from, or a callable.

    Drawing happens under ``torch.random.fork_rng`` so a shuffling ``DataLoader`` or a sampling
    callable never advances the training loop's global RNG.
    """

    def __init__(self, data: Any) -> None:
        if data is None:
            raise ValueError(
                "Invalid data: None (must be an (inputs, targets) batch, a list of batches, "
                "an iterable such as a DataLoader, or a callable returning a batch)"
            )
        self.fixed: Any = None
        self.source: Any = None
        self.callable: Callable[[], Any] | None = None
        if _is_batch(data):
            self.fixed = (data[0], data[1])
        elif isinstance(data, (list, tuple)):
            if not data or not all(_is_batch(b) for b in data):
                raise ValueError(
                    f"Invalid data: a {type(data).__name__} of length {len(data)} "
                    "(must be an (inputs, targets) batch or a non-empty list of them)"
                )
            self.fixed = list(data)
        elif callable(data) and not isinstance(data, Iterable):
            self.callable = data
        elif isinstance(data, Iterable):
            self.source = data
        else:
            raise ValueError(
                f"Invalid data: {type(data).__name__} (must be an (inputs, targets) batch, a list "
                "of batches, an iterable such as a DataLoader, or a callable returning a batch)"
            )
        self._iterator: Iterator[Any] | None = None
        self.drawn = 0  # batches drawn from the current pass over ``source``

    @property
    def kind(self) -> str:
        if self.fixed is not None:
            return "fixed"
        return "callable" if self.callable is not None else "iterable"

    def draw(self) -> Any:
        if self.fixed is not None:
            return self.fixed
        with torch.random.fork_rng(devices=[]):
            if self.callable is not None:
                return self.callable()
            for _ in range(2):
                if self._iterator is None:
                    self._iterator = iter(self.source)
                    self.drawn = 0
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    self._iterator = None
                    continue
                self.drawn += 1
                return batch
        raise ValueError("Invalid data: the curvature iterable yields no batches")

    def restore(self, drawn: int) -> None:
        """Re-create the iterator and skip ``drawn`` batches (exact when the iterable replays)."""
        if self.source is None:
            return
        self._iterator = None
        for _ in range(drawn):
            self.draw()


class SDOptimizer(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` to monitor, control the learning rate by, or penalise the SD.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own objects, so LR
    schedulers attached to either the wrapper or the base work, ``add_param_group`` reaches the
    base, and ``zero_grad`` is the base's. ``step(closure)`` calls the closure at once under
    ``torch.enable_grad()`` and returns its loss.

    Args:
        base_optimizer: A constructed ``torch.optim.Optimizer`` over the model's parameters.
        model: The ``nn.Module`` being trained (its trainable parameters define the Hessian).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss.
        data: Curvature data: one ``(inputs, targets)`` batch or a list of them (fixed), an
            iterable such as a ``DataLoader`` (one batch drawn per estimate, re-iterated when
            exhausted), or a zero-argument callable returning a batch.
        mode: ``"monitor"``, ``"lr"`` or ``"penalty"``.
        every: Estimate every ``every`` steps (``>= 1``; default 400, chosen so that monitoring
            the grokking transformer costs under 10 % of training time, see
            ``benchmarks/overhead.py``).
        k: Number of top Hessian eigenpairs computed at each estimate (``>= 1``).
        estimator: ``"topk"`` (top-``k`` eigenpairs + deflated Hutchinson trace of the bulk) or
            ``"exact"`` (dense full spectrum; small models). See :meth:`_compute_estimate`.
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
        penalty_temperature: ``mode="penalty"``: temperature of the smooth surrogate (``> 0``).
        penalty_every: ``mode="penalty"``: recompute the penalty gradient every this many steps
            and reuse it in between (``>= 1``; default 8: a recomputation costs 3–5
            gradients).
        penalty_warmup: ``mode="penalty"``: linear ramp of the strength over this many steps.
        loggers: Objects with ``log(record)`` (and optionally ``close()``), e.g.
            :class:`sdopt.loggers.WandbLogger`.
        seed: Seed of the optimizer's own ``torch.Generator`` (same on every rank).
        tol: Relative tolerance of the eigen-solver on the eigenvalues (default ``1e-2``: enough
            for monitoring and control, whose uncertainty is dominated by the bulk).
        dropout: How the curvature forward passes treat dropout (``"off"`` or ``"fixed"``).
        max_history: Keep at most this many records in :attr:`history` (oldest dropped).
        estimate_kwargs: Extra keyword arguments: ``trace_probes`` (Hutchinson probes of the
            bulk trace, default 4), ``max_dim`` (``estimator="exact"``), and any keyword of
            :func:`sdopt.spectrum.top_eigenpairs` (``max_iters``, ``max_basis``, ...).

    Raises:
        ValueError: For any invalid argument, naming it and its value.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        mode: str = "monitor",
        every: int = DEFAULT_EVERY,
        k: int = DEFAULT_K,
        estimator: str = "topk",
        exponent_map: str = "gd",
        target_sd: float | None = None,
        controller: LRControllerConfig | dict[str, Any] | None = None,
        penalty_strength: float = 1e-3,
        penalty_temperature: float = 0.1,
        penalty_every: int = 8,
        penalty_warmup: int = 0,
        loggers: Sequence[Any] | Any = (),
        seed: int = 0,
        tol: float = DEFAULT_TOL,
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
        if not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (must be callable)")
        self.mode = check_choice("mode", mode, MODES)
        self.every = check_int("every", every, minimum=1)
        self.k = check_int("k", k, minimum=1)
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.exponent_map = check_choice("exponent_map", exponent_map, EXPONENT_MAPS)
        if controller is None:
            controller = LRControllerConfig()
        elif isinstance(controller, dict):
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
        self.penalty_temperature = check_positive("penalty_temperature", penalty_temperature)
        self.penalty_every = check_int("penalty_every", penalty_every, minimum=1)
        self.penalty_warmup = check_int("penalty_warmup", penalty_warmup, minimum=0)
        self.tol = check_positive("tol", tol)
        self.dropout = check_choice("dropout", dropout, ("off", "fixed"))
        self.max_history = check_int("max_history", max_history, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if estimate_kwargs is not None and not isinstance(estimate_kwargs, dict):
            raise ValueError(f"Invalid estimate_kwargs: {estimate_kwargs!r} (must be a dict)")
        self.estimate_kwargs = dict(estimate_kwargs or {})
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
        model_ids = {id(p) for p in model.parameters()}
        for group in base_optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in model_ids:
                    raise ValueError(
                        "Invalid base_optimizer: it optimizes a tensor of shape "
                        f"{tuple(p.shape)} that is not a parameter of model"
                    )

        self.base_optimizer = base_optimizer
        self.model = model
        self.loss_fn = loss_fn
        self.data = _CurvatureData(data)

        # torch.optim.Optimizer plumbing. No super().__init__ (it would build new groups):
        # param_groups, state and defaults are properties that read and write the base's.
        from collections import OrderedDict

        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        device = trainable[0].device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

        self.step_count = 0
        self.lr_scale = 1.0
        self.controller_state = LRControllerState()
        self.history: list[EstimateRecord] = []
        self._eigenvalues: Tensor | None = None
        self._eigenvectors: Tensor | None = None
        self._penalty_grad: Tensor | None = None
        self._directions: Tensor | None = None  # P^{-1/2} v_i for the adam map
        self._penalty_batch: Any = None  # the curvature batch of the last estimate
        self._bulk: tuple[float, float] = (0.0, 0.0)  # (bulk_dim, bulk_trace) of the last estimate
        self._spectrum: Any = None  # the last estimate object, for predictions (not saved)
        self._sdopt_seconds = 0.0  # sdopt's own time since the last estimate started
        self._interval_start: float | None = None  # when the last estimate started
        # exponent_map='adam' before the base optimizer's first step: no preconditioner yet, the
        # estimate due is made at the next step instead
        self._deferred = False

    # ------------------------------------------------------------------ torch.optim contract

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's ``param_groups`` (the same list object)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's per-parameter ``state``."""
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's ``defaults``."""
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    @property
    def last_estimate(self) -> EstimateRecord | None:
        """The most recent record (``None`` before the first estimate)."""
        return self.history[-1] if self.history else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (visible here too: ``param_groups`` is shared)."""
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

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.step_count
        start = time.perf_counter()
        estimate_due = t % self.every == 0 or self._deferred
        penalty_due = self.mode == "penalty" and t % self.penalty_every == 0
        loss_ok = self._loss_is_finite(loss, agree=estimate_due or penalty_due)
        if estimate_due:
            self._estimate(t, loss_ok)
        if self.mode == "penalty" and loss_ok:
            self._apply_penalty(t)
        self._sdopt_seconds += time.perf_counter() - start

        if self.mode == "lr" and self.lr_scale != 1.0:
            saved = [group["lr"] for group in self.param_groups]
            try:
                for group, lr in zip(self.param_groups, saved):
                    group["lr"] = lr * self.lr_scale
                self._base_step(closure, loss)
            finally:
                for group, lr in zip(self.param_groups, saved):
                    group["lr"] = lr
        else:
            self._base_step(closure, loss)
        self.step_count += 1
        return loss

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
        """The learning rate SD is computed for: the largest ``lr`` among groups with parameters."""
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
        for lg in self.loggers:
            lg.log(record)

    def _skip(self, t: int, reason: str, **fields: Any) -> None:
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
        try:
            with self._isolated():
                batch = self.data.draw()
                result = self._compute_estimate(batch)
        except _NonFiniteLoss:
            self._skip(t, "non-finite loss on the curvature batch")
            return
        except Exception as exc:  # a failed estimate must never stop training
            self._skip(t, f"estimate failed: {type(exc).__name__}: {exc}")
            return
        if not math.isfinite(result["sharpness_dimension"]) or not all(
            math.isfinite(x) for x in result["eigenvalues"]
        ):
            self._skip(t, "non-finite estimate", loss=result.get("loss", math.nan))
            return
        base_lr = self.reference_lr()
        predicted = math.nan
        if self.mode == "lr":
            predict = result["predict"]
            self.lr_scale, self.controller_state = update_lr_scale(
                lambda s: predict(s * base_lr), self.controller_state, self.controller
            )
            self.lr_scale = self._broadcast_scale(self.lr_scale)
            predicted = self.controller_state.predicted_sd
        self._eigenvalues = result["eigenvalues_tensor"]
        self._eigenvectors = result["eigenvectors"]
        self._directions = result.get("directions")
        self._bulk = (result["bulk_dim"], result["bulk_trace"])
        self._penalty_batch = batch if self.mode == "penalty" else None
        self._spectrum = result
        seconds = time.perf_counter() - start
        lam_max = result["eigenvalues"][0]
        lr = base_lr * self.lr_scale
        penalty = math.nan
        if self.mode == "penalty":
            from sdopt.dimension import smooth_sharpness_dimension

            try:
                surrogate = float(
                    smooth_sharpness_dimension(
                        self._eigenvalues,
                        lr,
                        temperature=self.penalty_temperature,
                        bulk_dim=self._bulk[0],
                        bulk_trace=self._bulk[1],
                    )
                )
            except ValueError:
                surrogate = math.nan
            penalty = penalty_weight(t, self.penalty_strength, self.penalty_warmup) * surrogate
        self._emit(
            EstimateRecord(
                step=t,
                mode=self.mode,
                sharpness_dimension=result["sharpness_dimension"],
                uncertainty=result["uncertainty"],
                lambda_max=lam_max,
                trace=result["trace"],
                eigenvalues=list(result["eigenvalues"]),
                lr=lr,
                base_lr=base_lr,
                lr_scale=self.lr_scale,
                predicted_sharpness_dimension=predicted,
                edge_ratio=lr * lam_max / self._edge(),
                penalty=penalty,
                loss=result["loss"],
                num_products=result["num_products"],
                seconds=seconds,
                overhead_fraction=overhead,
                method=self.estimator,
                protocol=result.get("protocol", ""),
                converged=result.get("converged", True),
            )
        )

    def _broadcast_scale(self, scale: float) -> float:
        if not _dist_initialized():
            return scale
        import torch.distributed as dist

        value = torch.tensor([scale], dtype=torch.float64, device=self._device)
        dist.broadcast(value, src=0)
        return float(value.item())

    def _operator(self, batch: Any) -> tuple[Any, Any, Tensor | None]:
        """The Hessian operator on ``batch``, the operator whose spectrum the exponent map reads
        (``P^{-1/2} H P^{-1/2}`` for ``exponent_map="adam"``) and ``P`` (or ``None``)."""
        from sdopt.curvature import HessianOperator

        op = HessianOperator(self.model, self.loss_fn, batch, dropout=self.dropout)
        if self.exponent_map != "adam":
            return op, op, None
        from sdopt.curvature.functional import _unwrap
        from sdopt.dimension import adam_preconditioner
        from sdopt.spectrum import preconditioned

        # ``op.params`` are detached views (new tensor objects): look the optimizer's own
        # parameters up by name, in the operator's order.
        by_name = dict(_unwrap(self.model).named_parameters())  # DDP / compile: the op's names
        precond = adam_preconditioner(
            self.base_optimizer, [by_name[n] for n in op.names], missing="frozen"
        )
        precond = precond.to(dtype=op.dtype, device=op.device)
        if bool(torch.isfinite(precond).all()):
            return op, preconditioned(op, precond), precond
        # parameters Adam has never moved (no gradient yet): P^{-1/2} = 0 there, the map is
        # the identity in those coordinates
        from sdopt.spectrum import LinearOperator

        d = precond.rsqrt()[:, None]
        target = LinearOperator(
            op.dim, lambda V: d * op.matmat(d * V), dtype=op.dtype, device=op.device, source=op
        )
        return op, target, precond

    def _edge(self) -> float:
        """``η·λ_max`` at the edge of stability of the exponent map (2 for ``"gd"``)."""
        from sdopt.dimension import edge_of_stability

        return edge_of_stability(self.exponent_map, self._sd_kwargs()["momentum"])

    def _sd_kwargs(self) -> dict[str, Any]:
        beta = self._momentum() if self.exponent_map != "gd" else 0.0
        return {"exponent_map": self.exponent_map, "momentum": beta}

    def _compute_estimate(self, batch: Any) -> dict[str, Any]:
        """One estimate on ``batch``: plain numbers, the eigenpairs and an SD predictor.

        ``estimator="topk"``: the top-``k`` eigenpairs by thick-restart Lanczos warm-started
        from the cached eigenvectors (:func:`sdopt.spectrum.top_eigenpairs`), and the bulk —
        the other ``d - k`` eigenvalues — summarised by its trace, estimated by Hutchinson on
        the deflated operator ``(I - VVᵀ) H (I - VVᵀ)`` with ``trace_probes`` probes. The SD is
        read from that spectrum (``k`` points and the bulk as ``d - k`` eigenvalues at its
        mean) by :func:`sdopt.dimension.sd_from_spectrum`; its uncertainty is the jackknife
        over the trace probes. ``estimator="exact"``: the dense Hessian's full spectrum (small
        models only), the paper's exact method on one batch.
        """
        from sdopt.dimension import SpectrumSketch, sd_from_spectrum
        from sdopt.spectrum import deflated, hutchinson_trace, top_eigenpairs

        op, target, precond = self._operator(batch)
        loss, _ = op.loss_and_gradient()
        if not bool(torch.isfinite(loss)):
            raise _NonFiniteLoss
        lr = self.reference_lr()
        sd_kwargs = self._sd_kwargs()
        dim = op.dim
        k = min(self.k, dim)
        options = dict(self.estimate_kwargs)
        if self.estimator == "exact":
            max_dim = int(options.pop("max_dim", 4096))
            dense = op.to_dense(max_dim=max_dim)
            if precond is not None:  # P^{-1/2} H P^{-1/2}
                scale = precond.rsqrt().to(dense)
                dense = scale[:, None] * dense * scale[None, :]
            evals, evecs = torch.linalg.eigh(0.5 * (dense + dense.T))
            full = evals.flip(0).double()
            vectors = evecs.flip(1)[:, :k].contiguous()
            value, _ = sd_from_spectrum(full, lr, uncertainty=False, **sd_kwargs)
            trace, uncertainty = float(full.sum()), 0.0
            top_values = full[:k].clone()
            sketch: Any = full
            converged = True
            products = op.num_products
        else:
            probes = int(options.pop("trace_probes", DEFAULT_TRACE_PROBES))
            top = top_eigenpairs(
                target,
                k,
                tol=self.tol,
                init=self._eigenvectors,
                generator=self.generator,
                **options,
            )
            top_values = top.eigenvalues.detach().double()
            vectors = top.eigenvectors.detach()
            bulk_dim = dim - k
            nodes = top_values
            weights = torch.ones_like(top_values)
            uncertainty = 0.0
            trace = float(top_values.sum())
            products = top.num_products
            if bulk_dim > 0:
                est = hutchinson_trace(deflated(target, vectors), probes, generator=self.generator)
                products += est.num_products
                samples = est.samples.double()
                trace += float(est.value)
                group_nodes = torch.cat(
                    [top_values.expand(len(samples), k), (samples / bulk_dim)[:, None]], dim=1
                )
                group_weights = torch.cat(
                    [
                        torch.ones(len(samples), k, dtype=torch.float64),
                        torch.full((len(samples), 1), float(bulk_dim), dtype=torch.float64),
                    ],
                    dim=1,
                )
                if len(samples) > 1:
                    _, uncertainty = sd_from_spectrum(
                        SpectrumSketch(group_nodes, group_weights, dim), lr, **sd_kwargs
                    )
                nodes = torch.cat([top_values, torch.tensor([est.value / bulk_dim]).double()])
                weights = torch.cat([weights, torch.tensor([float(bulk_dim)]).double()])
            sketch = SpectrumSketch(nodes[None, :], weights[None, :], dim)
            value, _ = sd_from_spectrum(sketch, lr, uncertainty=False, **sd_kwargs)
            converged = bool(top.converged)
            if self.mode == "lr":
                # Ritz values underestimate the top eigenvalues; the controller predicts with
                # the residual bound θ_i + ‖A x_i − θ_i x_i‖ (each interval holds an eigenvalue),
                # so that a loose tolerance cannot push the step past the edge.
                safe = nodes.clone()
                safe[:k] = top_values + top.residuals.double().to(top_values)
                sketch = SpectrumSketch(safe[None, :], weights[None, :], dim)

        directions = None if precond is None else (precond.rsqrt()[:, None] * vectors)

        def predict(eta: float, _sketch: Any = sketch) -> float:
            return sd_from_spectrum(_sketch, eta, uncertainty=False, **sd_kwargs)[0]

        return {
            "loss": float(loss),
            "eigenvalues": [float(x) for x in top_values],
            "eigenvalues_tensor": top_values.clone(),
            "eigenvectors": vectors.clone(),
            "directions": directions,
            "sharpness_dimension": float(value),
            "uncertainty": float(uncertainty),
            "trace": trace,
            "num_products": int(products),
            "predict": predict,
            "protocol": "full-batch" if self.data.kind == "fixed" else "minibatch",
            "converged": converged,
            "bulk_dim": float(dim - k),
            "bulk_trace": trace - float(top_values.sum()),
            "lr": lr,
        }

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

            directions = self._eigenvectors if self._directions is None else self._directions
            lr = self.reference_lr() * self.lr_scale
            try:
                with self._isolated():
                    try:
                        _, weights = surrogate_weights(
                            self._eigenvalues,
                            lr,
                            temperature=self.penalty_temperature,
                            bulk_dim=self._bulk[0],
                            bulk_trace=self._bulk[1],
                        )
                    except RuntimeError:  # surrogate saturated at d: no graph, zero gradient
                        weights = torch.zeros_like(self._eigenvalues, dtype=torch.float64)
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
                warnings.warn(
                    f"sdopt: penalty at step {t} skipped ({type(exc).__name__}: {exc})",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._penalty_grad = None
                return
            if _dist_initialized():
                import torch.distributed as dist

                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad /= dist.get_world_size()
            if not bool(torch.isfinite(grad).all()):
                warnings.warn(
                    f"sdopt: penalty at step {t} skipped (non-finite penalty gradient)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._penalty_grad = None
                return
            self._penalty_grad = grad
        in_optimizer = {id(p) for group in self.param_groups for p in group["params"]}
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
        """Everything needed to resume exactly: the base optimizer's ``state_dict`` under
        ``"base"`` and sdopt's own state (step counter, LR scale, controller state, generator
        state, eigenvector cache, penalty-gradient cache, curvature-iterator position, history)
        under ``"sdopt"``."""
        return {
            "base": self.base_optimizer.state_dict(),
            "sdopt": {
                "version": _STATE_VERSION,
                "mode": self.mode,
                "step_count": self.step_count,
                "deferred": self._deferred,
                "lr_scale": self.lr_scale,
                "controller_state": self.controller_state.to_dict(),
                "generator": self.generator.get_state(),
                "eigenvalues": None if self._eigenvalues is None else self._eigenvalues.clone(),
                "eigenvectors": None if self._eigenvectors is None else self._eigenvectors.clone(),
                "penalty_grad": None if self._penalty_grad is None else self._penalty_grad.clone(),
                "directions": None if self._directions is None else self._directions.clone(),
                "penalty_batch": self._penalty_batch if self.data.kind != "fixed" else None,
                "bulk": list(self._bulk),
                "data_drawn": self.data.drawn,
                "history": [asdict(r) for r in self.history],
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the base optimizer's state included).

        Raises:
            ValueError: If ``state_dict`` was not produced by :meth:`SDOptimizer.state_dict`.
        """
        if (
            not isinstance(state_dict, dict)
            or "base" not in state_dict
            or "sdopt" not in state_dict
        ):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"Invalid state_dict: keys {keys} (must come from SDOptimizer.state_dict(); "
                "to load a plain optimizer checkpoint use opt.base_optimizer.load_state_dict)"
            )
        s = state_dict["sdopt"]
        if s.get("version") != _STATE_VERSION:
            raise ValueError(
                f"Invalid state_dict: version {s.get('version')!r} (expected {_STATE_VERSION})"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        device = self._device
        self.step_count = int(s["step_count"])
        self._deferred = bool(s.get("deferred", False))
        self.lr_scale = float(s["lr_scale"])
        self.controller_state = LRControllerState.from_dict(s["controller_state"])
        self.generator.set_state(s["generator"])
        self._eigenvalues = None if s["eigenvalues"] is None else s["eigenvalues"].to(device)
        self._eigenvectors = None if s["eigenvectors"] is None else s["eigenvectors"].to(device)
        self._penalty_grad = None if s["penalty_grad"] is None else s["penalty_grad"].to(device)
        self._directions = None if s["directions"] is None else s["directions"].to(device)
        self._bulk = (float(s["bulk"][0]), float(s["bulk"][1]))
        self._penalty_batch = s["penalty_batch"]
        if (
            self._penalty_batch is None
            and self.mode == "penalty"
            and self._eigenvectors is not None
        ):
            self._penalty_batch = self.data.fixed
        self.history = [EstimateRecord.from_dict(r) for r in s["history"]]
        self.data.restore(int(s.get("data_drawn", 0)))
        self._spectrum = None
        self._sdopt_seconds = 0.0
        self._interval_start = None

    def close(self) -> None:
        """Close every logger that has a ``close()`` method."""
        for lg in self.loggers:
            close = getattr(lg, "close", None)
            if callable(close):
                close()
