"""Correlation study: does the sharpness dimension rank-correlate with the generalization gap?

Reproduces, at CPU scale, the MLP experiment of Tuci, Korkmaz, Şimşekli, Birdal, "Generalization
at the Edge of Stability" (arXiv:2604.19740, §5): a 3-layer ReLU MLP of width 16 without biases
(64 → 16 → 16 → 10, 1,440 parameters) trained with plain SGD (no momentum, no weight decay) on a
grid of learning rates × batch sizes, here on scikit-learn's bundled digits (8×8 images, 1,797
samples; nothing is downloaded) instead of MNIST.

Each run trains until the training accuracy reaches ``target_train_accuracy`` (checked once per
epoch; capped at ``max_steps``), then keeps training for ``tail_steps`` more steps while recording
the flattened weights: these last iterates approximate the attractor and feed the PH dimension.
At the final weights the study measures

- the sharpness dimension (SD) with the paper's minibatch protocol (exact: dense minibatch
  Hessians of the training batch size, sorted exponents averaged), and with the cheap estimators
  of :func:`sdopt.estimate_sharpness_dimension`;
- the neighbouring measures of :func:`sdopt.compute_measures` (λ_max, trace, RDS sharpness,
  adaptive sharpness, ...), the PH dimension of the last iterates and the weight norm;
- the generalization gaps ``train_acc - test_acc`` and ``test_loss - train_loss``;

and reports Kendall τ and the granulated Kendall ψ (:mod:`sdopt.studies.kendall`) of every measure
against both gaps, as a Markdown/CSV table and scatter plots. Runs are cached one JSON per run
(:class:`sdopt.studies.common.RunCache`), so an interrupted study resumes where it stopped.

Run it with ``sdopt study correlation [--quick] [--out DIR] [--cache DIR]``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdopt._checks import check_in_range, check_int, check_positive
from sdopt.studies.common import RunCache, import_pyplot, markdown_table, write_csv
from sdopt.studies.kendall import granulated_kendall, kendall_tau

__all__ = [
    "CorrelationConfig",
    "DigitsData",
    "TrainOutcome",
    "digits_mlp",
    "load_digits_split",
    "measure_run",
    "run_correlation_study",
    "train_until_fit",
]

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class CorrelationConfig:
    """Every setting of the correlation study (all of them enter the per-run cache key).

    Attributes:
        learning_rates: the grid's learning rates.
        batch_sizes: the grid's batch sizes.
        seed: seeds the split, the initialisation (the same for every run) and the batch order.
        test_fraction: fraction of the digits held out (stratified).
        width: hidden width of the MLP.
        target_train_accuracy: stop the fitting phase once the training accuracy reaches this.
        max_steps: cap on SGD steps of the fitting phase.
        tail_steps: SGD steps after the fit, recorded for the PH dimension.
        ph_points: number of recorded iterates kept for the PH dimension (evenly subsampled).
        sd_batches: minibatch Hessians (of the training batch size) averaged by the exact SD.
        estimators: cheap SD estimators to run besides ``"exact"``.
        slq_probes, slq_steps: stochastic Lanczos quadrature settings of the SLQ/KDE/PS estimators.
        topk: top eigenpairs for the ``"deflated"`` estimator.
        adaptive_rho: radius of the adaptive sharpness.
        measure_seed: seeds every stochastic estimator (its own generator).
    """

    learning_rates: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.32)
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    seed: int = 0
    test_fraction: float = 0.3
    width: int = 16
    target_train_accuracy: float = 1.0
    max_steps: int = 12_000
    tail_steps: int = 1_000
    ph_points: int = 1_000
    sd_batches: int = 16
    estimators: tuple[str, ...] = ("slq", "kde", "ps", "deflated")
    slq_probes: int = 16
    slq_steps: int = 80
    topk: int = 20
    adaptive_rho: float = 0.05
    measure_seed: int = 1234

    def __post_init__(self) -> None:
        if not self.learning_rates:
            raise ValueError(f"Invalid learning_rates: {self.learning_rates!r} (must be non-empty)")
        for lr in self.learning_rates:
            check_positive("learning_rates", lr)
        if not self.batch_sizes:
            raise ValueError(f"Invalid batch_sizes: {self.batch_sizes!r} (must be non-empty)")
        for b in self.batch_sizes:
            check_int("batch_sizes", b, minimum=1)
        check_int("seed", self.seed)
        check_in_range("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("width", self.width, minimum=1)
        check_in_range("target_train_accuracy", self.target_train_accuracy, 0.0, 1.0)
        check_int("max_steps", self.max_steps, minimum=1)
        check_int("tail_steps", self.tail_steps, minimum=0)
        check_int("ph_points", self.ph_points, minimum=0)
        check_int("sd_batches", self.sd_batches, minimum=1)
        check_int("slq_probes", self.slq_probes, minimum=1)
        check_int("slq_steps", self.slq_steps, minimum=2)
        check_int("topk", self.topk, minimum=1)
        check_positive("adaptive_rho", self.adaptive_rho)
        check_int("measure_seed", self.measure_seed)

    @classmethod
    def quick(cls, **overrides: Any) -> CorrelationConfig:
        """A 3 × 3 grid with lighter estimator settings: a few minutes on two CPU cores."""
        settings: dict[str, Any] = {
            "learning_rates": (0.04, 0.12, 0.32),
            "batch_sizes": (16, 64, 256),
            "max_steps": 6_000,
            "tail_steps": 400,
            "ph_points": 400,
            "sd_batches": 4,
            "slq_probes": 6,
            "slq_steps": 50,
            "topk": 10,
        }
        settings.update(overrides)
        return cls(**settings)

    def run_config(self, lr: float, batch_size: int) -> dict[str, Any]:
        """The settings of one run (its cache key): the grid point plus everything but the grid."""
        config = dataclasses.asdict(self)
        del config["learning_rates"], config["batch_sizes"]
        config.update(study="correlation", lr=float(lr), batch_size=int(batch_size))
        return config


# ---------------------------------------------------------------------------------------------
# data and model


@dataclass(frozen=True)
class DigitsData:
    """A standardised, stratified train/test split of scikit-learn's digits."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def to(self, dtype: torch.dtype) -> DigitsData:
        return DigitsData(self.train_x.to(dtype), self.train_y, self.test_x.to(dtype), self.test_y)


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.3, *, dtype: torch.dtype = torch.float32
) -> DigitsData:
    """scikit-learn's bundled digits, split stratified by class and standardised with train stats.

    Pixels that are constant on the training set are left centred (their scale is set to 1).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is installed in dev environments
        raise ImportError(
            'The digits study needs scikit-learn: pip install "sdopt[science]"'
        ) from exc
    check_int("seed", seed)
    check_in_range("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    as_x = lambda a: torch.as_tensor((a - mean) / std, dtype=dtype)  # noqa: E731
    return DigitsData(
        as_x(x_tr),
        torch.as_tensor(y_tr, dtype=torch.long),
        as_x(x_te),
        torch.as_tensor(y_te, dtype=torch.long),
    )


def digits_mlp(
    width: int = 16, *, seed: int = 0, in_features: int = 64, num_classes: int = 10
) -> nn.Sequential:
    """The paper's MLP: three bias-free linear layers with ReLU between them.

    ``64 → width → width → 10``; 1,440 parameters at width 16. PyTorch's default (Kaiming-uniform)
    initialisation drawn from ``torch.Generator().manual_seed(seed)`` (the global RNG is untouched).
    """
    check_int("width", width, minimum=1)
    model = nn.Sequential(
        nn.Linear(in_features, width, bias=False),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.ReLU(),
        nn.Linear(width, num_classes, bias=False),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)  # = kaiming_uniform(a=sqrt(5)) bound
                layer.weight.uniform_(-bound, bound, generator=generator)
    return model


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    out = model(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class TrainOutcome:
    """What :func:`train_until_fit` did: steps, whether it fitted, and the recorded iterates."""

    steps: int
    fit_steps: int
    reached_target: bool
    diverged: bool
    trajectory: Tensor  # (n, d) flattened weights of the recorded tail iterates
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_until_fit(
    model: nn.Module,
    data: DigitsData,
    lr: float,
    batch_size: int,
    *,
    target_train_accuracy: float = 1.0,
    max_steps: int = 12_000,
    tail_steps: int = 1_000,
    record_points: int = 1_000,
    seed: int = 0,
) -> TrainOutcome:
    """Plain SGD (no momentum, no weight decay) on shuffled minibatches of ``batch_size``.

    Every epoch reshuffles the training set with its own generator and drops the last incomplete
    batch, so every step sees exactly ``batch_size`` samples. The fitting phase stops at the end
    of the first epoch whose training accuracy is ``>= target_train_accuracy`` (or after
    ``max_steps``); then ``tail_steps`` more steps run and ``record_points`` of them (evenly
    spaced, always including the last) are recorded as flattened weights. A non-finite loss
    stops training and marks the run as diverged.
    """
    check_positive("lr", lr)
    n = len(data.train_y)
    check_int("batch_size", batch_size, minimum=1, maximum=n)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    keep = set()
    if tail_steps and record_points:
        m = min(record_points, tail_steps)
        keep = {tail_steps - 1 - (i * tail_steps) // m for i in range(m)}
    recorded: list[Tensor] = []
    history: list[dict[str, float]] = []
    steps = 0
    fit_steps = 0
    reached = False
    diverged = False
    tail_done = 0
    start = time.perf_counter()
    in_tail = False
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(n // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if in_tail:
                if tail_done in keep:
                    recorded.append(_flat(model).clone())
                tail_done += 1
                if tail_done >= tail_steps:
                    break
        if diverged or (in_tail and tail_done >= tail_steps):
            break
        if not in_tail:
            train_loss, train_acc = _evaluate(model, data.train_x, data.train_y)
            history.append({"step": steps, "train_loss": train_loss, "train_accuracy": train_acc})
            if not math.isfinite(train_loss):
                diverged = True
                break
            if train_acc >= target_train_accuracy or steps >= max_steps:
                reached = train_acc >= target_train_accuracy
                fit_steps = steps
                in_tail = True
                if tail_steps == 0:
                    break
    if not in_tail:
        fit_steps = steps
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        diverged = True
    dim = sum(p.numel() for p in model.parameters())
    trajectory = torch.stack(recorded) if recorded else torch.empty(0, dim)
    return TrainOutcome(
        steps=steps,
        fit_steps=fit_steps,
        reached_target=reached,
        diverged=diverged,
        trajectory=trajectory,
        seconds=time.perf_counter() - start,
        history=history,
    )


# ---------------------------------------------------------------------------------------------
# measurement

_LOSS = nn.functional.cross_entropy

#: measures computed by :func:`sdopt.compute_measures` on the full training set.
BASELINE_MEASURES = (
    "lambda_max",
    "trace",
    "rds_sharpness",
    "adaptive_sharpness_avg",
    "adaptive_sharpness_max",
    "weight_norm",
)


def _minibatches(
    data: DigitsData, batch_size: int, count: int, generator: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """``count`` training minibatches of ``batch_size`` (without replacement within a pass)."""
    n = len(data.train_y)
    batches: list[tuple[Tensor, Tensor]] = []
    order = torch.randperm(n, generator=generator)
    pos = 0
    while len(batches) < count:
        if pos + batch_size > n:
            order = torch.randperm(n, generator=generator)
            pos = 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batches.append((data.train_x[idx], data.train_y[idx]))
    return batches


def _dense_spectrum(model: nn.Module, batch: Any) -> Tensor:
    from sdopt.curvature import HessianOperator

    hessian = HessianOperator(model, _LOSS, batch).to_dense()
    return torch.linalg.eigvalsh(0.5 * (hessian + hessian.T))


def _cheap_sd(
    model: nn.Module, batches: list[Any], lr: float, method: str, config: CorrelationConfig
) -> tuple[float, float, float]:
    """``(value, uncertainty, seconds)`` of one cheap estimator on the training minibatches."""
    import sdopt

    options: dict[str, Any] = {"generator": torch.Generator().manual_seed(config.measure_seed)}
    if method in ("slq", "kde", "ps"):
        options.update(num_probes=config.slq_probes, num_steps=config.slq_steps)
    elif method == "deflated":
        options.update(k=config.topk)
    start = time.perf_counter()
    estimate = sdopt.estimate_sharpness_dimension(
        model, _LOSS, batches, lr, method=method, **options
    )
    return float(estimate.value), float(estimate.uncertainty), time.perf_counter() - start


def measure_run(
    model: nn.Module,
    data: DigitsData,
    lr: float,
    batch_size: int,
    trajectory: Tensor,
    config: CorrelationConfig,
) -> dict[str, float]:
    """Every measure of the study at the model's current weights (computed in float64).

    Keys: ``sd_exact`` (paper's minibatch protocol: ``config.sd_batches`` dense minibatch
    Hessians of ``batch_size``, sorted exponents averaged, :func:`sdopt.sharpness_dimension`),
    ``sd_exact_fullbatch`` (one dense Hessian of the whole training set), ``sd_<method>`` for each
    cheap estimator (same minibatches), the :data:`BASELINE_MEASURES` on the full training set,
    and ``ph_dimension`` of ``trajectory``; plus ``*_seconds`` timings.
    """
    from sdopt import compute_measures, sharpness_dimension

    model64 = copy.deepcopy(model).to(torch.float64)
    data64 = data.to(torch.float64)
    generator = torch.Generator().manual_seed(config.measure_seed)
    batches = _minibatches(data64, batch_size, config.sd_batches, generator)
    out: dict[str, float] = {"dim": float(sum(p.numel() for p in model64.parameters()))}

    start = time.perf_counter()
    spectra = torch.stack([_dense_spectrum(model64, b) for b in batches])
    out["sd_exact"] = sharpness_dimension(spectra, lr)
    out["sd_exact_seconds"] = time.perf_counter() - start
    per_batch = [sharpness_dimension(s, lr) for s in spectra]
    out["sd_exact_batch_std"] = float(torch.tensor(per_batch, dtype=torch.float64).std())
    full = _dense_spectrum(model64, (data64.train_x, data64.train_y))
    out["sd_exact_fullbatch"] = sharpness_dimension(full, lr)
    out["lambda_min_fullbatch"] = float(full[0])

    for method in config.estimators:
        try:
            value, unc, secs = _cheap_sd(model64, batches, lr, method, config)
        except (ImportError, AttributeError, NotImplementedError) as exc:  # estimator missing
            value, unc, secs = math.nan, math.nan, math.nan
            out[f"sd_{method}_error"] = str(exc)[:200]  # type: ignore[assignment]
        out[f"sd_{method}"], out[f"sd_{method}_uncertainty"] = value, unc
        out[f"sd_{method}_seconds"] = secs

    start = time.perf_counter()
    which = list(BASELINE_MEASURES)
    options: dict[str, Any] = {"rho": config.adaptive_rho}
    n_points = len(trajectory)
    if n_points >= 20:
        which.append("ph_dimension")
        options.update(
            trajectory=trajectory.to(torch.float64),
            min_points=max(10, n_points // 5),
            max_points=n_points,
        )
    measures = compute_measures(
        model64,
        _LOSS,
        (data64.train_x, data64.train_y),
        lr,
        which=which,
        generator=torch.Generator().manual_seed(config.measure_seed),
        **options,
    )
    out.update({k: float(v) for k, v in measures.items()})
    out.setdefault("ph_dimension", math.nan)
    out["baselines_seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------------
# the study


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads`` (tiny models run fastest on one thread)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(check_int("num_threads", num_threads, minimum=1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_one(
    config: CorrelationConfig, lr: float, batch_size: int, data: DigitsData
) -> dict[str, Any]:
    """Train one grid point from the shared initialisation and measure it (uncached)."""
    model = digits_mlp(config.width, seed=config.seed)
    outcome = train_until_fit(
        model,
        data,
        lr,
        batch_size,
        target_train_accuracy=config.target_train_accuracy,
        max_steps=config.max_steps,
        tail_steps=config.tail_steps,
        record_points=config.ph_points,
        seed=config.seed,
    )
    train_loss, train_acc = _evaluate(model, data.train_x, data.train_y)
    test_loss, test_acc = _evaluate(model, data.test_x, data.test_y)
    result: dict[str, Any] = {
        "lr": float(lr),
        "batch_size": int(batch_size),
        "steps": outcome.steps,
        "fit_steps": outcome.fit_steps,
        "reached_target": outcome.reached_target,
        "diverged": outcome.diverged,
        "train_seconds": outcome.seconds,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "gap_accuracy": train_acc - test_acc,
        "gap_loss": test_loss - train_loss,
    }
    if not outcome.diverged:
        result.update(measure_run(model, data, lr, batch_size, outcome.trajectory, config))
    return result


#: (key, label) of every measure correlated with the gaps, in table order.
MEASURE_LABELS = (
    ("sd_exact", "SD exact (minibatch)"),
    ("sd_exact_fullbatch", "SD exact (full batch)"),
    ("sd_slq", "SD-SLQ"),
    ("sd_kde", "SD-KDE"),
    ("sd_ps", "SD-PS"),
    ("sd_deflated", "SD top-k + bulk"),
    ("lambda_max", "λ_max"),
    ("trace", "trace"),
    ("rds_sharpness", "RDS sharpness λ_1"),
    ("adaptive_sharpness_avg", "adaptive sharpness (avg)"),
    ("adaptive_sharpness_max", "adaptive sharpness (max)"),
    ("ph_dimension", "PH dimension"),
    ("weight_norm", "weight norm"),
)
GAPS = (("gap_accuracy", "accuracy gap"), ("gap_loss", "loss gap"))


@dataclass
class CorrelationResults:
    """The study's runs, its correlation rows and the files it wrote."""

    config: CorrelationConfig
    runs: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    cached: int
    files: dict[str, str]


