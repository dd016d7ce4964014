"""Steering by the sharpness dimension, side by side with the optimizers users would pick instead.

Every task trains one small model from a seed, every method builds its optimizer for that task
and seed, and each (task, method, seed) run is cached as one JSON line, so the benchmark can be
killed and resumed. Per task a markdown table compares each method with the *tuned baseline*:
the task's base optimizer at the best point of a learning-rate grid.

Tasks (``TASKS``):

- ``grok-sgd``: exactly the default job of ``sdopt grok`` (``--mode none`` reproduces it bit
  for bit: seed 0 groks at step 900 in both): (a + b) mod 97, 40 % of the pairs for training
  (split seeded by the seed), ``GrokkingMLP(97, 32, 3, bias=False, init_scale=3.0)`` built
  right after ``torch.manual_seed(seed)``, full-batch SGD lr 2, momentum 0.9, weight decay
  5e-4, a budget of 1,200 steps, validation accuracy checked every 10 steps.
- ``grok-adamw``: the same data and model with the CLI's AdamW defaults (lr 3e-3, weight decay
  1, betas (0.9, 0.98)), full batch. Measured: the base reaches 95 % validation accuracy at step
  1,920 on seed 0 (0.2 % at step 800, 17 % at 1,200, 71 % at 1,600), so the budget is 4,000
  steps (about 2x; checked every 10 steps).
- ``mnist1d``: MNIST-1D (Greydanus, 2020) generated offline by
  ``mnist1d.data.make_dataset(get_dataset_args())`` (its own seed 42; nothing is downloaded),
  4,000 train / 1,000 test signals of 40 features; an MLP 40-256-256-10 (ReLU) built right after
  ``torch.manual_seed(seed)``; minibatch SGD (batch 100, a ``torch.Generator`` seeded by the
  seed), lr 0.1, momentum 0.9, no weight decay, 100 epochs (4,000 steps): the base overfits
  (measured on seed 0: train accuracy 1.000 from epoch 25 on, test 0.711, a gap of 0.289; test
  accuracy peaks at 0.716 near epoch 45 and stays within 0.01 of it up to epoch 150).

Metrics. Grokking tasks: the first checked step with validation accuracy >= 0.95 (never
reached: infinity), the wall seconds of training to it (evaluations excluded, sdopt's estimates
included) and the gradient evaluations to it; to save CPU a run stops 100 steps after it first
reaches 95 % and reports the validation accuracy at that stop. ``mnist1d``: final test
accuracy, final train accuracy and the gap train - test. A run whose training loss turns
non-finite stops there and counts as diverged (its metric: the 95 % step if it was reached
before, else never; on ``mnist1d`` the accuracies at divergence).

Methods (``METHODS``; each builds its optimizer for a task and a seed):

- ``base``: the task's base optimizer at its default LR.
- ``fixed-x0.033`` ... ``fixed-x30``: the base at 1/30, 1/10, 1/3, 1, 3, 10, 30 x the default LR
  (``fixed-x1`` is ``base``, run once). The tuned baseline of a task is the grid point with the
  best median metric over the seeds (chosen on the same seeds, so it is an optimistic
  baseline).
- ``sdopt-lr-x0.033``, ``-x0.33``, ``-x1``, ``-x3``: ``sdopt.SDOptimizer(mode="lr")`` around the
  base at that multiple of the default LR, curvature on the whole training set (grokking) or on
  a fixed batch of the first 1,000 training signals (``mnist1d``), ``exponent_map`` that of the
  base (``"momentum"`` for SGD with momentum, ``"adam"`` for AdamW), the run's seed, and
  ``**SDOPT_LR``.
- Controller designs, each from the default LR: ``sdopt-lr-reactive-x1`` (the first
  releases' reactive rule: ``controller={"anticipate": False, "smoothing": 0.5}``),
  ``sdopt-lr-edge2-x1`` (a target beyond the edge: ``target_edge_ratio=2``, where the tuned
  fixed LR of ``grok-sgd`` trains while it memorises) and, on minibatch tasks,
  ``sdopt-lr-minibatch-x1`` (curvature on a fresh training-size minibatch per estimate, from a
  shuffling ``DataLoader``: the minibatch Hessian's λ_max bounds SGD's batch sharpness from
  above, where the full-batch λ_max does not).
- ``sdopt-penalty`` (``**SDOPT_PENALTY``, strength 1e-3 unless the dict sets one) and
  ``sdopt-penalty-1e-2`` (strength 1e-2): ``mode="penalty"``, built the same way; penalty
  designs ``sdopt-penalty-edge`` (``penalty_target="edge"``: only the top eigenvalues at or
  beyond 0.9 of the edge) and ``sdopt-penalty-negative`` (``penalty_target="negative"``: only
  negative curvature), both at strength 1e-2.
- ``prodigy``: ``prodigyopt.Prodigy(lr=1.0, weight_decay=<task's>)``, its defaults otherwise
  (decoupled weight decay, betas (0.9, 0.999); it prints "Using decoupled weight decay" when
  built: captured into the run's record).
- ``schedulefree``: ``schedulefree.SGDScheduleFree(lr=<task's>, momentum=0.9,
  weight_decay=<task's>)`` for SGD tasks, ``AdamWScheduleFree(lr=<task's>,
  weight_decay=<task's>)`` for AdamW; ``.train()`` before training steps, ``.eval()`` before
  every evaluation (the evaluated weights are its averaged ``x`` sequence). At the base's LR and
  without warmup this is an untuned point: its authors advise 10-50x the classical LR for SGD,
  1-10x for AdamW, and warmup.
- ``dadapt``: ``dadaptation.DAdaptSGD(lr=1.0, momentum=0.9, weight_decay)`` for SGD tasks,
  ``DAdaptAdam(lr=1.0, weight_decay, decouple=True)`` for AdamW.
- ``grokfast``: the base at its default LR with ``sdopt.train.GrokfastEMA`` (alpha 0.98,
  lamb 2) applied to the gradient after ``backward()``.
- ``adamw-wd0.1``, ``adamw-wd0.3``, ``adamw-wd3`` (AdamW task only): the base with that weight
  decay; with the base's 1 a 4-point grid whose best is reported as ``adamw-tuned-wd``.
- ``sam`` (rho 0.05) and ``asam`` (rho 0.5, ``adaptive=True``): ``pytorch_optimizer.SAM``
  around the task's base optimizer class at its default LR and weight decay (two-step API:
  ``first_step`` / ``second_step``), at equal gradient evaluations: a SAM step costs two
  gradients, so SAM gets half the step budget (half the epochs on ``mnist1d``) and its
  grokking metric is counted in gradient evaluations (2 per step), not steps.

Gradient evaluations are counted in gradients of the training batch: 1 per step for the plain
optimizers, 2 for SAM; for ``SDOptimizer`` runs 1 per step, plus 2 per Hessian-vector product
of its estimates (``num_products`` summed over ``opt.history``), plus the gradients of the
penalty's recomputations (``mode="penalty"``: every ``penalty_every`` steps
``sdopt.dimension.penalty_gradient`` takes one gradient at the parameters and two per non-zero
random-sign direction, 3-5 in all; counted exactly by wrapping that function during the run).
Products and penalty gradients on the curvature batch are scaled by its size over the training
batch's (``mnist1d``: 1,000 / 100 = 10). ``SDOptimizer`` runs also record the largest
``edge_ratio``, the edge ratio in force at each estimate (the LR used in the interval before it
x lambda_max / edge: the records' ``edge_ratio_in_force``), its maximum and the fraction of
estimates with it in [0.7, 1.0], and the smallest and largest ``lr_scale``.

Statistics. Per method: the per-seed metric, median, interquartile range (q25-q75, linear
interpolation), and the ratio of its median to the tuned baseline's median with a 95 %
bootstrap interval (``scipy.stats.bootstrap`` on the two independent samples, statistic the
ratio of medians, 9,999 resamples, percentile method). Grokking: ratio < 1 is faster than the
tuned baseline; never-reached counts as infinity, so a resampled median may be infinite: the
interval's bounds are order statistics of the bootstrap distribution (a ratio inf / inf counts
as inf), an upper bound "inf" means more than 2.5 % of the resamples never get there, and the
interval is "—" when more than half of them are undefined or infinite. ``mnist1d``: ratio of
median test accuracies (> 1 is better).

Measured run times (one thread of a shared 2-core CPU, seed 0, training seconds; SDOPT_LR
``{"every": 50, "k": 3}``): ``grok-sgd``: ``base`` 3.8 s (stops at step 1,000), ``fixed-x3``
1.5 s, ``prodigy`` 4.1 s, ``sam`` 5.0 s, ``sdopt-lr-x1`` 95 s (20 estimates of ~530
Hessian-vector products each, 93 % of the run), ``sdopt-penalty`` about 13 s per 120 steps;
``grok-adamw``: ``base`` 7.8 s (stops at 2,020), ``schedulefree`` 13 s and ``asam`` 15 s (full
budget), ``sdopt-lr-x1`` 394 s (80 estimates); ``mnist1d``: ``base`` 3.0 s, ``dadapt`` 3.2 s,
``sdopt-lr-x1`` 90 s (80 estimates on the 1,000-signal batch). The plain methods take seconds;
the six ``sdopt-*`` methods are nearly all of the cost: the full benchmark (5 seeds) is about
1 h for ``grok-sgd``, 3-4 h for ``grok-adamw`` and 1 h for ``mnist1d`` at these settings, and
``--quick`` (2 seeds, 5 sdopt methods) about a third of that.

    python benchmarks/steering.py                            # all tasks, methods, 5 seeds
    python benchmarks/steering.py --quick                    # seeds 0 1, LR grid 1/3, 1, 3
    python benchmarks/steering.py --tasks grok-sgd --seeds 0 --methods base fixed-x3 sam
    python benchmarks/steering.py --sdopt-option every=25 --sdopt-option k=5 --json out.json
    python benchmarks/steering.py --tasks grok-sgd --cached-only   # tables from the cache only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import sdopt
from sdopt.tasks.grokking import GrokkingMLP, modular_arithmetic
from sdopt.train import GrokfastEMA

# keyword arguments of SDOptimizer for the sdopt-lr-* methods (tuned elsewhere; the command
# line adds or overrides keys with --sdopt-option KEY=JSON, for both sdopt methods)
SDOPT_LR: dict[str, Any] = {"every": 50, "k": 3}
# ... and for sdopt-penalty / sdopt-penalty-1e-2
SDOPT_PENALTY: dict[str, Any] = {"every": 50, "k": 3}

EARLY_STOP_AFTER = 100  # grokking: steps run after validation accuracy first reaches 95 %
GROK_THRESHOLD = 0.95
CACHE_VERSION = 1  # bump when the run loop changes what a cached run means
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "steering.jsonl"
PEERS = ("prodigyopt", "schedulefree", "dadaptation", "pytorch_optimizer", "mnist1d", "scipy")
INF = math.inf


# --------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Data:
    """A task's tensors: training set, evaluation set (validation or test), curvature batch."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    curvature: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Task:
    """One workload: data, model, base optimizer, budget and evaluation schedule.

    ``kind="grok"``: full batch, ``budget`` steps, validation accuracy checked every
    ``eval_every`` steps, metric the first step at >= 95 %. ``kind="classify"``: minibatches of
    ``batch_size``, ``budget`` epochs, accuracies recorded every ``eval_every`` epochs, metric
    the final test accuracy.
    """

    name: str
    kind: str
    optimizer: str  # "sgd" or "adamw": the base optimizer's class
    lr: float
    weight_decay: float
    budget: int
    eval_every: int
    make_data: Callable[[int], Data]
    build_model: Callable[[int], nn.Module]
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.98)
    batch_size: int | None = None  # None: full batch

    def base_class(self, weight_decay: float | None = None) -> tuple[type, dict[str, Any]]:
        """The base optimizer's class and its keyword arguments except ``lr``."""
        wd = self.weight_decay if weight_decay is None else weight_decay
        if self.optimizer == "sgd":
            return torch.optim.SGD, {"momentum": self.momentum, "weight_decay": wd}
        return torch.optim.AdamW, {"betas": self.betas, "weight_decay": wd}

    def base(self, params: Any, lr: float, weight_decay: float | None = None) -> Any:
        """The base optimizer factory: the task's optimizer at learning rate ``lr``."""
        cls, kwargs = self.base_class(weight_decay)
        return cls(params, lr=lr, **kwargs)

    @property
    def exponent_map(self) -> str:
        """The map of the base's own update (as ``sdopt grok --exponent-map auto``)."""
        if self.optimizer == "adamw":
            return "adam"
        return "momentum" if self.momentum > 0 else "gd"

    def signature(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "optimizer": self.optimizer, "lr": self.lr,
            "weight_decay": self.weight_decay, "budget": self.budget,
            "eval_every": self.eval_every, "momentum": self.momentum,
            "betas": list(self.betas), "batch_size": self.batch_size,
            "early_stop_after": EARLY_STOP_AFTER if self.kind == "grok" else None,
        }  # fmt: skip


