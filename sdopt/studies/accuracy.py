"""The accuracy battery: realistic training states with an exact sharpness dimension.

GitHub issue 10, item 4. An estimator of the sharpness dimension (SD, the Kaplan–Yorke dimension
of the exponents of an optimizer's step map; Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at
the Edge of Stability", arXiv:2604.19740, Def. 4.1/4.2) can only be trusted on states like those
it will meet in training, and THEORY.md §8 shows how an estimator that looks right on one state
can report ``0.00 ± 0.0`` where the exact SD is 96 % of ``d``. This module builds such states
deterministically (seeded, CPU, data generated locally: scikit-learn's bundled ``load_digits``,
modular arithmetic as in :mod:`sdopt.tasks.grokking`, Gaussian mixtures; nothing is downloaded),
computes their ground truth from dense float64 Hessians, and evaluates any estimator against it.

The states cover: initialisation, memorisation, the edge of stability, after grokking; tanh,
GELU, ReLU and square-activation MLPs, a CNN with BatchNorm in train mode, a one-layer
self-attention model, a convex (softmax-regression) model whose exact SD is 0 or small;
the full-batch and minibatch protocols; the ``gd``, ``momentum`` and ``adam`` exponent maps
(:mod:`sdopt.dimension.exponents`). Every model is small (``d`` between 300 and 2,500) so that
its dense Hessian takes seconds.

The states (``*``: in the quick battery; d, exact SD at the default seed):

=========================  ==========  =========  =====  =======  ==========================
state                      protocol    map           d   SD       what it exercises
=========================  ==========  =========  =====  =======  ==========================
tanh-init                  full-batch  gd          2410  2387.3   initialisation
tanh-gd20 *                full-batch  gd          2410  2284.3   THEORY.md §8, n_neg = 383
tanh-eos *                 full-batch  gd          1482  1366.5   edge of stability (1.01)
gelu-minibatch             minibatch   gd          1930  1909.3   mid-training, GELU
relu-minibatch *           minibatch   gd          1440  1429.2   the paper's ReLU MLP
softmax-stable *           full-batch  gd           333  0        convex, SD exactly 0
softmax-eos *              full-batch  gd           333  5.1      convex at the edge
grok-memorising            full-batch  adam        2040  473.8    memorising
grok-grokked *             full-batch  adam        2040  181.9    after grokking, Adam edge
cnn-bn-momentum            minibatch   momentum    1246  1042.9   BatchNorm in train mode
attention-adam             full-batch  adam        1350  1281.9   self-attention
gelu-adam-minibatch        minibatch   adam        2054  1968.9   Adam, minibatch
tanh-heavy-ball *          full-batch  momentum    1893  1513.9   heavy ball, full batch
=========================  ==========  =========  =====  =======  ==========================

Typical use::

    from sdopt.studies.accuracy import battery_states, evaluate, summarize

    states = battery_states(quick=True)
    rows = [evaluate(s) for s in states]  # the estimator's default method
    print(summarize(rows))

``benchmarks/sd_accuracy.py`` prints the table for every estimator side by side.

Targets of the issue for an estimator (:func:`target_checks`): on every state its error is at
most ``max(10 % of min(SD, d − SD), 2 × its reported uncertainty)``; its ``± 2σ`` interval covers
the exact value on at least 90 % of states; its uncertainty is never vacuous (at most 10 % of
``min(SD, d − SD)`` or at most 2); and it never says ``≈ 0`` (a tenth of the exact value or
less) where the exact SD exceeds ``0.1·d``, or the reverse.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sdopt.dimension import (
    SharpnessDimensionEstimate,
    adam_preconditioner,
    edge_of_stability,
    estimate_sharpness_dimension,
)

__all__ = [
    "COVERAGE_SLACK",
    "STATE_NAMES",
    "ZERO_TOL",
    "BatteryState",
    "battery_states",
    "evaluate",
    "exact_estimate",
    "exact_sharpness_dimension",
    "summarize",
    "target_checks",
    "to_float64",
]

# ---------------------------------------------------------------------------------------------
# the state record


@dataclass
class BatteryState:
    """One training state of the battery, with its exact facts.

    Attributes:
        name: short identifier (``"tanh-gd20"``).
        description: how the state was made and what it is meant to exercise.
        model: the trained ``nn.Module`` in float32, in the mode it was trained in (BatchNorm in
            train mode stays in train mode: SD is that of the train-mode loss).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor`` (the training loss).
        data: one ``(inputs, targets)`` batch (``protocol="full-batch"``) or a list of them
            (``protocol="minibatch"``, one Hessian per batch).
        lr: the learning rate ``η`` of the map (the one the model was trained with).
        protocol: ``"full-batch"`` or ``"minibatch"``.
        exponent_map: ``"gd"``, ``"momentum"`` or ``"adam"``.
        momentum: heavy-ball ``β`` (``"momentum"``) or Adam's ``β₁`` (``"adam"``); 0 for ``"gd"``.
        preconditioner: Adam's frozen preconditioner (flat float64, parameters in model order,
            from :func:`~sdopt.dimension.adam_preconditioner` with ``missing="frozen"``) for the
            ``"adam"`` map, else ``None``.
        dim: number of parameters ``d``.
        exact_sd: SD from dense float64 Hessians (:func:`exact_sharpness_dimension`).
        n_neg: number of negative eigenvalues (below ``−ZERO_TOL·max|α|``: exact zeros, which
            eigvalsh returns with either sign, are not counted).
        n_edge: number of eigenvalues above ``edge_of_stability(map, β) / η``.
        lambda_max, lambda_min: the extreme eigenvalues. For the minibatch protocol these four
            facts are those of the position-averaged spectrum (each batch's eigenvalues sorted,
            then averaged position by position, as the exponents are), so ``lambda_max`` is the
            mean of the per-batch maxima and ``n_edge > 0`` exactly when ``edge_ratio > 1``.
            For the ``"adam"`` map they are eigenvalues of ``P^{-1/2} H P^{-1/2}``.
        build_seconds: time to build (train) the state; exact_seconds: time of its ground truth.
        tags: what the state exercises (``"init"``, ``"edge"``, ``"small-sd"``, ...).
        info: measured facts of the training run (e.g. ``steps``, ``train_accuracy``,
            ``val_accuracy`` of the grokking states).
    """

    name: str
    description: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    data: Any
    lr: float
    protocol: str
    exponent_map: str
    momentum: float = 0.0
    preconditioner: Tensor | None = None
    dim: int = 0
    exact_sd: float = math.nan
    n_neg: int = 0
    n_edge: int = 0
    lambda_max: float = math.nan
    lambda_min: float = math.nan
    build_seconds: float = math.nan
    exact_seconds: float = math.nan
    tags: tuple[str, ...] = field(default_factory=tuple)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def edge(self) -> float:
        """``edge_of_stability(map, β)``: the value of ``η·λ_max`` where the map turns unstable."""
        return edge_of_stability(self.exponent_map, self.momentum)

    @property
    def edge_ratio(self) -> float:
        """``η·λ_max / edge``: 1 at the edge of stability, above 1 beyond it."""
        return self.lr * self.lambda_max / self.edge

    @property
    def codim(self) -> float:
        """``d − SD`` of the exact value."""
        return self.dim - self.exact_sd

    @property
    def scale(self) -> float:
        """``min(SD, |d − SD|)``: the scale the issue's error targets are relative to.

        (The heavy-ball and Adam-with-momentum maps have ``2d`` exponents, so their SD may
        exceed ``d``; their bulk sits at ``SD ≈ d`` as GD's does, hence the absolute value.)
        """
        return min(self.exact_sd, abs(self.dim - self.exact_sd))

    def estimator_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that describe the state's map for the estimator."""
        return {
            "protocol": self.protocol,
            "exponent_map": self.exponent_map,
            "momentum": self.momentum,
            "preconditioner": self.preconditioner,
        }


# ---------------------------------------------------------------------------------------------
# ground truth


def to_float64(obj: Any) -> Any:
    """A copy of ``obj`` with every floating-point tensor cast to float64 (others kept).

    Recurses through tuples, lists and dicts, so ``(inputs, targets)`` pairs and lists of them
    convert; integer tensors (class labels, tokens) are returned as they are.
    """
    if isinstance(obj, Tensor):
        return obj.to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(to_float64(o) for o in obj)
    if isinstance(obj, list):
        return [to_float64(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_float64(v) for k, v in obj.items()}
    return obj


def exact_estimate(state: BatteryState) -> SharpnessDimensionEstimate:
    """The exact estimate (dense float64 Hessians) of ``state``, with its eigenvalues.

    A float64 deep copy of the model (same train/eval mode) and of the data is passed to
    :func:`~sdopt.dimension.estimate_sharpness_dimension` with ``method="exact"`` and the
    state's protocol, map, momentum and preconditioner; the state itself is not modified.
    """
    model = copy.deepcopy(state.model).to(torch.float64)
    pre = state.preconditioner
    return estimate_sharpness_dimension(
        model, state.loss_fn, to_float64(state.data), state.lr, method="exact",
        protocol=state.protocol, exponent_map=state.exponent_map, momentum=state.momentum,
        preconditioner=None if pre is None else pre.to(torch.float64),
    )  # fmt: skip


def exact_sharpness_dimension(state: BatteryState) -> float:
    """The ground-truth SD of ``state`` from dense float64 Hessians (:func:`exact_estimate`)."""
    return float(exact_estimate(state).value)


ZERO_TOL = 1e-10
"""Eigenvalues within ``ZERO_TOL·max|α|`` of 0 are rounding noise (e.g. dead ReLU units, whose
Hessian rows vanish): :attr:`BatteryState.n_neg` does not count them."""


def _fill_facts(state: BatteryState) -> BatteryState:
    start = time.perf_counter()
    est = exact_estimate(state)
    state.exact_seconds = time.perf_counter() - start
    assert est.eigenvalues is not None
    # position-averaged sorted spectrum (one row per minibatch; a single row for full batch)
    ev = torch.sort(est.eigenvalues, dim=1, descending=True).values.mean(dim=0)
    state.dim = int(est.dim)
    state.exact_sd = float(est.value)
    state.n_neg = int((ev < -ZERO_TOL * ev.abs().max()).sum())
    state.n_edge = int((ev > state.edge / state.lr).sum())
    state.lambda_max = float(ev[0])
    state.lambda_min = float(ev[-1])
    return state


# ---------------------------------------------------------------------------------------------
# data


def _digits(n_train: int = 1024, seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits (no download), scaled to [0, 1]; a seeded train split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the "science" extra
        raise ImportError(
            'the accuracy battery needs scikit-learn: pip install "sdopt[science]"'
        ) from exc
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n_train]
    return torch.tensor(x / 16.0, dtype=torch.float32)[idx], torch.tensor(y)[idx]


def _gaussian_mixture(
    n: int, dim: int, classes: int, separation: float, seed: int
) -> tuple[Tensor, Tensor]:
    """``n`` points of ``classes`` overlapping isotropic Gaussians in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(classes, dim, generator=g) / math.sqrt(dim)
    y = torch.randint(classes, (n,), generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)
    return x, y


def _batches(x: Any, y: Tensor, size: int, count: int, seed: int) -> list[tuple[Any, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    return [
        (x[order[i * size : (i + 1) * size]], y[order[i * size : (i + 1) * size]])
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------
# losses and models (module-level, so states print and pickle cleanly)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy."""
    return nn.functional.cross_entropy(outputs, targets)


def one_hot_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``½‖outputs − onehot(targets)‖²`` averaged over the batch (Cohen et al.'s MSE)."""
    onehot = nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * ((outputs - onehot) ** 2).sum(dim=-1).mean()


class ReferenceSoftmax(nn.Module):
    """Softmax regression with a reference class: logits ``[0, W x + b]``.

    Plain ``nn.Linear`` logits have an exact null space of the cross-entropy Hessian (adding the
    same vector to every class's weights changes nothing), whose eigenvalues are rounding noise
    of either sign; fixing the first class's logit at 0 removes it, so on overlapping data the
    Hessian is positive definite and the exact SD below the edge is exactly 0.
    """

    def __init__(self, in_features: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, classes - 1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)


class SquareMLP(nn.Module):
    """Gromov's grokking MLP: ``[onehot(a), onehot(b)] -> Linear -> x² -> Linear`` (no biases).

    (A. Gromov, "Grokking modular arithmetic", 2023.) Trained with MSE on one-hot targets and
    AdamW it memorises, then generalises within a thousand steps at small ``p``.
    """

    def __init__(self, p: int, width: int) -> None:
        super().__init__()
        self.p = p
        self.hidden = nn.Linear(2 * p, width, bias=False)
        self.out = nn.Linear(width, p, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        dtype = self.hidden.weight.dtype
        a = nn.functional.one_hot(tokens[:, 0], self.p).to(dtype)
        b = nn.functional.one_hot(tokens[:, 1], self.p).to(dtype)
        h = self.hidden(torch.cat([a, b], dim=1))
        return self.out(h * h)


class TinyCNN(nn.Module):
    """Two 3×3 convolutions with BatchNorm2d and average pooling on 8×8 images, then a linear head."""

    def __init__(self, channels: tuple[int, int] = (6, 12), classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.AvgPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(c2 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


class TinyAttention(nn.Module):
    """One single-head self-attention layer with a residual, mean pooling and a linear head.

    Attention is written with plain ``matmul``/``softmax`` (no fused kernel), so every
    second derivative is the exact one.
    """

    def __init__(self, vocab: int, length: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(length, width))
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1])
        h = h + self.o(torch.softmax(scores, dim=-1) @ self.v(h))
        return self.head(h.mean(dim=1))


def _mlp(sizes: Sequence[int], act: type[nn.Module], bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(act())
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# training helpers


def _full_batch(
    model: nn.Module, loss_fn: Callable[..., Tensor], batch: tuple[Any, Tensor],
    opt: torch.optim.Optimizer, steps: int,
) -> None:  # fmt: skip
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()


def _epochs(
    model: nn.Module, loss_fn: Callable[..., Tensor], x: Any, y: Tensor,
    opt: torch.optim.Optimizer, batch_size: int, epochs: int, seed: int,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def _accuracy(model: nn.Module, x: Any, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).double().mean())


def _adam_state_preconditioner(model: nn.Module, opt: torch.optim.Optimizer) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return adam_preconditioner(opt, params, missing="frozen")


# ---------------------------------------------------------------------------------------------
# the states


def _tanh_init() -> BatteryState:
    x, y = _digits()
    model = _mlp([64, 32, 10], nn.Tanh)
    return BatteryState(
        "tanh-init",
        "digits (1,024-sample split), tanh MLP 64-32-10 with biases at its PyTorch "
        "initialisation; full-batch Hessian, GD map at lr 0.5",
        model, cross_entropy, (x, y), 0.5, "full-batch", "gd", tags=("init",),
    )  # fmt: skip


def _tanh_gd20() -> BatteryState:
    x, y = _digits()
    model = _mlp([64, 32, 10], nn.Tanh)
    _full_batch(model, cross_entropy, (x, y), torch.optim.SGD(model.parameters(), lr=0.5), 20)
    return BatteryState(
        "tanh-gd20",
        "THEORY.md §8's example: digits (1,024-sample split), tanh MLP 64-32-10 with biases "
        "after 20 full-batch GD steps at lr 0.5; many small negative eigenvalues, SD near d",
        model, cross_entropy, (x, y), 0.5, "full-batch", "gd", tags=("negative",),
    )  # fmt: skip


def _tanh_eos() -> BatteryState:
    x, y = _digits(512)
    model = _mlp([64, 16, 16, 10], nn.Tanh)
    _full_batch(model, one_hot_mse, (x, y), torch.optim.SGD(model.parameters(), lr=0.2), 300)
    return BatteryState(
        "tanh-eos",
        "edge of stability: digits (512 samples), tanh MLP 64-16-16-10, MSE loss, 300 "
        "full-batch GD steps at lr 0.2 (progressive sharpening reaches η·λ_max ≈ 2 by step "
        "~100, then hovers there)",
        model, one_hot_mse, (x, y), 0.2, "full-batch", "gd", tags=("edge",),
    )  # fmt: skip


def _gelu_minibatch() -> BatteryState:
    x, y = _digits()
    model = _mlp([64, 20, 20, 10], nn.GELU)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    _epochs(model, cross_entropy, x, y, opt, 64, 3, seed=1)
    return BatteryState(
        "gelu-minibatch",
        "digits, GELU MLP 64-20-20-10 with biases mid-training (3 epochs of SGD, batch 64, "
        "lr 0.2); the paper's minibatch protocol on 3 batches of 64, GD map",
        model, cross_entropy, _batches(x, y, 64, 3, seed=2), 0.2, "minibatch", "gd",
    )  # fmt: skip


def _relu_minibatch() -> BatteryState:
    x, y = _digits()
    model = _mlp([64, 16, 16, 10], nn.ReLU, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _epochs(model, cross_entropy, x, y, opt, 32, 10, seed=1)
    return BatteryState(
        "relu-minibatch",
        "the paper's MLP (3 layers, width 16, ReLU, no bias; 1,440 parameters) on digits after "
        "10 epochs of SGD (batch 32, lr 0.5); minibatch protocol on 4 batches of 32, GD map",
        model, cross_entropy, _batches(x, y, 32, 4, seed=2), 0.5, "minibatch", "gd",
    )  # fmt: skip


def _softmax(lr: float, steps: int) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    x, y = _gaussian_mixture(2000, 36, 10, separation=2.0, seed=3)
    model = ReferenceSoftmax(36, 10)
    _full_batch(model, cross_entropy, (x, y), torch.optim.SGD(model.parameters(), lr=lr), steps)
    return model, (x, y)


def _softmax_stable() -> BatteryState:
    model, data = _softmax(4.0, 200)
    return BatteryState(
        "softmax-stable",
        "convex: softmax regression with a reference class (333 parameters) on an overlapping "
        "10-class Gaussian mixture in 36 dimensions (2,000 points), 200 full-batch GD steps at "
        "lr 4, below the edge (η·λ_max ≈ 1); positive-definite Hessian, so the exact SD is 0",
        model, cross_entropy, data, 4.0, "full-batch", "gd", tags=("small-sd", "convex"),
    )  # fmt: skip


def _softmax_eos() -> BatteryState:
    model, data = _softmax(10.0, 300)
    return BatteryState(
        "softmax-eos",
        "convex at the edge: the softmax regression of softmax-stable after 300 full-batch GD "
        "steps at lr 10 (2.5/λ_max at the optimum): GD self-stabilises with η·λ_max just above "
        "2, one eigenvalue beyond the edge against a positive-definite rest, small SD (≈ 5)",
        model, cross_entropy, data, 10.0, "full-batch", "gd",
        tags=("small-sd", "convex", "edge"),
    )  # fmt: skip


def _grokking(
    max_steps: int,
) -> tuple[nn.Module, torch.optim.Optimizer, Any, int, float, float]:
    """Gromov's recipe on (a + b) mod 17; stops at ``max_steps`` or at validation ≥ 95 %."""
    from sdopt.tasks.grokking import modular_arithmetic

    ds = modular_arithmetic(17, "add", 0.5, seed=0)
    model = SquareMLP(17, 40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0)
    steps = 0
    while steps < max_steps:
        chunk = min(25, max_steps - steps)
        _full_batch(model, one_hot_mse, ds.train, opt, chunk)
        steps += chunk
        if _accuracy(model, *ds.val) >= 0.95:
            break
    return model, opt, ds, steps, _accuracy(model, *ds.train), _accuracy(model, *ds.val)


_GROK_RECIPE = (
    "(a + b) mod 17, one-hot inputs, 50 % of the 289 pairs for training; square-activation MLP "
    "34-40-17 without biases (2,040 parameters; Gromov 2023), MSE on one-hot targets, "
    "full-batch AdamW (lr 1e-2, weight decay 1)"
)


def _grok_memorising() -> BatteryState:
    model, opt, ds, steps, train, val = _grokking(60)
    return BatteryState(
        "grok-memorising",
        f"{_GROK_RECIPE}, {steps} steps: memorising (train accuracy {train:.2f}, validation "
        f"{val:.2f}); Adam map with β₁ = 0.9 and the optimizer's preconditioner",
        model, one_hot_mse, ds.train, 1e-2, "full-batch", "adam", 0.9,
        _adam_state_preconditioner(model, opt), tags=("memorising",),
        info={"steps": steps, "train_accuracy": train, "val_accuracy": val},
    )  # fmt: skip


def _grok_grokked() -> BatteryState:
    model, opt, ds, steps, train, val = _grokking(5000)
    return BatteryState(
        "grok-grokked",
        f"{_GROK_RECIPE}, the run of grok-memorising continued until validation accuracy "
        f"reached 95 % ({steps} steps; train accuracy {train:.2f}, validation {val:.2f}): "
        "after grokking; Adam map with β₁ = 0.9 and the optimizer's preconditioner",
        model, one_hot_mse, ds.train, 1e-2, "full-batch", "adam", 0.9,
        _adam_state_preconditioner(model, opt), tags=("grokked",),
        info={"steps": steps, "train_accuracy": train, "val_accuracy": val},
    )  # fmt: skip


def _cnn_momentum() -> BatteryState:
    x, y = _digits()
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _epochs(model, cross_entropy, x, y, opt, 64, 2, seed=1)
    model.train()
    return BatteryState(
        "cnn-bn-momentum",
        "digits as 8×8 images, CNN conv3-BN-ReLU-pool ×2 + linear (BatchNorm2d in train mode: "
        "the Hessian of the train-mode loss, batch statistics), 2 epochs of SGD with momentum "
        "0.9 (batch 64, lr 0.05); minibatch protocol on 3 batches of 32, heavy-ball map",
        model, cross_entropy, _batches(x, y, 32, 3, seed=2), 0.05, "minibatch", "momentum",
        0.9, tags=("batchnorm",),
    )  # fmt: skip


def _majority_sequences(n: int, vocab: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """Token sequences labelled by their most frequent token (ties to the smallest)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (n, length), generator=g)
    counts = nn.functional.one_hot(tokens, vocab).sum(dim=1)
    return tokens, counts.argmax(dim=1)


def _attention_adam() -> BatteryState:
    x, y = _majority_sequences(128, 6, 8, seed=4)
    model = TinyAttention(6, 8, 16, 6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    _full_batch(model, cross_entropy, (x, y), opt, 40)
    return BatteryState(
        "attention-adam",
        "majority token of length-8 sequences over 6 tokens (128 sequences); one single-head "
        "self-attention layer (plain matmul/softmax) with embeddings, residual, mean pooling "
        "and a linear head, 40 full-batch Adam steps at lr 3e-3; Adam map with β₁ = 0.9",
        model, cross_entropy, (x, y), 3e-3, "full-batch", "adam", 0.9,
        _adam_state_preconditioner(model, opt), tags=("attention",),
    )  # fmt: skip


def _gelu_adam_minibatch() -> BatteryState:
    x, y = _gaussian_mixture(512, 24, 6, separation=5.0, seed=5)
    model = _mlp([24, 32, 32, 6], nn.GELU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _epochs(model, cross_entropy, x, y, opt, 32, 2, seed=1)
    return BatteryState(
        "gelu-adam-minibatch",
        "6-class Gaussian mixture in 24 dimensions, GELU MLP 24-32-32-6 after 32 Adam steps "
        "(batch 32, lr 1e-3); minibatch protocol on 3 batches of 32, Adam map with β₁ = 0.9",
        model, cross_entropy, _batches(x, y, 32, 3, seed=2), 1e-3, "minibatch", "adam", 0.9,
        _adam_state_preconditioner(model, opt),
    )  # fmt: skip


def _tanh_heavy_ball() -> BatteryState:
    x, y = _gaussian_mixture(512, 20, 5, separation=4.0, seed=6)
    model = _mlp([20, 32, 32, 5], nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _full_batch(model, one_hot_mse, (x, y), opt, 200)
    return BatteryState(
        "tanh-heavy-ball",
        "5-class Gaussian mixture in 20 dimensions, tanh MLP 20-32-32-5, MSE loss, 200 "
        "full-batch heavy-ball steps (lr 0.05, momentum 0.9); heavy-ball map",
        model, one_hot_mse, (x, y), 0.05, "full-batch", "momentum", 0.9,
    )  # fmt: skip


# name -> (builder, seed offset, in the quick battery). The two grokking states share their
# seed: they are two checkpoints of one run.
_BUILDERS: dict[str, tuple[Callable[[], BatteryState], int, bool]] = {
    "tanh-init": (_tanh_init, 0, False),
    "tanh-gd20": (_tanh_gd20, 0, True),
    "tanh-eos": (_tanh_eos, 0, True),
    "gelu-minibatch": (_gelu_minibatch, 1, False),
    "relu-minibatch": (_relu_minibatch, 2, True),
    "softmax-stable": (_softmax_stable, 3, True),
    "softmax-eos": (_softmax_eos, 3, True),
    "grok-memorising": (_grok_memorising, 0, False),
    "grok-grokked": (_grok_grokked, 0, True),
    "cnn-bn-momentum": (_cnn_momentum, 4, False),
    "attention-adam": (_attention_adam, 5, False),
    "gelu-adam-minibatch": (_gelu_adam_minibatch, 6, False),
    "tanh-heavy-ball": (_tanh_heavy_ball, 7, True),
}

STATE_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names of all states, in build order."""


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: as it is); restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def battery_states(
    quick: bool = False,
    *,
    names: Sequence[str] | None = None,
    seed: int = 0,
    threads: int | None = 1,
) -> list[BatteryState]:
    """Build the battery's states and their exact facts, deterministically on the CPU.

    Each state is trained under its own seed (``seed`` plus a fixed offset per state) inside
    :func:`torch.random.fork_rng`, so the global random state is left as it was, and on one
    thread, so that the float32 training runs, some of them chaotic (at the edge of
    stability), do not depend on the number of cores. The thread count is restored afterwards.

    Args:
        quick: only the quick subset (7 states covering every map, both protocols, the edge,
            negative curvature and a small SD).
        names: build exactly these states (overrides ``quick``); see :data:`STATE_NAMES`.
        seed: base seed of the models' initialisations.
        threads: torch threads for the exact values (default 1: on a small shared machine two
            threads of dense float64 Hessian products can be ten times slower than one when
            other processes hold the cores; ``None`` keeps the current setting).

    Returns:
        The states, with ``dim``, ``exact_sd``, ``n_neg``, ``n_edge``, ``lambda_max`` and
        ``lambda_min`` filled in from dense float64 Hessians.

    Raises:
        ValueError: for an unknown name.
    """
    if names is None:
        chosen = [n for n, (_, _, q) in _BUILDERS.items() if q or not quick]
    else:
        unknown = [n for n in names if n not in _BUILDERS]
        if unknown:
            raise ValueError(f"Invalid names: {unknown!r} (known: {', '.join(STATE_NAMES)})")
        chosen = list(names)
    states = []
    for name in chosen:
        builder, offset, _ = _BUILDERS[name]
        start = time.perf_counter()
        with _num_threads(1):  # training: float32 reductions independent of the core count
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + offset)
                state = builder()
        state.build_seconds = time.perf_counter() - start
        with _num_threads(threads):
            states.append(_fill_facts(state))
    return states


# ---------------------------------------------------------------------------------------------
# evaluation against the ground truth

COVERAGE_SLACK = 0.01
"""Absolute slack (in dimensions) of the coverage check ``|error| ≤ 2σ + slack``.

The estimator runs on the float32 model and the ground truth on its float64 copy: even the
exact method on the float32 model is off by up to ~1e-3 (measured on this battery) while
reporting ``σ = 0``. An error below a hundredth of a dimension is not a miss.
"""


def target_checks(exact: float, estimate: float, uncertainty: float, dim: int) -> dict[str, bool]:
    """The issue's per-state targets for one estimate.

    ``min(SD, d − SD)`` is read as ``min(SD, |d − SD|)``: with the heavy-ball map (``2d``
    exponents) SD may exceed ``d``.

    Args:
        exact: the exact SD; estimate, uncertainty: the estimator's value and ``σ``;
        dim: ``d``.

    Returns:
        A dict of flags (a ``nan`` uncertainty counts as none: not covered, vacuous):

        * ``error_ok``: ``|error| ≤ max(0.1·min(SD, d − SD), 2σ, COVERAGE_SLACK)``;
        * ``covered``: ``|error| ≤ 2σ + COVERAGE_SLACK`` (:data:`COVERAGE_SLACK`: float32
          rounding);
        * ``nonvacuous``: ``σ ≤ 0.1·min(SD, d − SD)`` or ``σ ≤ 2``;
        * ``gross_miss``: the estimate says ``≈ 0`` — at most a tenth of the exact value, an
          order of magnitude low — while the exact SD exceeds ``0.1·d``, or the reverse (the
          estimate exceeds ``0.1·d`` and the exact SD is at most a tenth of it);
        * ``meets_target``: ``error_ok`` and ``nonvacuous`` and not ``gross_miss``.
    """
    err = abs(estimate - exact)
    scale = min(exact, abs(dim - exact))
    sigma = uncertainty if math.isfinite(uncertainty) else math.nan
    two_sigma = 2.0 * sigma if not math.isnan(sigma) else 0.0
    error_ok = bool(err <= max(0.1 * scale, two_sigma, COVERAGE_SLACK))
    covered = bool(not math.isnan(sigma) and err <= 2.0 * sigma + COVERAGE_SLACK)
    nonvacuous = bool(not math.isnan(sigma) and (sigma <= 0.1 * scale or sigma <= 2.0))
    gross = bool(
        (exact > 0.1 * dim and estimate <= 0.1 * exact)
        or (estimate > 0.1 * dim and exact <= 0.1 * estimate)
    )
    return {
        "error_ok": error_ok,
        "covered": covered,
        "nonvacuous": nonvacuous,
        "gross_miss": gross,
        "meets_target": error_ok and nonvacuous and not gross,
    }


def evaluate(
    state: BatteryState, method: str | None = None, *, seed: int = 0, **kwargs: Any
) -> dict[str, Any]:
    """Run one estimator on ``state`` as a user would, and compare it with the exact SD.

    The estimator is :func:`~sdopt.dimension.estimate_sharpness_dimension` on the float32 model
    and data, with the state's protocol, map, momentum and preconditioner and
    ``generator=torch.Generator().manual_seed(seed)``.

    Args:
        state: a state from :func:`battery_states` (facts filled in).
        method: the estimator's method; ``None`` calls it without ``method=``, i.e. its default.
        seed: seed of the estimator's generator.
        **kwargs: further keyword arguments for the estimator (``k``, ``num_probes``, ...).

    Returns:
        A row: ``state``, ``method`` (``"default"`` for ``None``), ``dim``, ``exact``,
        ``estimate``, ``uncertainty``, ``low``/``high`` (the estimate's attributes if it has
        them, else ``nan``), ``error`` (estimate − exact), ``abs_error``, ``rel_error_sd``
        (``|error| / SD``), ``rel_error_codim`` (``|error| / |d − SD|``), ``rel_error``
        (``|error| / min(SD, |d − SD|)``, the denominator floored at 1), ``in_interval``
        (``low ≤ exact ≤ high``; ``None`` without an interval), the :func:`target_checks`,
        ``products`` and ``seconds``.
    """
    call = dict(state.estimator_kwargs(), **kwargs)
    if method is not None:
        call["method"] = method
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    est = estimate_sharpness_dimension(
        state.model, state.loss_fn, state.data, state.lr, generator=generator, **call
    )
    seconds = time.perf_counter() - start
    value = float(est.value)
    sigma = float(est.uncertainty)
    low = float(getattr(est, "low", math.nan))
    high = float(getattr(est, "high", math.nan))
    exact, dim = state.exact_sd, state.dim
    err = value - exact
    abs_err = abs(err)
    codim = abs(dim - exact)
    if math.isnan(low) or math.isnan(high):
        in_interval = None
    else:
        in_interval = bool(low - COVERAGE_SLACK <= exact <= high + COVERAGE_SLACK)
    return {
        "state": state.name,
        "method": "default" if method is None else method,
        "dim": dim,
        "exact": exact,
        "estimate": value,
        "uncertainty": sigma,
        "low": low,
        "high": high,
        "error": err,
        "abs_error": abs_err,
        "rel_error_sd": abs_err / exact if exact > 0 else (0.0 if abs_err == 0 else math.inf),
        "rel_error_codim": abs_err / codim if codim > 0 else (0.0 if abs_err == 0 else math.inf),
        "rel_error": abs_err / max(min(exact, codim), 1.0),
        "in_interval": in_interval,
        **target_checks(exact, value, sigma, dim),
        "products": int(est.num_products),
        "seconds": seconds,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`evaluate` rows of one estimator over the battery.

    Returns:
        ``states``; ``worst_rel_error`` (max ``rel_error``); ``coverage`` (fraction covered by
        ``± 2σ``); ``meets_target`` (how many states meet the per-state target);
        ``gross_misses``; ``vacuous``; ``in_interval`` (how many ``[low, high]`` contain the
        exact value); ``passes`` (every state meets its target and coverage
        ≥ 90 %: the issue's targets).
    """
    n = len(rows)
    if n == 0:
        raise ValueError("Invalid rows: empty (need at least one evaluated state)")
    coverage = sum(bool(r["covered"]) for r in rows) / n
    met = sum(bool(r["meets_target"]) for r in rows)
    return {
        "states": n,
        "worst_rel_error": max(float(r["rel_error"]) for r in rows),
        "coverage": coverage,
        "meets_target": met,
        "gross_misses": sum(bool(r["gross_miss"]) for r in rows),
        "vacuous": sum(not r["nonvacuous"] for r in rows),
        "in_interval": sum(r.get("in_interval") is True for r in rows),
        "passes": met == n and coverage >= 0.9,
    }
