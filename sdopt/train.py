"""The one training loop shared by ``sdopt grok``, the examples, the sweeps and the benchmarks.

:func:`train` trains a model of :mod:`sdopt.tasks.grokking` on a modular-arithmetic dataset
with any supported optimizer — plain ``torch.optim`` AdamW / Adam / SGD, the Grokfast baseline,
and every :class:`sdopt.SDOptimizer` mode (``monitor``, ``lr``, ``penalty``) — evaluates
periodically, shows progress, writes metrics (CSV or JSONL), the SD records, checkpoints, a
``summary.json`` and a plot, and logs to Weights & Biases when asked.

Grokfast (Lee et al., 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients",
arXiv:2405.20233) is the EMA gradient filter applied to the gradient before the base step:

    h <- α h + (1 - α) g,        g <- g + λ h          (defaults α = 0.98, λ = 2)

The sharpness dimension is that of Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at the Edge
of Stability", arXiv:2604.19740 (Def. 4.2).

Example:
    >>> from sdopt.train import TrainConfig, train
    >>> result = train(TrainConfig(p=7, steps=5, sd_mode="none", progress=False))
    >>> result.summary["steps"]
    5
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdopt._checks import check_choice, check_in_range, check_int, check_positive
from sdopt.tasks.grokking import MODELS, OPERATIONS, ModularArithmetic, _is_prime, build_model
from sdopt.tasks.grokking import modular_arithmetic as make_dataset

__all__ = [
    "BASE_OPTIMIZERS",
    "METRIC_FIELDS",
    "OPTIMIZERS",
    "SD_MODES",
    "GrokfastEMA",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "load_checkpoint",
    "train",
]

BASE_OPTIMIZERS = ("adamw", "adam", "sgd")
OPTIMIZERS = BASE_OPTIMIZERS + tuple(f"grokfast-{name}" for name in BASE_OPTIMIZERS)
SD_MODES = ("none", "monitor", "lr", "penalty")
METRICS_FORMATS = ("csv", "jsonl")
WANDB_MODES = ("disabled", "offline", "online")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_NAME = "checkpoint.pt"
PLOT_NAME = "grokking.png"
_CHECKPOINT_VERSION = 1

METRIC_FIELDS = (
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "lr_scale",
    "sharpness_dimension",
    "sd_uncertainty",
    "sd_low",
    "sd_high",
    "n_edge",
    "n_neg",
    "total_exponent",
    "j_star",
    "lambda_max",
    "lambda_min",
    "lr_lambda_max",
    "sd_step",
    "elapsed_seconds",
)

# fields that may differ between a run and its resumption (threads: checkpoints of the earlier
# default, torch's choice, stay resumable at the new default of 1; exact to the last bit only
# with the same thread count)
_RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "out_dir",
        "progress",
        "resume",
        "checkpoint_every",
        "wandb",
        "plot",
        "eval_every",
        "threads",
    }
)


@dataclass
class TrainConfig:
    """Everything that defines a grokking run. Validated by :meth:`validate` (``ValueError``).

    Attributes:
        p: Prime modulus.
        operation: ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``.
        train_fraction: Fraction of all pairs used for training.
        model: ``"transformer"`` (Nanda et al.), ``"mlp"`` (the paper's one-hot MLP) or
            ``"power"`` (Power et al.).
        model_kwargs: Extra constructor arguments of the model (e.g. ``{"width": 64}``).
        optimizer: One of :data:`OPTIMIZERS`; ``grokfast-<base>`` is ``<base>`` with the
            Grokfast EMA filter.
        lr: Learning rate of the base optimizer.
        weight_decay: Weight decay (decoupled for AdamW, L2 for Adam/SGD).
        betas: Adam(W) betas.
        momentum: SGD momentum.
        grokfast_alpha: Grokfast EMA coefficient α in ``[0, 1)``.
        grokfast_lamb: Grokfast amplification λ ``>= 0``.
        steps: Number of optimizer steps (the total, also when resuming).
        batch_size: Minibatch size; ``None`` (default) trains full batch.
        eval_every: Evaluate train/validation loss and accuracy every this many steps.
        sd_mode: ``"none"`` (plain optimizer) or a :class:`sdopt.SDOptimizer` mode.
        sd_every: Steps between SD estimates.
        sd_k: Top eigenpairs per estimate.
        sd_options: Further keyword arguments of :class:`sdopt.SDOptimizer` (``target_sd``,
            ``penalty_strength``, ``exponent_map``, ...).
        seed: Seeds the split, the model initialisation, minibatch sampling and the SD
            estimator's generator.
        dtype: ``"float32"`` or ``"float64"``.
        out_dir: Where files go; ``None`` writes nothing.
        metrics_format: ``"csv"`` or ``"jsonl"``.
        wandb: ``"disabled"``, ``"offline"`` or ``"online"``.
        wandb_project: W&B project name.
        progress: Show a progress bar (tqdm, else periodic lines on stderr).
        checkpoint_every: Save a checkpoint every this many steps (``0``: only at the end).
        resume: Continue from ``out_dir/checkpoint.pt`` if it exists.
        plot: Write ``grokking.png`` (needs matplotlib).
        stop_at_val_accuracy: Stop early once validation accuracy reaches this value.
        threads: ``torch.set_num_threads`` for the run (``None``: leave as is).
    """

    p: int = 97
    operation: str = "add"
    train_fraction: float = 0.3
    model: str = "transformer"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    momentum: float = 0.9
    grokfast_alpha: float = 0.98
    grokfast_lamb: float = 2.0
    steps: int = 1000
    batch_size: int | None = None
    eval_every: int = 50
    sd_mode: str = "none"
    sd_every: int = 100
    sd_k: int = 5
    sd_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    out_dir: str | None = None
    metrics_format: str = "csv"
    wandb: str = "disabled"
    wandb_project: str = "sdopt"
    progress: bool = True
    checkpoint_every: int = 0
    resume: bool = False
    plot: bool = True
    stop_at_val_accuracy: float | None = None
    threads: int | None = None

    def validate(self) -> TrainConfig:
        """Check every field; raise ``ValueError`` naming the first invalid one."""
        check_int("p", self.p, minimum=2)
        if not _is_prime(self.p):
            raise ValueError(f"Invalid p: {self.p!r} (must be a prime)")
        check_choice("operation", self.operation, OPERATIONS)
        check_in_range(
            "train_fraction", self.train_fraction, 0.0, 1.0, low_open=True, high_open=True
        )
        check_choice("model", self.model, MODELS)
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"Invalid model_kwargs: {self.model_kwargs!r} (must be a dict)")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"Invalid betas: {self.betas!r} (must be two numbers in [0, 1))")
        for b in self.betas:
            check_in_range("betas", b, 0.0, 1.0, high_open=True)
        check_in_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_in_range("grokfast_alpha", self.grokfast_alpha, 0.0, 1.0, high_open=True)
        check_positive("grokfast_lamb", self.grokfast_lamb, allow_zero=True)
        check_int("steps", self.steps, minimum=1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        check_int("eval_every", self.eval_every, minimum=1)
        check_choice("sd_mode", self.sd_mode, SD_MODES)
        check_int("sd_every", self.sd_every, minimum=1)
        check_int("sd_k", self.sd_k, minimum=1)
        if not isinstance(self.sd_options, dict):
            raise ValueError(f"Invalid sd_options: {self.sd_options!r} (must be a dict)")
        check_int("seed", self.seed)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_choice("metrics_format", self.metrics_format, METRICS_FORMATS)
        check_choice("wandb", self.wandb, WANDB_MODES)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        if self.stop_at_val_accuracy is not None:
            check_in_range(
                "stop_at_val_accuracy", self.stop_at_val_accuracy, 0.0, 1.0, low_open=True
            )
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        if self.resume and self.out_dir is None:
            raise ValueError("Invalid resume: True (needs out_dir, where the checkpoint lives)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Invalid config keys: {unknown!r} (known: {sorted(names)})")
        kwargs = dict(data)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        summary: The content of ``summary.json`` (see :func:`train`).
        metrics: One dict per evaluation, keys :data:`METRIC_FIELDS`.
        records: The SD estimate records (dicts) when an :class:`sdopt.SDOptimizer` was used.
        model: The trained model.
        optimizer: The optimizer (an :class:`sdopt.SDOptimizer` when ``sd_mode != "none"``).
        dataset: The :class:`sdopt.tasks.grokking.ModularArithmetic` trained on.
        out_dir: Where files were written (``None`` if nowhere).
    """

    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    records: list[dict[str, Any]]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: ModularArithmetic
    out_dir: Path | None


class GrokfastEMA:
    """Grokfast's EMA gradient filter (Lee et al., 2024), applied in place to ``.grad``.

    For every trainable parameter with a gradient ``g``::

        h <- α h + (1 - α) g       (h starts at g on the first call)
        g <- g + λ h

    Call :meth:`apply` after ``backward()`` and before ``optimizer.step()``. The filter state
    round-trips through :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        params: The parameters whose gradients are filtered.
        alpha: EMA coefficient in ``[0, 1)``.
        lamb: Amplification of the slow component, ``>= 0``.
    """

    def __init__(self, params: Any, *, alpha: float = 0.98, lamb: float = 2.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.alpha = check_in_range("alpha", alpha, 0.0, 1.0, high_open=True)
        self.lamb = check_positive("lamb", lamb, allow_zero=True)
        self.ema: list[Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def apply(self) -> None:
        """Filter the current gradients in place (parameters without ``.grad`` are skipped)."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            h = self.ema[i]
            if h is None:
                h = self.ema[i] = p.grad.detach().clone()
            else:
                h.mul_(self.alpha).add_(p.grad, alpha=1.0 - self.alpha)
            p.grad.add_(h, alpha=self.lamb)

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "lamb": self.lamb,
            "ema": [None if h is None else h.clone() for h in self.ema],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["ema"]) != len(self.params):
            raise ValueError(
                f"Invalid state: {len(state['ema'])} EMA tensors for {len(self.params)} parameters"
            )
        self.alpha = float(state["alpha"])
        self.lamb = float(state["lamb"])
        self.ema = [None if h is None else h.to(p) for h, p in zip(state["ema"], self.params)]


def build_optimizer(
    config: TrainConfig, model: nn.Module
) -> tuple[torch.optim.Optimizer, GrokfastEMA | None]:
    """The base ``torch.optim`` optimizer of ``config.optimizer`` and the Grokfast filter (or ``None``)."""
    name = config.optimizer
    base = name.removeprefix("grokfast-")
    params = [p for p in model.parameters() if p.requires_grad]
    if base == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas)
        )
    elif base == "adam":
        opt = torch.optim.Adam(
            params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas)
        )
    else:
        opt = torch.optim.SGD(
            params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum
        )
    grokfast = None
    if name.startswith("grokfast-"):
        grokfast = GrokfastEMA(params, alpha=config.grokfast_alpha, lamb=config.grokfast_lamb)
    return opt, grokfast


@torch.no_grad()
def _evaluate(
    model: nn.Module, batch: tuple[Tensor, Tensor], chunk: int = 8192
) -> tuple[float, float]:
    inputs, targets = batch
    loss_sum, correct = 0.0, 0
    for start in range(0, len(targets), chunk):
        logits = model(inputs[start : start + chunk])
        y = targets[start : start + chunk]
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == y).sum())
    n = max(1, len(targets))
    return loss_sum / n, correct / n


class _Progress:
    """tqdm when available, otherwise a line on stderr every ~5 % of the run."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None
        self._last_print = initial
        self._interval = max(1, total // 20)
        self._postfix = ""
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print(
                'sdopt: tqdm not installed (pip install "sdopt[progress]"); printing progress lines',
                file=sys.stderr,
            )
            return
        self.bar = tqdm(
            total=total, initial=initial, desc="sdopt grok", unit="step", dynamic_ncols=True
        )

    def update(self, step: int, postfix: dict[str, str] | None) -> None:
        if not self.enabled:
            return
        if postfix is not None:
            self._postfix = " ".join(f"{k}={v}" for k, v in postfix.items())
            if self.bar is not None:
                self.bar.set_postfix(postfix, refresh=False)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        elif step - self._last_print >= self._interval or step == self.total:
            self._last_print = step
            print(
                f"sdopt grok: step {step}/{self.total} {self._postfix}", file=sys.stderr, flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _MetricsWriter:
    """Rows of :data:`METRIC_FIELDS` to ``metrics.csv`` or ``metrics.jsonl``, flushed per row."""

    def __init__(self, path: Path, fmt: str, rows: list[dict[str, Any]]) -> None:
        self.path = path
        self.fmt = fmt
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="", encoding="utf-8")
        self.writer = None
        if fmt == "csv":
            self.writer = csv.DictWriter(self.file, fieldnames=list(METRIC_FIELDS))
            self.writer.writeheader()
        for row in rows:
            self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.writerow({k: _csv_cell(row.get(k)) for k in METRIC_FIELDS})
        else:
            self.file.write(json.dumps({k: _json_value(row.get(k)) for k in METRIC_FIELDS}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _first_step(rows: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    for row in rows:
        if row[key] is not None and row[key] >= threshold:
            return int(row["step"])
    return None


_CHECKPOINT_KEYS = (
    "version",
    "step",
    "config",
    "model",
    "optimizer",
    "grokfast",
    "rng",
    "metrics",
    "elapsed_seconds",
)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line (first sentence) of an exception's message, for one-line errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0].split(". ")[0].rstrip(".")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` without running any code from it.

    The file is read with ``torch.load(..., weights_only=True)``: tensors and plain containers
    only, so a planted pickle cannot execute anything. Every failure is a one-line
    ``ValueError`` naming the file: missing, empty, truncated or corrupt, holding other objects
    (refused), or a PyTorch file that is not an ``sdopt grok`` checkpoint.

    Args:
        path: The ``checkpoint.pt`` file.

    Returns:
        The checkpoint's dict (keys ``version``, ``step``, ``config``, ``model``,
        ``optimizer``, ``grokfast``, ``rng``, ``metrics``, ``elapsed_seconds``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Invalid resume: {path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"Invalid resume: {path} is empty (0 bytes): not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" of a foreign file
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        unsafe = next((line for line in lines if "GLOBAL" in line), None)
        if unsafe is not None:  # e.g. "Trying to load unsupported GLOBAL posix.system ..."
            raise ValueError(
                f"Invalid resume: {path} holds objects other than tensors and plain data "
                f"(refused, loading it could run code: {unsafe.rstrip('.')})"
            ) from None
        detail = next((line for line in lines if "Unsupported" in line), _first_line(exc))
        raise ValueError(
            f"Invalid resume: {path} is corrupt or not a PyTorch checkpoint "
            f"(refused by the weights-only loader: {detail.rstrip('.')})"
        ) from None
    except Exception as exc:  # truncated zip, random bytes, ...
        raise ValueError(
            f"Invalid resume: {path} is truncated, corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"Invalid resume: {path} is not an sdopt grok checkpoint (holds a "
            f"{type(ckpt).__name__}, not a dict)"
        )
    missing = [key for key in _CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ValueError(
            f"Invalid resume: {path} is not an sdopt grok checkpoint (missing keys {missing})"
        )
    if ckpt["version"] != _CHECKPOINT_VERSION:
        raise ValueError(
            f"Invalid resume: {path} has checkpoint version {ckpt['version']!r} "
            f"(this sdopt reads version {_CHECKPOINT_VERSION})"
        )
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
        raise ValueError(f"Invalid resume: {path} has step {ckpt['step']!r} (must be an int >= 0)")
    return ckpt


def _rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    return {"torch": torch.get_rng_state(), "batch": generator.get_state()}


# EstimateRecord fields copied into the metrics rows under the same names (issue 10)
_SD_DECOMPOSITION = (
    "sd_low",
    "sd_high",
    "n_edge",
    "n_neg",
    "total_exponent",
    "j_star",
    "lambda_min",
)


def _sd_fields(optimizer: Any, base_lr: float) -> dict[str, Any]:
    rec = getattr(optimizer, "last_estimate", None)
    scale = float(getattr(optimizer, "lr_scale", 1.0))
    out: dict[str, Any] = {
        "lr": base_lr * scale,
        "lr_scale": scale,
        "sharpness_dimension": None,
        "sd_uncertainty": None,
        "sd_low": None,
        "sd_high": None,
        "n_edge": None,
        "n_neg": None,
        "total_exponent": None,
        "j_star": None,
        "lambda_max": None,
        "lambda_min": None,
        "lr_lambda_max": None,
        "sd_step": None,
    }
    if rec is not None and rec.ok:
        out.update(
            sharpness_dimension=float(rec.sharpness_dimension),
            sd_uncertainty=float(rec.uncertainty),
            lambda_max=float(rec.lambda_max),
            lr_lambda_max=float(rec.lr * rec.lambda_max),
            sd_step=int(rec.step),
        )
        # the range and decomposition (issue 10): None where the estimator did not report them
        for name in _SD_DECOMPOSITION:
            value = float(getattr(rec, name))
            out[name] = value if math.isfinite(value) else None
    return out


def _start_wandb(config: TrainConfig, out_dir: Path | None) -> tuple[Any, Any]:
    """Start a W&B run (``None, None`` when disabled); returns ``(run, records_logger)``."""
    if config.wandb == "disabled":
        return None, None
    try:
        import wandb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('--wandb needs wandb: pip install "sdopt[wandb]"') from exc
    kwargs: dict[str, Any] = {
        "project": config.wandb_project,
        "mode": config.wandb,
        "config": config.to_dict(),
        "reinit": "finish_previous",
    }
    if out_dir is not None:
        kwargs["dir"] = str(out_dir)
    try:
        run = wandb.init(**kwargs)
    except TypeError:  # older wandb without reinit strings
        kwargs["reinit"] = True
        run = wandb.init(**kwargs)
    run.define_metric("step")
    for section in ("train/*", "val/*", "lr/*"):
        run.define_metric(section, step_metric="step")
    records_logger = None
    if config.sd_mode != "none":
        try:
            from sdopt.loggers import WandbLogger

            records_logger = WandbLogger()
        except ImportError:  # pragma: no cover
            records_logger = None
    return run, records_logger


def _wandb_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        "step": row["step"],
        "train/loss": row["train_loss"],
        "train/accuracy": row["train_accuracy"],
        "val/loss": row["val_loss"],
        "val/accuracy": row["val_accuracy"],
        "lr/effective": row["lr"],
        "lr/scale": row["lr_scale"],
    }
    return {k: v for k, v in out.items() if v is not None}


def train(
    config: TrainConfig, *, callback: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Train ``config.model`` on modular arithmetic; see :class:`TrainConfig` for the knobs.

    The loop, per step: draw the batch (full batch, or a minibatch from a seeded generator),
    ``zero_grad``, forward, ``backward``, the Grokfast filter if any, ``optimizer.step()``.
    Evaluation happens at step 0, every ``eval_every`` steps and at the end. A non-finite
    training loss stops the run before the step (parameters stay finite) and is reported as
    ``"diverged": true``.

    Files in ``config.out_dir`` (when given): ``metrics.csv`` / ``metrics.jsonl``
    (:data:`METRIC_FIELDS`), ``sdopt_records.jsonl`` (every SD estimate), ``checkpoint.pt``,
    ``summary.json`` and ``grokking.png``. ``summary.json`` holds ``steps_to_95_val_accuracy``
    (the first evaluated step with validation accuracy ≥ 0.95, or ``null``; this is the grokking
    step), ``steps_to_99_train_accuracy``, ``seconds_to_95_val_accuracy``, final and best
    accuracies and losses, ``wall_time_seconds``, ``steps``, ``diverged``, SD statistics and
    the ``config``.

    With ``config.resume`` and an existing ``out_dir/checkpoint.pt``, the model, optimizer
    (including :class:`sdopt.SDOptimizer` state), Grokfast filter, RNG states, step, metrics so
    far and wall time are restored and training continues exactly as the uninterrupted run
    (on CPU, full batch or minibatch).

    Args:
        config: The run's configuration (validated first).
        callback: Called with each evaluation row.

    Returns:
        A :class:`TrainResult`.
    """
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dtype = DTYPES[config.dtype]
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    checkpoint_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None

    dataset = make_dataset(config.p, config.operation, config.train_fraction, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.p, **config.model_kwargs).to(dtype)
    base, grokfast = build_optimizer(config, model)
    loss_fn = nn.functional.cross_entropy
    train_batch = dataset.train
    optimizer: torch.optim.Optimizer = base
    if config.sd_mode != "none":
        from sdopt.optim import SDOptimizer

        options = {"seed": config.seed, **config.sd_options}
        optimizer = SDOptimizer(
            base,
            model=model,
            loss_fn=loss_fn,
            data=train_batch,
            mode=config.sd_mode,
            every=config.sd_every,
            k=config.sd_k,
            **options,
        )
    batch_generator = torch.Generator().manual_seed(config.seed + 1)

    start_step = 0
    elapsed_before = 0.0
    rows: list[dict[str, Any]] = []
    if config.resume and checkpoint_path is not None and checkpoint_path.exists():
        ckpt = load_checkpoint(checkpoint_path)
        try:
            saved = TrainConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"Invalid resume: {checkpoint_path} is not an sdopt grok checkpoint "
                f"(its config does not load: {_first_line(exc)})"
            ) from None
        for f in fields(TrainConfig):
            if f.name in _RESUMABLE_CHANGES:
                continue
            if getattr(saved, f.name) != getattr(config, f.name):
                raise ValueError(
                    f"Invalid resume: {f.name}={getattr(config, f.name)!r} differs from the "
                    f"checkpoint's {getattr(saved, f.name)!r} in {checkpoint_path}"
                )
        if ckpt["step"] > config.steps:
            raise ValueError(
                f"Invalid steps: {config.steps} (the checkpoint is already at step {ckpt['step']})"
            )
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if grokfast is not None:
                grokfast.load_state_dict(ckpt["grokfast"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            batch_generator.set_state(ckpt["rng"]["batch"])
            start_step = int(ckpt["step"])
            elapsed_before = float(ckpt["elapsed_seconds"])
            rows = [dict(row) for row in ckpt["metrics"]]
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"Invalid resume: {checkpoint_path} does not fit this run "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        if rows and rows[-1]["step"] == start_step and start_step % config.eval_every:
            rows.pop()  # the closing evaluation of a shorter run: not on this run's schedule
        print(
            f"sdopt: resumed from step {start_step} of {checkpoint_path} (to step {config.steps})",
            file=sys.stderr,
            flush=True,
        )
    elif config.resume and checkpoint_path is not None:
        print(f"sdopt: no checkpoint at {checkpoint_path}: starting at step 0", file=sys.stderr)

    writer = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = _MetricsWriter(
            out_dir / f"metrics.{config.metrics_format}", config.metrics_format, rows
        )
    run, records_logger = _start_wandb(config, out_dir)
    logged_records = len(getattr(optimizer, "history", []))
    progress = _Progress(config.steps, start_step, config.progress)

    t0 = time.perf_counter()
    n_train = len(train_batch[1])

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def evaluate(step: int) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        train_loss, train_acc = _evaluate(model, dataset.train)
        val_loss, val_acc = _evaluate(model, dataset.val)
        model.train(was_training)
        row: dict[str, Any] = {
            "step": step,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            **_sd_fields(optimizer, config.lr),
            "elapsed_seconds": elapsed(),
        }
        rows.append(row)
        if writer is not None:
            writer.write(row)
        if run is not None:
            run.log(_wandb_row(row))
        if callback is not None:
            callback(row)
        return row

    def save_checkpoint(step: int) -> None:
        if checkpoint_path is None:
            return
        state = {
            "version": _CHECKPOINT_VERSION,
            "step": step,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "grokfast": grokfast.state_dict() if grokfast is not None else None,
            "rng": _rng_state(batch_generator),
            "metrics": rows,
            "elapsed_seconds": elapsed(),
        }
        tmp = checkpoint_path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            tmp.replace(checkpoint_path)  # atomic: an interrupted save keeps the last checkpoint
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def postfix(row: dict[str, Any]) -> dict[str, str]:
        out = {"train": f"{row['train_accuracy']:.3f}", "val": f"{row['val_accuracy']:.3f}"}
        if row["sharpness_dimension"] is not None:
            out["SD"] = f"{row['sharpness_dimension']:.3g}"
        if config.sd_mode == "lr":
            out["scale"] = f"{row['lr_scale']:.2f}"
        return out

    model.train()
    diverged = False
    step = start_step
    if not rows:
        progress.update(step, postfix(evaluate(0)))
    stop = (
        config.stop_at_val_accuracy is not None
        and rows
        and rows[-1]["val_accuracy"] >= config.stop_at_val_accuracy
    )
    try:
        while step < config.steps and not stop:
            if config.batch_size is None or config.batch_size >= n_train:
                x, y = train_batch
            else:
                idx = torch.randperm(n_train, generator=batch_generator)[: config.batch_size]
                x, y = train_batch[0][idx], train_batch[1][idx]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            if grokfast is not None:
                grokfast.apply()
            optimizer.step()
            step += 1
            history = getattr(optimizer, "history", None)
            if history is not None and len(history) > logged_records:
                if records_logger is not None:
                    for rec in history[logged_records:]:
                        records_logger.log(rec)
                logged_records = len(history)
            info = None
            if step % config.eval_every == 0 or step == config.steps:
                row = evaluate(step)
                info = postfix(row)
                if config.stop_at_val_accuracy is not None:
                    stop = row["val_accuracy"] >= config.stop_at_val_accuracy
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(step)
            progress.update(step, info)
        if rows[-1]["step"] != step:
            evaluate(step)
        save_checkpoint(step)
    except KeyboardInterrupt:
        save_checkpoint(step)  # resume later with the same out_dir and resume=True
        raise
    finally:
        progress.close()
        if writer is not None:
            writer.close()

    records = [
        rec.to_dict(prefix="", include_text=True) for rec in getattr(optimizer, "history", [])
    ]
    summary = _summary(config, rows, records, step, elapsed(), diverged, optimizer)
    summary["num_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if out_dir is not None:
        with (out_dir / "sdopt_records.jsonl").open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps({k: _json_value(v) for k, v in rec.items()}) + "\n")
        (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        if config.plot:
            from sdopt.plots import plot_training

            plot_training(
                rows,
                out_dir / PLOT_NAME,
                grok_step=summary["steps_to_95_val_accuracy"],
                title=_title(config),
                **_edge_line(config),
            )
    if run is not None:
        run.summary.update(
            {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        )
        if records_logger is not None:
            records_logger.close()
        run.finish()
    close = getattr(optimizer, "close", None)
    if callable(close):
        close()
    return TrainResult(summary, rows, records, model, optimizer, dataset, out_dir)


def _edge_line(config: TrainConfig) -> dict[str, Any]:
    """The plot's edge-of-stability line for the run's exponent map (2 for the GD map)."""
    from sdopt.dimension import edge_of_stability

    exponent_map = config.sd_options.get("exponent_map", "gd")
    if exponent_map == "gd" or config.sd_mode == "none":
        return {}
    adam = "adam" in config.optimizer
    momentum = config.betas[0] if adam else config.momentum
    if not adam and exponent_map == "adam":
        return {}  # rejected by SDOptimizer anyway
    edge = edge_of_stability(exponent_map, momentum)
    return {"edge": edge, "edge_label": f"{edge:.3g} (edge of the {exponent_map} map)"}


def _title(config: TrainConfig) -> str:
    symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[config.operation]
    sd = "" if config.sd_mode == "none" else f", SDOptimizer {config.sd_mode}"
    return (
        f"(a {symbol} b) mod {config.p}, {config.model}, {config.optimizer} lr {config.lr:g} "
        f"wd {config.weight_decay:g}{sd}, seed {config.seed}"
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _json_value(obj)


def _summary(
    config: TrainConfig,
    rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    step: int,
    wall: float,
    diverged: bool,
    optimizer: Any,
) -> dict[str, Any]:
    last = rows[-1]
    grok = _first_step(rows, "val_accuracy", 0.95)
    fit = _first_step(rows, "train_accuracy", 0.99)
    grok_seconds = None
    if grok is not None:
        grok_seconds = next(r["elapsed_seconds"] for r in rows if r["step"] == grok)
    ok = [r for r in records if r.get("status") == "ok"]
    return {
        "steps_to_95_val_accuracy": grok,
        "seconds_to_95_val_accuracy": grok_seconds,
        "steps_to_99_train_accuracy": fit,
        "grokking_delay_steps": None if grok is None or fit is None else grok - fit,
        "final_train_accuracy": last["train_accuracy"],
        "final_val_accuracy": last["val_accuracy"],
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "best_val_accuracy": max(r["val_accuracy"] for r in rows),
        "steps": step,
        "wall_time_seconds": wall,
        "diverged": diverged,
        "num_parameters": None,
        "sd_estimates": len(ok),
        "final_sharpness_dimension": ok[-1]["sharpness_dimension"] if ok else None,
        "final_lr_scale": float(getattr(optimizer, "lr_scale", 1.0)),
        "config": config.to_dict(),
    }