def _grok_data(seed: int) -> Data:
    data = modular_arithmetic(97, "add", 0.4, seed=seed)
    return Data(train=data.train, test=data.val, curvature=data.train)


def _grok_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # as sdopt.train.train: the split first, then this seed, the model
    return GrokkingMLP(97, 32, 3, bias=False, init_scale=3.0)


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset generates the signals from templates (numpy, seed 42); only get_dataset
    # downloads, and it is not called
    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32)
    y = torch.tensor(d["y"], dtype=torch.int64)
    x_test = torch.tensor(d["x_test"], dtype=torch.float32)
    y_test = torch.tensor(d["y_test"], dtype=torch.int64)
    return x, y, x_test, y_test


def _mnist1d_data(seed: int) -> Data:
    x, y, x_test, y_test = _mnist1d_arrays()  # the same data for every seed
    return Data(train=(x, y), test=(x_test, y_test), curvature=(x[:1000], y[:1000]))


def _mnist1d_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


GROK_ADAMW_BUDGET = 4000
MNIST1D_EPOCHS = 100

TASKS: dict[str, Task] = {
    "grok-sgd": Task(
        "grok-sgd", "grok", "sgd", lr=2.0, weight_decay=5e-4, budget=1200, eval_every=10,
        make_data=_grok_data, build_model=_grok_model,
    ),
    "grok-adamw": Task(
        "grok-adamw", "grok", "adamw", lr=3e-3, weight_decay=1.0, budget=GROK_ADAMW_BUDGET,
        eval_every=10, make_data=_grok_data, build_model=_grok_model,
    ),
    "mnist1d": Task(
        "mnist1d", "classify", "sgd", lr=0.1, weight_decay=0.0, budget=MNIST1D_EPOCHS,
        eval_every=10, make_data=_mnist1d_data, build_model=_mnist1d_model, batch_size=100,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------- methods


@dataclass
class Setup:
    """What the run loop needs of a method: the optimizer and how to drive it."""

    optimizer: Any
    grad_hook: Callable[[], None] | None = None  # Grokfast: after backward, before step
    sam: bool = False  # two gradients per step (first_step / second_step)
    schedule_free: bool = False  # .train() / .eval() around evaluations
    sdopt: Any = None  # the SDOptimizer, if any


@dataclass(frozen=True)
class Method:
    """One competitor. ``kind`` picks the builder; ``options`` are its fixed settings."""

    name: str
    kind: str
    lr_factor: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    only: str | None = None  # applies only to tasks whose base optimizer is this
    grid: str | None = None  # "fixed", "sdopt-lr" or "wd": a grid the summary picks from

    minibatch: bool = False  # needs a minibatch task

    def applies(self, task: Task) -> bool:
        if self.minibatch and task.batch_size is None:
            return False
        return self.only is None or self.only == task.optimizer

    def sdopt_options(self, overrides: dict[str, Any]) -> dict[str, Any] | None:
        """The SDOptimizer keyword arguments (beyond model, data, mode, seed) or ``None``."""
        if self.kind != "sdopt":
            return None
        mode = self.options["mode"]
        options = {**(SDOPT_LR if mode == "lr" else SDOPT_PENALTY), **overrides}
        for key, value in self.options.items():  # a design's own settings
            if key not in ("mode", "curvature"):
                options[key] = value
        for key in ("mode", "seed", "model", "loss_fn", "data"):
            if key in options:
                raise ValueError(f"Invalid --sdopt-option: {key!r} is set by the benchmark")
        return options

    def spec(self, task: Task, overrides: dict[str, Any]) -> dict[str, Any]:
        """Everything that defines this method's runs on ``task`` (hashed into the cache key)."""
        spec: dict[str, Any] = {"kind": self.kind, "lr_factor": self.lr_factor}
        spec["options"] = dict(sorted(self.options.items()))
        if self.kind == "sdopt":
            spec["sdopt"] = dict(sorted(self.sdopt_options(overrides).items()))
            spec["sdopt_source"] = _sdopt_source_hash()
        return spec

    def build(
        self, task: Task, model: nn.Module, data: Data, seed: int, overrides: dict[str, Any]
    ) -> Setup:
        params = [p for p in model.parameters() if p.requires_grad]
        lr = task.lr * self.lr_factor
        wd = task.weight_decay
        sgd = task.optimizer == "sgd"
        if self.kind == "base":
            return Setup(task.base(params, lr, self.options.get("weight_decay")))
        if self.kind == "sdopt":
            options = {"exponent_map": task.exponent_map, **self.sdopt_options(overrides)}
            curvature: Any = data.curvature
            if self.options.get("curvature") == "minibatch":  # a fresh training-size minibatch
                loader_gen = torch.Generator().manual_seed(seed + 2)  # per estimate
                curvature = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(*data.train), batch_size=task.batch_size,
                    shuffle=True, generator=loader_gen,
                )  # fmt: skip
            opt = sdopt.SDOptimizer(
                task.base(params, lr), model=model, loss_fn=F.cross_entropy,
                data=curvature, mode=self.options["mode"], seed=seed, **options,
            )  # fmt: skip
            return Setup(opt, sdopt=opt)
        if self.kind == "prodigy":
            from prodigyopt import Prodigy

            return Setup(Prodigy(params, lr=1.0, weight_decay=wd))
        if self.kind == "schedulefree":
            import schedulefree

            if sgd:
                opt = schedulefree.SGDScheduleFree(
                    params, lr=lr, momentum=task.momentum, weight_decay=wd
                )
            else:
                opt = schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=wd)
            return Setup(opt, schedule_free=True)
        if self.kind == "dadapt":
            import dadaptation

            if sgd:
                opt = dadaptation.DAdaptSGD(params, lr=1.0, momentum=task.momentum, weight_decay=wd)
            else:
                opt = dadaptation.DAdaptAdam(params, lr=1.0, weight_decay=wd, decouple=True)
            return Setup(opt)
        if self.kind == "grokfast":
            ema = GrokfastEMA(params, alpha=0.98, lamb=2.0)
            return Setup(task.base(params, lr), grad_hook=ema.apply)
        if self.kind == "sam":
            from pytorch_optimizer import SAM

            cls, kwargs = task.base_class()
            opt = SAM(params, cls, rho=self.options["rho"], adaptive=self.options["adaptive"],
                      lr=lr, **kwargs)  # fmt: skip
            return Setup(opt, sam=True)
        raise ValueError(f"Invalid method kind: {self.kind!r}")


