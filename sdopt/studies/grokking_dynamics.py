"""Grokking dynamics: the sharpness dimension, trace and λ_max through a grokking run.

Reproduces at CPU scale the grokking experiment of Tuci, Korkmaz, Şimşekli, Birdal,
"Generalization at the Edge of Stability" (arXiv:2604.19740, §5): ``(a + b) mod p`` with one-hot
operands, 40 % of all pairs for training, an MLP of width 32 with GELU
(:class:`sdopt.tasks.grokking.GrokkingMLP`), full-batch SGD with momentum and weight decay. The
paper reports that SD rises while test accuracy creeps up, drops sharply during the grokking
jump, and rises again once test accuracy reaches 100 %, while trace and λ_max just decrease.

At ``checkpoints`` evenly spaced epochs the study records train/test accuracy and loss, the
weight norm, a cheap SD estimate (:func:`sdopt.estimate_sharpness_dimension`, full-batch
protocol, since training is full batch), λ_max and the trace (:func:`sdopt.compute_measures`),
and, where the model is small enough, the exact SD from the dense Hessian at every
``exact_every``-th checkpoint.

The verdict (:func:`jump_verdict`) is computed, not eyeballed. The *jump window* runs from the
first checkpoint whose test accuracy reaches ``lo`` of its final rise to the first that reaches
``hi`` of it (defaults 10 % and 90 %, the rise measured from the pre-jump level to the maximum).
With ``Δ_i = SD_{i+1} − SD_i`` the per-checkpoint changes, SD "drops sharply during the jump"
when its net change over the window is negative and its mean change per checkpoint inside the
window is below ``−factor ×`` the median ``|Δ|`` outside the window (default ``factor = 2``).
The same statistics are reported for λ_max and the trace.

Run it with ``sdopt study grokking [--quick] [--out DIR] [--cache DIR]``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdopt._checks import check_in_range, check_int, check_positive
from sdopt.studies.common import RunCache, import_pyplot, markdown_table, write_csv
from sdopt.studies.correlation import torch_threads

__all__ = [
    "GrokkingDynamicsConfig",
    "GrokkingDynamicsResults",
    "jump_verdict",
    "run_grokking_study",
]

_LOSS = nn.functional.cross_entropy


@dataclass(frozen=True)
class GrokkingDynamicsConfig:
    """Settings of the grokking-dynamics study (all of them enter the cache key).

    Attributes:
        p: modulus; ``train_fraction``: share of all ``p²`` pairs used for training.
        width, num_layers, bias: the :class:`~sdopt.tasks.grokking.GrokkingMLP`.
        init_scale: multiplies PyTorch's default initial weights (a larger initialisation
            makes the network memorise first and generalise later, i.e. grok).
        lr, momentum, weight_decay, epochs: full-batch SGD.
        checkpoints: number of evenly spaced measurement epochs (including 0 and ``epochs``).
        sd_methods: cheap estimators measured at every checkpoint (``"deflated"`` always runs: it
            also gives λ_max, the trace of its spectrum and the RDS sharpness).
        num_probes, num_steps, topk, topk_tol: their settings (SLQ probes and steps; top
            eigenpairs and their Lanczos tolerance).
        exact_every: exact SD (dense Hessian) at every ``exact_every``-th checkpoint (0: never);
            skipped when the model has more than ``exact_max_dim`` parameters.
        seed: seeds the split and the initialisation; ``measure_seed`` the estimators.
    """

    p: int = 97
    train_fraction: float = 0.4
    width: int = 32
    num_layers: int = 3
    bias: bool = False
    init_scale: float = 3.0
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 2_500
    checkpoints: int = 100
    sd_methods: tuple[str, ...] = ("deflated",)
    num_probes: int = 2
    num_steps: int = 20
    topk: int = 3
    topk_tol: float = 1e-2
    exact_every: int = 0
    exact_max_dim: int = 4_500
    seed: int = 0
    measure_seed: int = 1234

    def __post_init__(self) -> None:
        check_int("p", self.p, minimum=2)
        check_in_range(
            "train_fraction", self.train_fraction, 0.0, 1.0, low_open=True, high_open=True
        )
        check_int("width", self.width, minimum=1)
        check_int("num_layers", self.num_layers, minimum=2)
        check_positive("init_scale", self.init_scale)
        check_positive("lr", self.lr)
        check_in_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_int("epochs", self.epochs, minimum=1)
        check_int("checkpoints", self.checkpoints, minimum=2)
        check_int("num_probes", self.num_probes, minimum=1)
        check_int("num_steps", self.num_steps, minimum=2)
        check_int("topk", self.topk, minimum=1)
        check_positive("topk_tol", self.topk_tol)
        check_int("exact_every", self.exact_every, minimum=0)
        check_int("exact_max_dim", self.exact_max_dim, minimum=1)
        check_int("seed", self.seed)
        check_int("measure_seed", self.measure_seed)

    @classmethod
    def quick(cls, **overrides: Any) -> GrokkingDynamicsConfig:
        """Same task (``p = 97``) and run, 20 checkpoints instead of 100.

        Smaller moduli do not grok with this MLP at 40 % training data within a few thousand
        epochs (at ``p = 31, 47, 59`` it memorises and test accuracy stays below 2 %), so the
        quick variant keeps ``p`` and shortens the run instead.
        """
        settings: dict[str, Any] = {
            "checkpoints": 20,
        }
        settings.update(overrides)
        return cls(**settings)


# ---------------------------------------------------------------------------------------------
# training and measurement


def _build_model(config: GrokkingDynamicsConfig) -> nn.Module:
    from sdopt.tasks.grokking import GrokkingMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GrokkingMLP(config.p, config.width, config.num_layers, bias=config.bias)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(config.init_scale)
    return model


def checkpoint_epochs(epochs: int, checkpoints: int) -> list[int]:
    """``checkpoints`` distinct, evenly spaced epochs from 0 to ``epochs`` inclusive."""
    return sorted({round(i * epochs / (checkpoints - 1)) for i in range(checkpoints)})


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    out = model(inputs)
    return float(_LOSS(out, targets)), float((out.argmax(1) == targets).double().mean())


def _measure(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    config: GrokkingDynamicsConfig,
    exact: bool,
    warm: dict[str, Any],
) -> dict[str, float]:
    """SD (top-k + bulk, warm-started from the previous checkpoint's eigenvectors; it also gives
    λ_max, the trace of its spectrum and the RDS sharpness), other cheap SD estimators, the exact
    SD when asked, and the weight norm, all in float64 on the full training set."""
    import sdopt

    model64 = copy.deepcopy(model).to(torch.float64)
    out: dict[str, float] = {}
    for method in ("deflated", *(m for m in config.sd_methods if m != "deflated")):
        options: dict[str, Any] = {
            "protocol": "full-batch",
            "generator": torch.Generator().manual_seed(config.measure_seed),
        }
        if method == "deflated":
            options.update(
                k=config.topk,
                tol=config.topk_tol,
                num_probes=config.num_probes,
                num_steps=config.num_steps,
            )
            if warm.get("eigenvectors") is not None:
                options["init"] = warm["eigenvectors"]
        else:
            options.update(num_probes=config.num_probes, num_steps=config.num_steps)
        start = time.perf_counter()
        est = sdopt.estimate_sharpness_dimension(
            model64, _LOSS, train, config.lr, method=method, **options
        )
        out[f"sd_{method}"] = float(est.value)
        out[f"sd_{method}_uncertainty"] = float(est.uncertainty)
        out[f"sd_{method}_seconds"] = time.perf_counter() - start
        out[f"sd_{method}_products"] = float(est.num_products)
        if method == "deflated":
            warm["eigenvectors"] = est.eigenvectors
            out["lambda_max"] = float(est.eigenvalues[0, 0])
            out["trace"] = float(est.trace)
            out["rds_sharpness"] = float(est.lambda_1)
    if exact:
        start = time.perf_counter()
        est = sdopt.estimate_sharpness_dimension(
            model64, _LOSS, train, config.lr, method="exact", protocol="full-batch",
            max_dim=config.exact_max_dim,
        )  # fmt: skip
        out["sd_exact"] = float(est.value)
        out["sd_exact_seconds"] = time.perf_counter() - start
    out.update(sdopt.compute_measures(model64, _LOSS, train, config.lr, which=("weight_norm",)))
    return out


def train_with_checkpoints(
    config: GrokkingDynamicsConfig,
    progress: Callable[[str], None] | None = None,
    partial_path: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Train full batch and return one record per checkpoint (uncached).

    With ``partial_path``, each record is also appended to that JSON-lines file as soon as it
    is measured, so an interrupted run leaves its checkpoints behind.
    """
    from sdopt.tasks.grokking import modular_arithmetic

    data = modular_arithmetic(config.p, "add", config.train_fraction, seed=config.seed)
    model = _build_model(config)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    dim = sum(p.numel() for p in model.parameters())
    exact_ok = config.exact_every > 0 and dim <= config.exact_max_dim
    targets = checkpoint_epochs(config.epochs, config.checkpoints)
    records: list[dict[str, Any]] = []
    warm: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(config.epochs + 1):
        if epoch in targets:
            index = len(records)
            train_loss, train_acc = _evaluate(model, *data.train)
            test_loss, test_acc = _evaluate(model, *data.val)
            record: dict[str, Any] = {
                "checkpoint": index,
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "dim": dim,
            }
            finite = math.isfinite(train_loss) and all(
                torch.isfinite(p).all() for p in model.parameters()
            )
            if finite:
                record.update(
                    _measure(
                        model,
                        data.train,
                        config,
                        exact_ok and index % config.exact_every == 0,
                        warm,
                    )
                )
            records.append(record)
            if partial_path is not None:
                with open(partial_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(
                    f"epoch {epoch:>6}: train acc {train_acc:.3f}, test acc {test_acc:.3f}, "
                    + ", ".join(
                        f"{m} {record.get(f'sd_{m}', math.nan):.1f}" for m in config.sd_methods
                    )
                    + f", λ_max {record.get('lambda_max', math.nan):.3g}"
                    + f", trace {record.get('trace', math.nan):.4g} "
                    f"({time.perf_counter() - start:.0f}s)"
                )
            if not finite:
                break
        if epoch == config.epochs:
            break
        optimizer.zero_grad(set_to_none=True)
        _LOSS(model(data.train_inputs), data.train_targets).backward()
        optimizer.step()
    return records


# ---------------------------------------------------------------------------------------------
# verdict


def jump_window(
    test_accuracy: Sequence[float], *, lo: float = 0.1, hi: float = 0.9
) -> tuple[int, int] | None:
    """``(start, end)`` checkpoint indices of the grokking jump, or ``None`` if there is none.

    The rise is measured from the minimum test accuracy before the maximum to the maximum; the
    window runs from the first checkpoint (after that minimum) reaching ``lo`` of the rise to the
    first reaching ``hi`` of it, widened to at least two checkpoints. No jump when the rise is
    below 0.5 (the network never generalised).
    """
    acc = [float(a) for a in test_accuracy]
    if len(acc) < 2:
        return None
    top = max(range(len(acc)), key=acc.__getitem__)
    low = min(range(top + 1), key=acc.__getitem__)
    rise = acc[top] - acc[low]
    if rise < 0.5:
        return None
    start = next(i for i in range(low, top + 1) if acc[i] >= acc[low] + lo * rise)
    end = next(i for i in range(start, top + 1) if acc[i] >= acc[low] + hi * rise)
    if end == start:
        start = max(0, start - 1)
    return start, end


def change_statistics(
    values: Sequence[float], window: tuple[int, int], *, factor: float = 2.0
) -> dict[str, Any]:
    """Net and per-checkpoint change of ``values`` inside ``window`` against the outside.

    Returns ``net_change`` (value at window end minus start), ``mean_step_inside``,
    ``median_abs_step_outside``, ``ratio`` (``mean_step_inside / median_abs_step_outside``) and
    ``sharp_drop`` (``net_change < 0`` and ``ratio < −factor``).
    """
    v = [float(x) for x in values]
    start, end = window
    steps = [
        (i, v[i + 1] - v[i])
        for i in range(len(v) - 1)
        if math.isfinite(v[i]) and math.isfinite(v[i + 1])
    ]
    inside = [d for i, d in steps if start <= i < end]
    outside = sorted(abs(d) for i, d in steps if not start <= i < end)
    net = v[end] - v[start]
    mean_in = sum(inside) / len(inside) if inside else math.nan
    med_out = outside[len(outside) // 2] if outside else math.nan
    if not (math.isfinite(mean_in) and math.isfinite(med_out)):
        ratio = math.nan
    elif med_out > 0:
        ratio = mean_in / med_out
    else:  # flat outside: any change inside is infinitely sharp
        ratio = math.copysign(math.inf, mean_in) if mean_in else 0.0
    sharp = bool(math.isfinite(net) and net < 0 and not math.isnan(ratio) and ratio < -factor)
    return {
        "net_change": net,
        "mean_step_inside": mean_in,
        "median_abs_step_outside": med_out,
        "ratio": ratio,
        "sharp_drop": sharp,
    }


def jump_verdict(
    records: Sequence[dict[str, Any]], keys: Sequence[str], *, factor: float = 2.0
) -> dict[str, Any]:
    """The jump window and :func:`change_statistics` of each of ``keys`` over the records."""
    window = jump_window([r["test_accuracy"] for r in records])
    verdict: dict[str, Any] = {"window": window, "grokked": window is not None}
    if window is None:
        return verdict
    verdict["window_epochs"] = (records[window[0]]["epoch"], records[window[1]]["epoch"])
    for key in keys:
        values = [r.get(key, math.nan) for r in records]
        if sum(math.isfinite(float(x)) for x in values) >= 3:
            verdict[key] = change_statistics(values, window, factor=factor)
    return verdict


# ---------------------------------------------------------------------------------------------
# outputs


@dataclass
class GrokkingDynamicsResults:
    config: GrokkingDynamicsConfig
    records: list[dict[str, Any]]
    verdict: dict[str, Any]
    cached: bool
    files: dict[str, str]


def plot_dynamics(
    records: Sequence[dict[str, Any]],
    verdict: dict[str, Any],
    path: str | os.PathLike[str],
    lr: float | None = None,
) -> Path:
    """Accuracies, SD estimates, λ_max and trace against epochs; the jump window shaded."""
    plt = import_pyplot()
    epochs = [r["epoch"] for r in records]
    panels = [
        ("accuracy", [("train_accuracy", "train"), ("test_accuracy", "test")]),
        (
            "sharpness dimension",
            [(k, k[3:]) for k in ("sd_exact", "sd_deflated", "sd_slq", "sd_kde", "sd_ps")],
        ),
        ("λ_max", [("lambda_max", "λ_max")]),
        ("trace", [("trace", "trace")]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 8.5), sharex=True)
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            pts = [
                (e, r[key])
                for e, r in zip(epochs, records)
                if isinstance(r.get(key), float) and math.isfinite(r[key])
            ]
            if pts:
                style = "o" if key == "sd_exact" else "-"
                ax.plot(*zip(*pts), style, label=label, markersize=4)
        ax.set_ylabel(title, fontsize=9)
        if title == "sharpness dimension":
            ax.set_yscale("symlog", linthresh=10.0)
        if title == "λ_max" and lr is not None:
            ax.axhline(2.0 / lr, color="grey", linestyle="--", linewidth=0.8, label="2/η")
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7, loc="best")
        if verdict.get("window_epochs"):
            ax.axvspan(*verdict["window_epochs"], color="orange", alpha=0.2, linewidth=0)
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("epoch (full batch)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


RECORD_COLUMNS = (
    "checkpoint", "epoch", "train_accuracy", "test_accuracy", "train_loss", "test_loss",
    "sd_exact", "sd_deflated", "sd_deflated_uncertainty", "sd_slq", "sd_slq_uncertainty", "sd_kde", "sd_ps",
    "lambda_max", "trace", "weight_norm",
)  # fmt: skip


def _verdict_markdown(verdict: dict[str, Any]) -> str:
    if not verdict.get("grokked"):
        return "No grokking jump: test accuracy never rose by 0.5 or more.\n"
    lines = [
        f"Jump window: checkpoints {verdict['window'][0]}–{verdict['window'][1]} "
        f"(epochs {verdict['window_epochs'][0]}–{verdict['window_epochs'][1]}).\n",
    ]
    rows = []
    for key, stats in verdict.items():
        if isinstance(stats, dict) and "net_change" in stats:
            rows.append(
                [
                    key,
                    stats["net_change"],
                    stats["mean_step_inside"],
                    stats["median_abs_step_outside"],
                    stats["ratio"],
                    stats["sharp_drop"],
                ]
            )
    header = [
        "quantity",
        "net change in window",
        "mean step inside",
        "median abs step outside",
        "ratio",
        "sharp drop",
    ]
    return "\n".join(lines) + "\n" + markdown_table(header, rows, digits=4)


def write_outputs(
    config: GrokkingDynamicsConfig,
    records: list[dict[str, Any]],
    verdict: dict[str, Any],
    out_dir: Path,
) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "checkpoints_csv": str(
            write_csv(
                out_dir / "checkpoints.csv",
                RECORD_COLUMNS,
                [[r.get(c) for c in RECORD_COLUMNS] for r in records],
            )
        ),
        "plot": str(plot_dynamics(records, verdict, out_dir / "grokking_dynamics.png", config.lr)),
    }
    (out_dir / "verdict.json").write_text(json.dumps(verdict, indent=1, default=str))
    files["verdict_json"] = str(out_dir / "verdict.json")
    md = out_dir / "grokking_dynamics.md"
    md.write_text(
        "## Verdict\n\n" + _verdict_markdown(verdict)
        + "\n## Configuration\n\n```json\n" + json.dumps(dataclasses.asdict(config), indent=1) + "\n```\n"
    )  # fmt: skip
    files["summary_md"] = str(md)
    return files


def run_grokking_study(
    config: GrokkingDynamicsConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] = "results/grokking",
    cache_dir: str | os.PathLike[str] | None = None,
    num_threads: int | None = 1,
    progress: Callable[[str], None] | None = print,
) -> GrokkingDynamicsResults:
    """Train (or load from the cache) one grokking run, then write the CSV, plot and verdict.

    Args:
        config: settings (default: the full ``p = 97`` study).
        out_dir: output directory; ``cache_dir`` (default ``<out_dir>/cache``) holds the run.
        num_threads: torch threads while the study runs (``None`` leaves them alone).
        progress: called with one line per checkpoint (``None`` for silence).
    """
    config = config or GrokkingDynamicsConfig()
    out = Path(out_dir)
    cache = RunCache(Path(cache_dir) if cache_dir is not None else out / "cache", prefix="grokking")
    key = {"study": "grokking_dynamics", **dataclasses.asdict(config)}
    with torch_threads(num_threads):
        partial = out / "checkpoints.partial.jsonl"

        def compute() -> dict[str, Any]:
            out.mkdir(parents=True, exist_ok=True)
            partial.unlink(missing_ok=True)
            records = train_with_checkpoints(config, progress, partial)
            partial.unlink(missing_ok=True)
            return {"records": records}

        result, hit = cache.get_or_run(key, compute)
    records = result["records"]
    keys = [
        k
        for k in (
            "sd_exact",
            "sd_deflated",
            "sd_slq",
            "sd_kde",
            "sd_ps",
            "lambda_max",
            "trace",
            "weight_norm",
        )
        if any(k in r for r in records)
    ]
    verdict = jump_verdict(records, keys)
    files = write_outputs(config, records, verdict, out)
    return GrokkingDynamicsResults(config, records, verdict, hit, files)