def correlation_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kendall τ and granulated ψ of every measure present against both gaps."""
    usable = [r for r in runs if not r.get("diverged")]
    rows = []
    for key, label in MEASURE_LABELS:
        present = [r for r in usable if isinstance(r.get(key), (int, float))]
        if not present:
            continue
        row: dict[str, Any] = {"measure": key, "label": label, "runs": len(present)}
        for gap, _ in GAPS:
            g = granulated_kendall(present, key, gap, ("lr", "batch_size"))
            row[f"tau_{gap}"] = g.tau
            row[f"psi_lr_{gap}"] = g.psi["lr"]
            row[f"psi_bs_{gap}"] = g.psi["batch_size"]
            row[f"psi_{gap}"] = g.psi_mean
        rows.append(row)
    return rows


RUN_COLUMNS = (
    "lr", "batch_size", "steps", "reached_target", "train_accuracy", "test_accuracy",
    "gap_accuracy", "train_loss", "test_loss", "gap_loss", "sd_exact", "sd_exact_batch_std",
    "sd_exact_fullbatch", "sd_slq", "sd_kde", "sd_ps", "sd_deflated", "lambda_max", "trace",
    "rds_sharpness", "adaptive_sharpness_avg", "adaptive_sharpness_max", "ph_dimension",
    "weight_norm", "train_seconds", "sd_exact_seconds",
)  # fmt: skip
CORRELATION_COLUMNS = (
    "label", "runs",
    "tau_gap_accuracy", "psi_lr_gap_accuracy", "psi_bs_gap_accuracy", "psi_gap_accuracy",
    "tau_gap_loss", "psi_lr_gap_loss", "psi_bs_gap_loss", "psi_gap_loss",
)  # fmt: skip


def scatter_plots(runs: Sequence[dict[str, Any]], path: str | os.PathLike[str], gap: str) -> Path:
    """One panel per measure: measure vs ``gap``, colour = learning rate, marker = batch size."""
    plt = import_pyplot()
    usable = [r for r in runs if not r.get("diverged")]
    keys = [
        (k, lab)
        for k, lab in MEASURE_LABELS
        if any(isinstance(r.get(k), float) and math.isfinite(r[k]) for r in usable)
    ]
    lrs = sorted({r["lr"] for r in usable})
    sizes = sorted({r["batch_size"] for r in usable})
    markers = "osD^vP*Xh"
    cmap = plt.get_cmap("viridis")
    ncols = 4
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.7 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, keys):
        for r in usable:
            value = r.get(key)
            if not isinstance(value, float) or not math.isfinite(value):
                continue
            colour = cmap(lrs.index(r["lr"]) / max(1, len(lrs) - 1))
            marker = markers[sizes.index(r["batch_size"]) % len(markers)]
            ax.scatter(
                value, r[gap], color=colour, marker=marker, s=28, edgecolor="k", linewidth=0.3
            )
        pairs = [(r[key], r[gap]) for r in usable if isinstance(r.get(key), float)]
        tau = kendall_tau(*zip(*pairs)) if len(pairs) >= 2 else math.nan
        ax.set_title(f"τ = {tau:.2f}", fontsize=8)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(dict(GAPS)[gap], fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles = [
        plt.Line2D(
            [],
            [],
            color=cmap(i / max(1, len(lrs) - 1)),
            marker="o",
            linestyle="",
            label=f"lr {lr:g}",
        )
        for i, lr in enumerate(lrs)
    ] + [
        plt.Line2D(
            [], [], color="grey", marker=markers[i % len(markers)], linestyle="", label=f"batch {b}"
        )
        for i, b in enumerate(sizes)
    ]
    fig.legend(
        handles=handles, loc="lower center", ncol=min(10, len(handles)), fontsize=7, frameon=False
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_outputs(
    config: CorrelationConfig, runs: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: Path
) -> dict[str, str]:
    """``runs.csv``, ``correlations.csv``, ``correlations.md`` and two scatter PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    files["runs_csv"] = str(
        write_csv(
            out_dir / "runs.csv", RUN_COLUMNS, [[r.get(c) for c in RUN_COLUMNS] for r in runs]
        )
    )
    files["correlations_csv"] = str(
        write_csv(
            out_dir / "correlations.csv",
            CORRELATION_COLUMNS,
            [[r.get(c) for c in CORRELATION_COLUMNS] for r in rows],
        )
    )
    header = [
        "measure",
        "runs",
        "τ acc",
        "ψ_lr acc",
        "ψ_b acc",
        "ψ acc",
        "τ loss",
        "ψ_lr loss",
        "ψ_b loss",
        "ψ loss",
    ]
    table = markdown_table(
        header, [[r.get(c) for c in CORRELATION_COLUMNS] for r in rows], digits=3
    )
    run_header = [
        "lr",
        "batch",
        "steps",
        "train acc",
        "test acc",
        "acc gap",
        "loss gap",
        "SD exact",
        "SD full-batch",
        "λ_max",
        "trace",
        "PH dim",
    ]
    run_keys = [
        "lr",
        "batch_size",
        "steps",
        "train_accuracy",
        "test_accuracy",
        "gap_accuracy",
        "gap_loss",
        "sd_exact",
        "sd_exact_fullbatch",
        "lambda_max",
        "trace",
        "ph_dimension",
    ]
    run_table = markdown_table(run_header, [[r.get(k) for k in run_keys] for r in runs], digits=4)
    md = out_dir / "correlations.md"
    md.write_text(
        "## Kendall τ and granulated ψ against the generalization gap\n\n"
        + table
        + "\n## Runs\n\n"
        + run_table
        + "\n## Configuration\n\n```json\n"
        + json.dumps(dataclasses.asdict(config), indent=1)
        + "\n```\n"
    )
    files["correlations_md"] = str(md)
    for gap, _ in GAPS:
        files[f"scatter_{gap}"] = str(scatter_plots(runs, out_dir / f"scatter_{gap}.png", gap))
    return files