def _factor_name(f: float) -> str:
    return f"{f:.2g}"


LR_GRID = (1 / 30, 1 / 10, 1 / 3, 1.0, 3.0, 10.0, 30.0)
SDOPT_LR_GRID = (1 / 30, 1 / 3, 1.0, 3.0)
QUICK_GRID = (1 / 3, 1.0, 3.0)
WD_GRID = (0.1, 0.3, 3.0)


def _methods() -> dict[str, Method]:
    out = [Method("base", "base", grid="fixed")]
    out += [Method(f"fixed-x{_factor_name(f)}", "base", f, grid="fixed") for f in LR_GRID]
    out += [
        Method(f"sdopt-lr-x{_factor_name(f)}", "sdopt", f, {"mode": "lr"}, grid="sdopt-lr")
        for f in SDOPT_LR_GRID
    ]
    # controller designs (docs/results/steering.md), each from the default LR: the reactive
    # rule of the first releases; a target beyond the edge (2x: where the tuned fixed LR of
    # grok-sgd trains before it memorises); curvature on training-size minibatches (the
    # minibatch Hessian's lambda_max bounds SGD's batch sharpness from above)
    out += [
        Method("sdopt-lr-reactive-x1", "sdopt", 1.0,
               {"mode": "lr", "controller": {"anticipate": False, "smoothing": 0.5}}),
        Method("sdopt-lr-edge2-x1", "sdopt", 1.0,
               {"mode": "lr", "controller": {"target_edge_ratio": 2.0}}),
        Method("sdopt-lr-minibatch-x1", "sdopt", 1.0, {"mode": "lr", "curvature": "minibatch"},
               minibatch=True),
    ]  # fmt: skip
    out += [
        Method("sdopt-penalty", "sdopt", options={"mode": "penalty"}),
        # penalty designs: the top eigenvalues at or beyond 0.9 of the edge only; negative
        # curvature only (sdopt.SDOptimizer(penalty_target=...))
        Method(
            "sdopt-penalty-edge",
            "sdopt",
            options={"mode": "penalty", "penalty_target": "edge", "penalty_strength": 1e-2},
        ),
        Method(
            "sdopt-penalty-negative",
            "sdopt",
            options={"mode": "penalty", "penalty_target": "negative", "penalty_strength": 1e-2},
        ),
        Method(
            "sdopt-penalty-1e-2", "sdopt", options={"mode": "penalty", "penalty_strength": 1e-2}
        ),
        Method("prodigy", "prodigy"),
        Method("schedulefree", "schedulefree"),
        Method("dadapt", "dadapt"),
        Method("grokfast", "grokfast"),
    ]
    out += [
        Method(f"adamw-wd{w:g}", "base", options={"weight_decay": w}, only="adamw", grid="wd")
        for w in WD_GRID
    ]
    out += [
        Method("sam", "sam", options={"rho": 0.05, "adaptive": False}),
        Method("asam", "sam", options={"rho": 0.5, "adaptive": True}),
    ]
    return {m.name: m for m in out}


METHODS: dict[str, Method] = _methods()


def _in_quick_grid(method: Method) -> bool:
    if method.grid not in ("fixed", "sdopt-lr"):
        return True
    return any(math.isclose(method.lr_factor, f) for f in QUICK_GRID)


SDOPT_RUN_SOURCES = ("__init__.py", "_checks.py", "optim.py", "control.py", "records.py")
SDOPT_RUN_PACKAGES = ("curvature", "dimension", "spectrum")


@functools.lru_cache(maxsize=1)
def _sdopt_source_hash() -> str:
    """A fingerprint of sdopt's source: cached sdopt runs are redone when sdopt changes."""
    root = Path(sdopt.__file__).resolve().parent
    h = hashlib.sha256()
    # what an SDOptimizer run executes; the CLI, sweeps, plots and loggers do not change a run
    parts = [*SDOPT_RUN_SOURCES, *(f"{d}/**/*.py" for d in SDOPT_RUN_PACKAGES)]
    files = sorted({path for part in parts for path in root.glob(part)})
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------ run loop


@torch.no_grad()
def _accuracy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> float:
    x, y = batch
    return int((model(x).argmax(dim=-1) == y).sum()) / max(1, len(y))


@contextlib.contextmanager
def _evaluating(setup: Setup) -> Iterator[None]:
    """Schedule-free optimizers evaluate their averaged weights: ``.eval()`` then ``.train()``."""
    if setup.schedule_free:
        setup.optimizer.eval()
    try:
        yield
    finally:
        if setup.schedule_free:
            setup.optimizer.train()