def run_correlation_study(
    config: CorrelationConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] = "results/correlation",
    cache_dir: str | os.PathLike[str] | None = None,
    num_threads: int | None = 1,
    progress: Callable[[str], None] | None = print,
) -> CorrelationResults:
    """Run (or resume) the grid, then write the tables and plots into ``out_dir``.

    Args:
        config: the study's settings (default: the full 5 × 5 study).
        out_dir: where ``runs.csv``, ``correlations.{csv,md}`` and the PNGs go.
        cache_dir: one JSON per finished run (default ``<out_dir>/cache``); runs found there are
            not retrained.
        num_threads: torch threads while the study runs (``None`` leaves them alone).
        progress: called with one line per run (``None`` for silence).
    """
    config = config or CorrelationConfig()
    out = Path(out_dir)
    cache = RunCache(
        Path(cache_dir) if cache_dir is not None else out / "cache", prefix="correlation"
    )
    say = progress or (lambda _msg: None)
    data = load_digits_split(config.seed, config.test_fraction)
    runs: list[dict[str, Any]] = []
    cached = 0
    with torch_threads(num_threads):
        total = len(config.learning_rates) * len(config.batch_sizes)
        for i, (lr, b) in enumerate(
            (lr, b) for lr in config.learning_rates for b in config.batch_sizes
        ):
            start = time.perf_counter()
            result, hit = cache.get_or_run(
                config.run_config(lr, b), lambda lr=lr, b=b: run_one(config, lr, b, data)
            )
            cached += hit
            runs.append(result)
            say(
                f"[{i + 1}/{total}] lr={lr:g} batch={b}: "
                + ("cached" if hit else f"{time.perf_counter() - start:.0f}s")
                + f", steps={result['steps']}, acc gap={result['gap_accuracy']:.4f}, "
                f"SD exact={result.get('sd_exact', math.nan):.1f}"
            )
    rows = correlation_rows(runs)
    files = write_outputs(config, runs, rows, out)
    return CorrelationResults(config, runs, rows, cached, files)