@contextlib.contextmanager
def _counting_penalty_gradients(counter: dict[str, int]) -> Iterator[None]:
    """Count the gradients of ``sdopt.dimension.penalty_gradient`` (SDOptimizer looks the
    function up in ``sdopt.dimension`` at every recomputation): one at the parameters, unless
    given, and two per non-zero random-sign direction (the weights' positive and negative
    parts)."""
    import sdopt.dimension as dimension

    original = dimension.penalty_gradient

    def counted(*args: Any, **kwargs: Any) -> Tensor:
        weights = kwargs.get("weights")
        if weights is None:
            directions = 2
        else:
            directions = int(bool((weights > 0).any())) + int(bool((weights < 0).any()))
        counter["calls"] += 1
        if directions:
            counter["gradients"] += 2 * directions + (kwargs.get("gradient") is None)
        return original(*args, **kwargs)

    dimension.penalty_gradient = counted
    try:
        yield
    finally:
        dimension.penalty_gradient = original


def _train_step(setup: Setup, model: nn.Module, x: Tensor, y: Tensor) -> bool:
    """One optimizer step on ``(x, y)``; ``False`` (and no step) if the loss is not finite."""
    opt = setup.optimizer
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    if setup.sam:
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        return True
    if setup.grad_hook is not None:
        setup.grad_hook()
    opt.step()
    return True


def _sdopt_extra(setup: Setup, counter: dict[str, int], scale: float) -> float:
    """Gradient evaluations (in training-batch gradients) spent by sdopt so far."""
    if setup.sdopt is None:
        return 0.0
    products = sum(r.num_products for r in setup.sdopt.history)
    return scale * (2 * products + counter["gradients"])


def _sdopt_stats(setup: Setup, counter: dict[str, int], scale: float) -> dict[str, Any]:
    opt = setup.sdopt
    records = list(opt.history)
    ok = [r for r in records if r.ok]
    # the record's own ratio at the learning rate that produced the measured parameters
    finite = [r.edge_ratio_in_force for r in ok if math.isfinite(r.edge_ratio_in_force)]
    edge_ratios = [r.edge_ratio for r in ok if math.isfinite(r.edge_ratio)]
    scales = [r.lr_scale for r in ok]
    products = sum(r.num_products for r in records)
    return {
        "estimates": len(ok),
        "skipped_estimates": len(records) - len(ok),
        "hvp_products": products,
        "penalty_recomputations": counter["calls"],
        "penalty_gradients": counter["gradients"],
        "sdopt_grad_evals": scale * (2 * products + counter["gradients"]),
        "max_edge_ratio": max(edge_ratios, default=None),
        "max_edge_ratio_in_force": max(finite, default=None),
        "frac_in_force_0.7_1.0": (
            sum(0.7 <= v <= 1.0 for v in finite) / len(finite) if finite else None
        ),
        "edge_ratio_in_force": [round(v, 4) for v in finite],
        "lr_scale_min": min(scales, default=None),
        "lr_scale_max": max(scales, default=None),
        "max_sharpness_dimension": max(
            (r.sharpness_dimension for r in ok if math.isfinite(r.sharpness_dimension)),
            default=None,
        ),
        "failures": dict(getattr(opt, "failures", {}) or {}),
        # False flags a penalty run whose recomputations were not seen (sdopt no longer calls
        # sdopt.dimension.penalty_gradient): its penalty gradients are then missing above
        "penalty_counted": counter["calls"] > 0 if opt.mode == "penalty" else None,
    }


def run(task: Task, method: Method, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train ``task``'s model with ``method`` from ``seed``; return the run's record."""
    data = task.make_data(seed)
    model = task.build_model(seed)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # Prodigy prints "Using decoupled weight decay"
        setup = method.build(task, model, data, seed, overrides)
    grads_per_step = 2 if setup.sam else 1
    batch = len(data.train[1]) if task.batch_size is None else task.batch_size
    curvature_size = (
        batch if method.options.get("curvature") == "minibatch" else len(data.curvature[1])
    )
    scale = curvature_size / batch  # curvature-batch gradients in training gradients
    counter = {"calls": 0, "gradients": 0}
    out: dict[str, Any] = {}
    caught: list[str] = []
    start = time.perf_counter()
    train_seconds = 0.0
    step = 0
    diverged = False
    with warnings.catch_warnings(record=True) as messages, contextlib.ExitStack() as stack:
        warnings.simplefilter("always")
        if setup.sdopt is not None and method.options["mode"] == "penalty":
            stack.enter_context(_counting_penalty_gradients(counter))
        if setup.schedule_free:
            setup.optimizer.train()
        model.train()
        if task.kind == "grok":
            budget = task.budget // grads_per_step
            (x, y), curve = data.train, []
            step_95 = seconds_95 = evals_95 = stop_at = None
            while step < budget and (stop_at is None or step < stop_at):
                t0 = time.perf_counter()
                finite = _train_step(setup, model, x, y)
                train_seconds += time.perf_counter() - t0
                if not finite:
                    diverged = True
                    break
                step += 1
                if step % task.eval_every == 0:
                    with _evaluating(setup):
                        val = _accuracy(model, data.test)
                    curve.append([step, val])
                    if step_95 is None and val >= GROK_THRESHOLD:
                        step_95, seconds_95 = step, train_seconds
                        evals_95 = step * grads_per_step + _sdopt_extra(setup, counter, scale)
                        stop_at = step + EARLY_STOP_AFTER
            with _evaluating(setup):
                out["val_accuracy"] = _accuracy(model, data.test)
                out["train_accuracy"] = _accuracy(model, data.train)
            out.update(
                budget_steps=budget,
                step_95=step_95,
                # the compared metric: steps, or gradient evaluations for SAM (2 per step)
                metric=None if step_95 is None else step_95 * grads_per_step,
                seconds_95=seconds_95,
                grad_evals_95=evals_95,
                stopped_early=stop_at is not None and step >= stop_at and step < budget,
                curve=curve,
            )
        else:
            epochs = task.budget // grads_per_step
            generator = torch.Generator().manual_seed(seed)
            x_all, y_all = data.train
            n, curve = len(y_all), []
            epoch = 0
            for epoch in range(1, epochs + 1):
                order = torch.randperm(n, generator=generator)
                for i in range(0, n, batch):
                    idx = order[i : i + batch]
                    t0 = time.perf_counter()
                    finite = _train_step(setup, model, x_all[idx], y_all[idx])
                    train_seconds += time.perf_counter() - t0
                    if not finite:
                        diverged = True
                        break
                    step += 1
                if diverged:
                    break
                if epoch % task.eval_every == 0:
                    with _evaluating(setup):
                        curve.append(
                            [epoch, _accuracy(model, data.train), _accuracy(model, data.test)]
                        )
            with _evaluating(setup):
                train_acc = _accuracy(model, data.train)
                test_acc = _accuracy(model, data.test)
            out.update(
                budget_epochs=epochs,
                epochs=epoch,
                train_accuracy=train_acc,
                test_accuracy=test_acc,
                gap=train_acc - test_acc,
                metric=test_acc,
                curve=curve,
            )
        for m in messages:
            text = f"{m.category.__name__}: {m.message}"
            if text not in caught:
                caught.append(text)
    out.update(
        steps=step,
        grad_evals=step * grads_per_step + _sdopt_extra(setup, counter, scale),
        diverged=diverged,
        seconds=time.perf_counter() - start,
        train_seconds=train_seconds,
        warnings=caught[:5],
        printed=printed.getvalue().strip() or None,
    )
    group = setup.optimizer.param_groups[0]
    if "d" in group:  # Prodigy, D-Adaptation: the adapted step size d (lr multiplies it)
        out["adapted_d"] = float(group["d"])
    if setup.sdopt is not None:
        out.update(_sdopt_stats(setup, counter, scale))
        close = getattr(setup.sdopt, "close", None)
        if callable(close):
            close()
    return out


# --------------------------------------------------------------------------------------- cache


def _options_hash(task: Task, method: Method, overrides: dict[str, Any]) -> str:
    payload = {
        "version": CACHE_VERSION,
        "task": task.signature(),
        "method": method.spec(task, overrides),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _loose_match(
    cache: dict[tuple[str, int, str], dict[str, Any]],
    task: Task,
    method: Method,
    seed: int,
    overrides: dict[str, Any],
) -> dict[str, Any] | None:
    """``--cached-only``: the latest cached run of this method and seed whose settings match,
    whatever sdopt source it ran on (its fingerprint stays in the row's ``spec``)."""
    want = {k: v for k, v in _strict(method.spec(task, overrides)).items() if k != "sdopt_source"}
    found = None
    for (name, s, _), row in cache.items():
        if name != task.name or s != seed:
            continue
        spec = {k: v for k, v in row.get("spec", {}).items() if k != "sdopt_source"}
        if spec == want:
            found = row
    return found


def _load_cache(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Cached runs by (task, seed, options hash): the method's name is not part of what a run
    is, so ``fixed-x1`` reuses ``base``. Unreadable lines (a run killed mid-write) are skipped."""
    cache: dict[tuple[str, int, str], dict[str, Any]] = {}
    if not path.exists():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            cache[(row["task"], int(row["seed"]), row["options_hash"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return cache


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(_strict(row), default=_json_default, allow_nan=False) + "\n")


def _strict(obj: Any) -> Any:
    """Strict JSON: infinities (never reached) as "inf", NaN as null."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


# ---------------------------------------------------------------------------------- statistics


def _values(rows: list[dict[str, Any]], key: str, missing: float = INF) -> list[float]:
    return [missing if r.get(key) is None else float(r[key]) for r in rows]


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile that keeps infinities (numpy's gives nan at inf - inf)."""
    v = sorted(values)
    h = (len(v) - 1) * q
    lo, hi = v[math.floor(h)], v[math.ceil(h)]
    frac = h - math.floor(h)
    if frac == 0 or lo == hi:
        return lo
    if math.isinf(hi):
        return INF
    return lo + frac * (hi - lo)


def _median(values: list[float]) -> float:
    return _quantile(values, 0.5) if values else math.nan


def _ratio_interval(a: list[float], b: list[float]) -> tuple[float, float] | str:
    """95 % bootstrap interval of median(a) / median(b) (two independent samples)."""
    if len(a) < 2 or len(b) < 2:
        return "n<2"
    from scipy import stats

    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.median(x, axis=axis) / np.median(y, axis=axis)

    kwargs: dict[str, Any] = {"n_resamples": 9999, "method": "percentile", "vectorized": True}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            res = stats.bootstrap(
                (np.asarray(a), np.asarray(b)), ratio, rng=np.random.default_rng(0), **kwargs
            )
        except TypeError:  # scipy < 1.15: random_state
            res = stats.bootstrap((np.asarray(a), np.asarray(b)), ratio, random_state=0, **kwargs)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    dist = np.where(np.isnan(dist), np.inf, dist)  # inf / inf: neither ever gets there
    if np.mean(~np.isfinite(dist)) > 0.5:
        return "—"
    dist = np.sort(dist)
    n = len(dist)
    lo = dist[max(0, math.ceil(0.025 * n) - 1)]
    hi = dist[min(n - 1, math.ceil(0.975 * n) - 1)]
    return float(lo), float(hi)


def _pick_best(candidates: dict[str, list[float]], higher: bool) -> str | None:
    """The candidate with the best median (ties: more finite values, then the better mean)."""
    if not candidates:
        return None

    def key(name: str) -> tuple[float, int, float]:
        v = candidates[name]
        finite = [x for x in v if math.isfinite(x)]
        mean = sum(finite) / len(finite) if finite else INF
        if higher:
            return (-_median(v), -len(finite), -mean)
        return (_median(v), -len(finite), mean)

    return min(candidates, key=key)


def summarize(task: Task, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method statistics, the tuned baseline and ``adamw-tuned-wd``."""
    grok = task.kind == "grok"

    def metric(rows: list[dict[str, Any]]) -> list[float]:
        return _values(rows, "metric", INF if grok else math.nan)

    fixed = {m: metric(r) for m, r in runs.items() if METHODS[m].grid == "fixed"}
    tuned = _pick_best(fixed, higher=not grok)
    wd = {m: metric(r) for m, r in runs.items() if METHODS[m].grid == "wd" or m == "base"}
    tuned_wd = (
        _pick_best(wd, higher=not grok)
        if task.optimizer == "adamw" and any(METHODS[m].grid == "wd" for m in wd)
        else None
    )
    reference = metric(runs[tuned]) if tuned else None
    out: dict[str, Any] = {"tuned_baseline": tuned, "adamw_tuned_wd": tuned_wd, "methods": {}}
    for name, rows in runs.items():
        values = metric(rows)
        s: dict[str, Any] = {
            "seeds": [r["seed"] for r in rows],
            "values": values,
            "median": _median(values),
            "q25": _quantile(values, 0.25),
            "q75": _quantile(values, 0.75),
            "diverged": sum(bool(r["diverged"]) for r in rows),
            "n": len(rows),
            "grad_evals": _median(_values(rows, "grad_evals")),
            "seconds": _median(_values(rows, "train_seconds")),
        }
        if reference is not None:
            with np.errstate(all="ignore"):
                s["ratio"] = float(np.float64(s["median"]) / np.float64(_median(reference)))
            s["ratio_ci"] = _ratio_interval(values, reference)
        if grok:
            s["seconds_95"] = _median(_values(rows, "seconds_95"))
            s["grad_evals_95"] = _median(_values(rows, "grad_evals_95"))
            s["val_accuracy"] = _median(_values(rows, "val_accuracy", math.nan))
        else:
            for key in ("test_accuracy", "train_accuracy", "gap"):
                s[key] = _median(_values(rows, key, math.nan))
        if METHODS[name].kind == "sdopt":
            for key in (
                "max_edge_ratio", "max_edge_ratio_in_force", "frac_in_force_0.7_1.0",
                "lr_scale_min", "lr_scale_max", "estimates", "hvp_products",
                "penalty_gradients", "sdopt_grad_evals",
            ):  # fmt: skip
                vals = [r[key] for r in rows if r.get(key) is not None]
                s[key] = _median([float(v) for v in vals]) if vals else None
            s["lr_scale_min_all"] = min(
                (r["lr_scale_min"] for r in rows if r.get("lr_scale_min") is not None),
                default=None,
            )
            s["lr_scale_max_all"] = max(
                (r["lr_scale_max"] for r in rows if r.get("lr_scale_max") is not None),
                default=None,
            )
        out["methods"][name] = s
    return out


# -------------------------------------------------------------------------------------- output


def _num(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


def _steps(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.0f}"


def print_table(task: Task, summary: dict[str, Any]) -> None:
    grok = task.kind == "grok"
    tuned = summary["tuned_baseline"]
    methods = summary["methods"]
    print(f"### {task.name}")
    print()
    if grok:
        print(
            f"Metric: steps to {GROK_THRESHOLD * 100:.0f} % validation accuracy (checked every "
            f"{task.eval_every} steps, budget {task.budget} steps; never reached: —, counted "
            "as ∞; `sam`/`asam`: gradient evaluations, half the steps). Ratio: median / tuned "
            f"baseline's median (< 1: faster). Runs stop {EARLY_STOP_AFTER} steps after "
            f"{GROK_THRESHOLD * 100:.0f} %: 'val acc' is at that stop."
        )
    else:
        print(
            f"Metric: final test accuracy after {task.budget} epochs (`sam`/`asam`: "
            f"{task.budget // 2}, at equal gradient evaluations). Ratio: median / tuned "
            "baseline's median (> 1: better)."
        )
    print(f"Tuned baseline: `{tuned}`" if tuned else "Tuned baseline: none (no fixed-LR run)")
    if summary.get("adamw_tuned_wd"):
        print(f"`adamw-tuned-wd` = `{summary['adamw_tuned_wd']}` (best of the weight-decay grid)")
    print()
    if grok:
        head = (
            "| method | steps to 95 % (per seed) | median | IQR | ratio [95 % CI] | "
            "wall s to 95 % | grad evals to 95 % | grad evals (run) | diverged | val acc |"
        )
    else:
        head = (
            "| method | test acc (per seed) | median | IQR | ratio [95 % CI] | wall s | "
            "grad evals | diverged | train acc | gap |"
        )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rows = list(methods.items())
    if summary.get("adamw_tuned_wd"):
        rows.append((f"adamw-tuned-wd (= {summary['adamw_tuned_wd']})",
                     methods[summary["adamw_tuned_wd"]]))  # fmt: skip
    for name, s in rows:
        fmt = _steps if grok else (lambda v: _num(v, ".3f"))
        per_seed = ", ".join(fmt(v) for v in s["values"])
        quartile = (
            (lambda v: _num(v, ".0f")) if grok else fmt
        )  # ∞ where a quartile never gets there
        iqr = f"{quartile(s['q25'])}–{quartile(s['q75'])}"
        ratio = "—"
        if "ratio" in s:
            ci = s["ratio_ci"]
            ci_text = f"({ci})" if isinstance(ci, str) else f"[{_num(ci[0])}, {_num(ci[1])}]"
            ratio = f"{_num(s['ratio'])} {ci_text}"
        label = f"`{name}`" + (" (tuned)" if name == tuned else "")
        diverged = f"{s['diverged']}/{s['n']}"
        if grok:
            cells = [
                label, per_seed, fmt(s["median"]), iqr, ratio, _num(s["seconds_95"], ".1f"),
                _num(s["grad_evals_95"], ".0f"), _num(s["grad_evals"], ".0f"), diverged,
                _num(s["val_accuracy"], ".3f"),
            ]  # fmt: skip
        else:
            cells = [
                label, per_seed, fmt(s["median"]), iqr, ratio, _num(s["seconds"], ".1f"),
                _num(s["grad_evals"], ".0f"), diverged, _num(s["train_accuracy"], ".3f"),
                _num(s["gap"], ".3f"),
            ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    sd = [(n, s) for n, s in methods.items() if METHODS[n].kind == "sdopt"]
    if sd:
        print()
        print(
            "| sdopt method | estimates | max edge ratio | max edge ratio in force | "
            "in force in [0.7, 1] | lr scale min–max (all seeds) | HVPs | penalty grads | "
            "sdopt grad evals |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, s in sd:
            print(
                f"| `{name}` | {_num(s['estimates'], '.0f')} | {_num(s['max_edge_ratio'])} | "
                f"{_num(s['max_edge_ratio_in_force'])} | "
                f"{_num(s['frac_in_force_0.7_1.0'], '.2f')} | "
                f"{_num(s['lr_scale_min_all'])}–{_num(s['lr_scale_max_all'])} | "
                f"{_num(s['hvp_products'], '.0f')} | {_num(s['penalty_gradients'], '.0f')} | "
                f"{_num(s['sdopt_grad_evals'], '.0f')} |"
            )
        print()
        print(
            "(medians over seeds; gradient evaluations in training-batch gradients, a "
            "Hessian-vector product = 2)"
        )
    print()


def _versions() -> str:
    parts = [f"torch {torch.__version__}", f"sdopt {sdopt.__version__} ({_sdopt_source_hash()})"]
    for name in PEERS:
        try:
            parts.append(f"{name} {metadata.version(name.replace('_', '-'))}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------- CLI


def _parse_option(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
        raise SystemExit(f"Invalid --sdopt-option: {item!r} (must be KEY=JSON, e.g. every=25)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=None,
        help="default: every method that applies to the task",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 3 4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--fresh", action="store_true", help="ignore (but append to) the cache")
    parser.add_argument(
        "--cached-only", action="store_true",
        help="run nothing: summarise the runs of the plan already in the cache (methods may then "
        "have different seeds; the table gives n per method)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write all runs and the summary")
    parser.add_argument(
        "--quick", action="store_true", help="seeds 0 1 and LR grid points 1/3, 1, 3 only"
    )
    parser.add_argument(
        "--sdopt-option", action="append", default=[], metavar="KEY=JSON",
        help="add or override a keyword of SDOptimizer for the sdopt-lr-* and sdopt-penalty* "
        "methods (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    overrides = dict(_parse_option(item) for item in args.sdopt_option)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # only before any parallel work
        torch.set_num_interop_threads(args.threads)

    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    print(f"$ {command}")
    print()
    print(f"{_versions()}; {args.threads} thread(s); seeds {seeds}")
    print(f"SDOPT_LR = {json.dumps({**SDOPT_LR, **overrides})}")
    print(f"SDOPT_PENALTY = {json.dumps({**SDOPT_PENALTY, **overrides})}")
    print(f"cache: {args.cache}{' (ignored: --fresh)' if args.fresh else ''}")
    print()

    cache = {} if args.fresh else _load_cache(args.cache)
    plan: list[tuple[Task, Method, int, str]] = []
    for task_name in args.tasks:
        task = TASKS[task_name]
        names = args.methods if args.methods is not None else list(METHODS)
        for name in names:
            method = METHODS[name]
            if not method.applies(task):
                continue
            if args.quick and args.methods is None and not _in_quick_grid(method):
                continue
            plan.extend(
                (task, method, seed, _options_hash(task, method, overrides)) for seed in seeds
            )

    all_runs: list[dict[str, Any]] = []
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for i, (task, method, seed, key) in enumerate(plan, 1):
        row = cache.get((task.name, seed, key))
        if row is None and args.cached_only:
            row = _loose_match(cache, task, method, seed, overrides)
        cached = row is not None
        if row is None and args.cached_only:
            continue
        if row is None:
            result = run(task, method, seed, overrides)
            row = {
                "task": task.name, "method": method.name, "seed": seed, "options_hash": key,
                "spec": method.spec(task, overrides), **result,
            }  # fmt: skip
            _append(args.cache, row)
            cache[(task.name, seed, key)] = row
        row = {**row, "method": method.name}  # fixed-x1 reuses base's run
        all_runs.append(row)
        by_task.setdefault(task.name, {}).setdefault(method.name, []).append(row)
        print(
            f"[{i}/{len(plan)}] {task.name} {method.name} seed {seed}: "
            f"{'metric (steps to 95 %)' if task.kind == 'grok' else 'test acc'} "
            f"{_steps(_values([row], 'metric')[0]) if task.kind == 'grok' else _num(row['metric'])}, "
            f"{row['train_seconds']:.1f} s train / {row['seconds']:.1f} s run"
            f"{', diverged' if row['diverged'] else ''}{' (cached)' if cached else ''}",
            file=sys.stderr,
            flush=True,
        )

    summaries = {}
    for task_name, runs in by_task.items():
        summaries[task_name] = summarize(TASKS[task_name], runs)
        print_table(TASKS[task_name], summaries[task_name])
    if args.json is not None:
        payload = {
            "command": command, "versions": _versions(), "seeds": seeds,
            "sdopt_lr": {**SDOPT_LR, **overrides}, "sdopt_penalty": {**SDOPT_PENALTY, **overrides},
            "runs": all_runs, "summary": summaries,
        }  # fmt: skip
        text = json.dumps(_strict(payload), indent=2, default=_json_default, allow_nan=False)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
