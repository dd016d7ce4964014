"""Grokking dynamics: the sharpness dimension, trace and λ_max through a grokking run.

Reproduces at CPU scale the grokking experiment of Tuci, Korkmaz, Şimşekli, Birdal,
"Generalization at the Edge of Stability" (arXiv:2604.19740, §5): ``(a + b) mod p`` with one-hot
operands, 40 % of all pairs for training, an MLP of width 32 with GELU
(:class:`sdopt.tasks.grokking.GrokkingMLP`), full-batch SGD with momentum and weight decay. The
paper reports that SD rises while test accuracy creeps up, drops sharply during the grokking
jump, and rises again once test accuracy reaches 100 %, while trace and λ_max just decrease.

Each seed of ``seeds`` is one training run (the seed sets the train/test split and the
initialisation), cached on its own. At ``checkpoints`` evenly spaced epochs the study records
train/test accuracy and loss, the weight norm, and one SD estimate
(:func:`sdopt.estimate_sharpness_dimension` with ``method="deflated"``, full-batch protocol,
since training is full batch; top and bottom eigenpairs warm-started from the previous
checkpoint). From that one estimate, with no further Hessian-vector products, it records SD of
the GD map ``I − ηH`` (``sd_deflated``, as the paper), the decomposition of THEORY.md §8
(``n_edge``, ``n_neg``, ``total_exponent``, ``j_star``, ``lambda_min``), λ_max, the trace of
the spectrum, the RDS sharpness, and SD of the heavy-ball map of the optimizer actually used
(``sd_momentum``, :func:`sdopt.sd_from_spectrum` with ``exponent_map="momentum"``; its state
has ``2d`` coordinates, so it lies in ``[0, 2d]``). Where the model is small enough, the exact
SD from the dense Hessian is added at every ``exact_every``-th checkpoint.

The verdict is computed, not eyeballed. The *jump window* (:func:`jump_window`) runs from the
first checkpoint whose test accuracy reaches ``lo`` of its final rise to the first that reaches
``hi`` of it (defaults 10 % and 90 %, the rise measured from the pre-jump level to the maximum).
With ``Δ_i = v_{i+1} − v_i`` the per-checkpoint changes of a quantity:

* :func:`change_statistics` (the first release's rule): v "drops sharply during the jump" when
  its net change over the window is negative and its mean ``Δ`` inside the window is below
  ``−factor ×`` the median ``|Δ|`` outside it (default ``factor = 2``).
* :func:`permutation_test`, the statistic fixed in advance for the claim: the mean ``Δ`` inside
  the window, against the same mean over a window of the same length placed at every circular
  shift of the ``Δ`` series (which keeps its autocorrelation); one-sided p-value = fraction of
  placements, the observed one included, with mean ``≤`` the observed. The mean ``Δ`` before
  and after the window ("rises before and after") get their own placement p-values (``≥``).
* :func:`combined_permutation_test` pools the seeds: each seed's mean ``Δ`` divided by its
  median ``|Δ|`` outside the window, averaged over seeds, against a Monte-Carlo null with an
  independent placement per seed (10,000 draws, generator seed 0).

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
    "change_statistics",
    "combined_permutation_test",
    "jump_verdict",
    "jump_window",
    "permutation_test",
    "run_grokking_study",
    "study_verdict",
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
            eigenpairs and their Lanczos tolerance); the defaults are the library's
            (:func:`sdopt.estimate_sharpness_dimension`). Cheaper settings (k = 3, 2 probes ×
            20 steps, the first rerun's) were off the exact SD by factors of 4.6–220 on this
            model (docs/results/grokking-dynamics.md); even the library defaults were off by
            4–28 %, and 6× at one checkpoint.
        exact_every: exact SD (dense Hessian) at every ``exact_every``-th checkpoint (0: never);
            skipped when the model has more than ``exact_max_dim`` parameters.
        seeds: one training run per seed, each cached on its own (the seed sets both the
            train/test split and the initialisation); ``measure_seed`` seeds the estimators.
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
    checkpoints: int = 34
    sd_methods: tuple[str, ...] = ("deflated",)
    num_probes: int = 8
    num_steps: int = 40
    topk: int = 8
    topk_tol: float = 1e-2
    exact_every: int = 0
    exact_max_dim: int = 4_500
    seeds: tuple[int, ...] = (0, 1, 2)
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
        if not self.seeds:
            raise ValueError(f"Invalid seeds: {self.seeds} (need at least one seed)")
        for seed in self.seeds:
            check_int("seed", seed)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid seeds: {self.seeds} (repeated seed)")
        check_int("measure_seed", self.measure_seed)

    @classmethod
    def quick(cls, **overrides: Any) -> GrokkingDynamicsConfig:
        """Same task (``p = 97``) and run, one seed (0) and 20 checkpoints instead of 34.

        Smaller moduli do not grok with this MLP at 40 % training data within a few thousand
        epochs (at ``p = 31, 47, 59`` it memorises and test accuracy stays below 2 %), so the
        quick variant keeps ``p`` and shortens the run instead.
        """
        settings: dict[str, Any] = {
            "checkpoints": 20,
            "seeds": (0,),
        }
        settings.update(overrides)
        return cls(**settings)


# ---------------------------------------------------------------------------------------------
# training and measurement


def _build_model(config: GrokkingDynamicsConfig, seed: int) -> nn.Module:
    from sdopt.tasks.grokking import GrokkingMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
            if warm.get("bottom_eigenvectors") is not None:
                options["init_bottom"] = warm["bottom_eigenvectors"]
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
            warm["bottom_eigenvectors"] = est.bottom_eigenvectors
            out["lambda_max"] = float(est.eigenvalues[0, 0])
            out["trace"] = float(est.trace)
            out["rds_sharpness"] = float(est.lambda_1)
            # why SD is what it is, from the same estimate (no further products)
            decomposition = est.decomposition()
            for name in ("n_edge", "n_neg", "total_exponent", "j_star", "lambda_min"):
                out[name] = float(decomposition[name])
            # the heavy-ball map of the optimizer actually used, read from the same spectrum
            value, se = sdopt.sd_from_spectrum(
                est.spectrum, config.lr, exponent_map="momentum", momentum=config.momentum
            )
            out["sd_momentum"] = float(value)
            out["sd_momentum_uncertainty"] = float(se)
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
    *,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Train full batch with ``seed`` (default: the first of ``config.seeds``) and return one
    record per checkpoint (uncached).

    With ``partial_path``, each record is also appended to that JSON-lines file as soon as it
    is measured, so an interrupted run leaves its checkpoints behind.
    """
    from sdopt.tasks.grokking import modular_arithmetic

    seed = config.seeds[0] if seed is None else check_int("seed", seed)
    data = modular_arithmetic(config.p, "add", config.train_fraction, seed=seed)
    model = _build_model(config, seed)
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
                "seed": seed,
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
                    f"seed {seed} epoch {epoch:>6}: train acc {train_acc:.3f}, test acc {test_acc:.3f}, "
                    + ", ".join(
                        f"{m} {record.get(f'sd_{m}', math.nan):.1f}" for m in config.sd_methods
                    )
                    + f", sd_momentum {record.get('sd_momentum', math.nan):.1f}"
                    + f", n_edge {record.get('n_edge', math.nan):.3g}"
                    + f", n_neg {record.get('n_neg', math.nan):.3g}"
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
    # step_changes marks a pair with a non-finite value as nan
    steps = [(i, d) for i, d in enumerate(step_changes(v)) if not math.isnan(d)]
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
# permutation test (statistic fixed in advance, see the module docstring)

#: Quantities tested against the claim (the paper's SD, the heavy-ball SD, and the rest).
TESTED = (
    "sd_deflated", "sd_momentum", "lambda_max", "trace", "rds_sharpness", "n_edge", "n_neg",
    "weight_norm",
)  # fmt: skip

#: The three segments of the series: ``(name, alternative)``; "less" counts placements whose
#: mean change is ``≤`` the observed one (a drop), "greater" those ``≥`` it (a rise).
SEGMENTS = (("before", "greater"), ("inside", "less"), ("after", "greater"))


def step_changes(values: Sequence[float]) -> list[float]:
    """``Δ_i = v_{i+1} − v_i`` for ``i = 0 … n − 2``; ``nan`` where either value is not finite."""
    v = [float(x) for x in values]
    return [
        v[i + 1] - v[i] if math.isfinite(v[i]) and math.isfinite(v[i + 1]) else math.nan
        for i in range(len(v) - 1)
    ]


def placement_means(deltas: Sequence[float], length: int) -> list[float]:
    """Mean of the finite ``Δ`` in the circular window ``[s, s + length)`` for every start ``s``.

    A window with no finite ``Δ`` has mean ``nan``. ``length`` must be ``1 … len(deltas)``.
    """
    m = len(deltas)
    check_int("length", length, minimum=1)
    if length > m:
        raise ValueError(f"Invalid length: {length} (the series has {m} changes)")
    out = []
    for start in range(m):
        window = [deltas[(start + j) % m] for j in range(length)]
        finite = [d for d in window if math.isfinite(d)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _segments(window: tuple[int, int], m: int) -> dict[str, tuple[int, int]]:
    """``(first Δ index, length)`` of the changes before, inside and after the jump window."""
    start, end = window
    return {"before": (0, start), "inside": (start, end - start), "after": (end, m - end)}


def _p_value(means: Sequence[float], observed: int, alternative: str) -> float:
    obs = means[observed]
    null = [x for x in means if math.isfinite(x)]
    if not math.isfinite(obs) or not null:
        return math.nan
    hits = sum(x <= obs for x in null) if alternative == "less" else sum(x >= obs for x in null)
    return hits / len(null)


def _outside_scale(deltas: Sequence[float], window: tuple[int, int]) -> tuple[float, str]:
    """Median ``|Δ|`` outside the window (mean ``|Δ|`` if the median is 0; ``nan`` if flat)."""
    start, end = window
    outside = sorted(
        abs(d) for i, d in enumerate(deltas) if math.isfinite(d) and not start <= i < end
    )
    if not outside:
        return math.nan, "none"
    median = outside[len(outside) // 2]
    if median > 0:
        return median, "median"
    mean = sum(outside) / len(outside)
    return (mean, "mean") if mean > 0 else (math.nan, "flat")


def permutation_test(values: Sequence[float], window: tuple[int, int]) -> dict[str, Any]:
    """Mean per-checkpoint change before, inside and after ``window``, with placement p-values.

    With ``Δ_i = v_{i+1} − v_i`` (``m = n − 1`` changes), the statistic of a segment is the mean
    of its finite ``Δ``. The null distribution places a segment of the same length at each of
    the ``m`` circular shifts of the ``Δ`` series (the observed one included), which keeps the
    autocorrelation of the series. The p-value is one-sided: inside the window, the fraction of
    placements whose mean is ``≤`` the observed one (a drop); before and after it, ``≥`` (a
    rise). The smallest attainable p-value is ``1/m``; a segment of length 0 (window at an end
    of the series) or without finite changes gives ``nan``.

    Returns:
        ``{"before"|"inside"|"after": {"mean_change", "p_value", "length", "placements"},
        "scale": median |Δ| outside the window, "scale_kind"}``.
    """
    deltas = step_changes(values)
    m = len(deltas)
    start, end = window
    if not 0 <= start < end <= m:
        raise ValueError(f"Invalid window: {window} (need 0 <= start < end <= {m})")
    out: dict[str, Any] = {}
    for name, alternative in SEGMENTS:
        first, length = _segments(window, m)[name]
        if length == 0:
            out[name] = {"mean_change": math.nan, "p_value": math.nan, "length": 0, "placements": 0}
            continue
        means = placement_means(deltas, length)
        out[name] = {
            "mean_change": means[first],
            "p_value": _p_value(means, first, alternative),
            "length": length,
            "placements": sum(math.isfinite(x) for x in means),
        }
    out["scale"], out["scale_kind"] = _outside_scale(deltas, window)
    return out


def combined_permutation_test(
    series: Sequence[tuple[Sequence[float], tuple[int, int]]],
    *,
    draws: int = 10_000,
    generator_seed: int = 0,
) -> dict[str, Any]:
    """Combine :func:`permutation_test` over seeds: one statistic and p-value per segment.

    For each seed ``k`` (values and jump window), the segment's mean change is divided by that
    seed's median ``|Δ|`` outside the window (the scale of :func:`permutation_test`); the
    combined statistic is the average of these over the seeds. Its null distribution draws,
    ``draws`` times, an independent uniform placement per seed (a seed generator fixed by
    ``generator_seed``) and averages the normalised placement means; the one-sided p-value is
    ``(1 + #{null ≤ observed}) / (1 + draws)`` inside the window, with ``≥`` before and after.
    Seeds whose segment is empty or whose outside changes are all 0 are left out (``n_seeds``).
    """
    check_int("draws", draws, minimum=1)
    gen = torch.Generator().manual_seed(generator_seed)
    out: dict[str, Any] = {}
    for name, alternative in SEGMENTS:
        observed, nulls = [], []
        for values, window in series:
            deltas = step_changes(values)
            first, length = _segments(window, len(deltas))[name]
            scale, _ = _outside_scale(deltas, window)
            if length == 0 or not math.isfinite(scale):
                continue
            means = placement_means(deltas, length)
            if not math.isfinite(means[first]):
                continue
            finite = torch.tensor([x for x in means if math.isfinite(x)], dtype=torch.float64)
            observed.append(means[first] / scale)
            nulls.append(finite / scale)
        if not observed:
            out[name] = {"statistic": math.nan, "p_value": math.nan, "n_seeds": 0}
            continue
        obs = float(torch.tensor(observed, dtype=torch.float64).mean())
        null = torch.stack([n[torch.randint(len(n), (draws,), generator=gen)] for n in nulls]).mean(
            0
        )
        tol = 1e-12 * max(1.0, abs(obs))
        hits = (
            int((null <= obs + tol).sum())
            if alternative == "less"
            else int((null >= obs - tol).sum())
        )
        out[name] = {
            "statistic": obs,
            "p_value": (1 + hits) / (1 + draws),
            "n_seeds": len(observed),
        }
    out["draws"] = draws
    return out


def study_verdict(
    runs: dict[int, list[dict[str, Any]]],
    config: GrokkingDynamicsConfig | None = None,
    *,
    keys: Sequence[str] | None = None,
    draws: int = 10_000,
    generator_seed: int = 0,
) -> dict[str, Any]:
    """Per-seed :func:`jump_verdict` and :func:`permutation_test`, and the combination over the
    seeds that grokked (:func:`combined_permutation_test`)."""
    if keys is None:
        keys = [
            k
            for k in ("sd_exact", "sd_deflated", "sd_slq", "sd_kde", "sd_ps", *TESTED)
            if any(k in r for records in runs.values() for r in records)
        ]
    tested = [k for k in TESTED if k in keys]
    per_seed: dict[str, Any] = {}
    combined_inputs: dict[str, list[tuple[list[float], tuple[int, int]]]] = {k: [] for k in tested}
    for seed, records in runs.items():
        verdict = jump_verdict(records, keys)
        if verdict["grokked"]:
            verdict["window_test_accuracy"] = (
                records[verdict["window"][0]]["test_accuracy"],
                records[verdict["window"][1]]["test_accuracy"],
            )
            verdict["permutation"] = {}
            for key in tested:
                values = [float(r.get(key, math.nan)) for r in records]
                if sum(math.isfinite(x) for x in values) < 3:
                    continue
                verdict["permutation"][key] = permutation_test(values, verdict["window"])
                combined_inputs[key].append((values, verdict["window"]))
        per_seed[str(seed)] = verdict
    combined = {
        key: combined_permutation_test(inputs, draws=draws, generator_seed=generator_seed)
        for key, inputs in combined_inputs.items()
        if inputs
    }
    return {
        "seeds": [int(s) for s in runs],
        "grokked": {str(s): per_seed[str(s)]["grokked"] for s in runs},
        "per_seed": per_seed,
        "combined": combined,
        "draws": draws,
        "generator_seed": generator_seed,
        "lr": None if config is None else config.lr,
    }


# ---------------------------------------------------------------------------------------------
# outputs


@dataclass
class GrokkingDynamicsResults:
    """What :func:`run_grokking_study` returns.

    ``records``: all checkpoints of all seeds (each with its ``seed``); ``runs``: the same by
    seed; ``cached``: every seed came from the cache; ``cached_seeds``: which did.
    """

    config: GrokkingDynamicsConfig
    records: list[dict[str, Any]]
    verdict: dict[str, Any]
    cached: bool
    files: dict[str, str]
    runs: dict[int, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    cached_seeds: dict[int, bool] = dataclasses.field(default_factory=dict)


PANELS = (
    ("accuracy", (("train_accuracy", "train"), ("test_accuracy", "test")), "linear"),
    (
        "sharpness dimension",
        (("sd_exact", "exact"), ("sd_deflated", "GD map (paper)"), ("sd_momentum", "heavy ball β")),
        "symlog",
    ),
    ("counts", (("n_edge", "n_edge (GD map)"), ("n_neg", "n_neg")), "symlog1"),
    ("total exponent T", (("total_exponent", "T"),), "symlog1"),
    ("λ_max", (("lambda_max", "λ_max"),), "linear"),
    ("λ_min", (("lambda_min", "λ_min"),), "linear"),
    ("trace", (("trace", "trace"),), "linear"),
    ("weight norm", (("weight_norm", "‖w‖"),), "linear"),
)


def plot_dynamics(
    runs: dict[int, Sequence[dict[str, Any]]],
    verdict: dict[str, Any],
    path: str | os.PathLike[str],
    lr: float | None = None,
    momentum: float | None = None,
) -> Path:
    """One column per seed: accuracies, SD (GD and heavy-ball maps), ``n_edge``/``n_neg``, ``T``,
    λ_max, λ_min, trace and weight norm against epochs; the jump window shaded."""
    plt = import_pyplot()
    seeds = list(runs)
    fig, axes = plt.subplots(
        len(PANELS), len(seeds), figsize=(4.4 * len(seeds) + 1.0, 15), sharex="col", squeeze=False
    )
    for col, seed in enumerate(seeds):
        records = runs[seed]
        epochs = [r["epoch"] for r in records]
        window = verdict.get("per_seed", {}).get(str(seed), {}).get("window_epochs")
        for row, (title, series, scale) in enumerate(PANELS):
            ax = axes[row][col]
            for key, label in series:
                pts = [
                    (e, r[key])
                    for e, r in zip(epochs, records)
                    if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
                ]
                if pts:
                    style = "o" if key == "sd_exact" else "-"
                    ax.plot(*zip(*pts), style, label=label, markersize=3, linewidth=1.1)
            if scale == "symlog":
                ax.set_yscale("symlog", linthresh=10.0)
            elif scale == "symlog1":
                ax.set_yscale("symlog", linthresh=1.0)
            if title == "λ_max" and lr is not None:
                ax.axhline(2.0 / lr, color="grey", linestyle="--", linewidth=0.8, label="2/η")
                if momentum:
                    ax.axhline(
                        2.0 * (1 + momentum) / lr, color="grey", linestyle=":", linewidth=0.8,
                        label="2(1+β)/η",
                    )  # fmt: skip
            if col == 0:
                ax.set_ylabel(title, fontsize=9)
            if row == 0:
                ax.set_title(f"seed {seed}", fontsize=10)
            if len(ax.get_lines()) > 1 and col == len(seeds) - 1:
                ax.legend(fontsize=7, loc="best")
            if window:
                ax.axvspan(*window, color="orange", alpha=0.2, linewidth=0)
            ax.tick_params(labelsize=7)
        axes[-1][col].set_xlabel("epoch (full batch)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


RECORD_COLUMNS = (
    "seed", "checkpoint", "epoch", "train_accuracy", "test_accuracy", "train_loss", "test_loss",
    "sd_exact", "sd_deflated", "sd_deflated_uncertainty", "sd_momentum", "sd_momentum_uncertainty",
    "sd_slq", "sd_slq_uncertainty", "sd_kde", "sd_ps",
    "n_edge", "n_neg", "total_exponent", "j_star", "lambda_max", "lambda_min", "trace",
    "rds_sharpness", "weight_norm", "sd_deflated_products", "sd_deflated_seconds",
)  # fmt: skip


def _verdict_markdown(verdict: dict[str, Any]) -> str:
    lines: list[str] = []
    for seed, v in verdict["per_seed"].items():
        lines.append(f"### Seed {seed}\n")
        if not v.get("grokked"):
            lines.append("No grokking jump: test accuracy never rose by 0.5 or more.\n")
            continue
        lines.append(
            f"Jump window: checkpoints {v['window'][0]}–{v['window'][1]} "
            f"(epochs {v['window_epochs'][0]}–{v['window_epochs'][1]}, test accuracy "
            f"{v['window_test_accuracy'][0]:.3f} → {v['window_test_accuracy'][1]:.3f}).\n"
        )
        rows = [
            [key, s["net_change"], s["mean_step_inside"], s["median_abs_step_outside"],
             s["ratio"], s["sharp_drop"]]
            for key, s in v.items()
            if isinstance(s, dict) and "net_change" in s
        ]  # fmt: skip
        header = ["quantity", "net change in window", "mean Δ inside", "median abs Δ outside",
                  "ratio", "sharp drop (ratio < −2)"]  # fmt: skip
        lines.append(markdown_table(header, rows, digits=4))
        rows = [
            [key, t["before"]["mean_change"], t["before"]["p_value"], t["inside"]["mean_change"],
             t["inside"]["p_value"], t["after"]["mean_change"], t["after"]["p_value"]]
            for key, t in v.get("permutation", {}).items()
        ]  # fmt: skip
        header = ["quantity", "mean Δ before", "p (rise before)", "mean Δ inside",
                  "p (drop inside)", "mean Δ after", "p (rise after)"]  # fmt: skip
        lines.append("Placement (circular-shift) test, one-sided:\n")
        lines.append(markdown_table(header, rows, digits=3))
    if verdict["combined"]:
        lines.append(
            f"### Combined over the seeds that grokked ({verdict['draws']:,} Monte-Carlo draws)\n"
        )
        lines.append(
            "Statistic: the mean Δ of the segment divided by the seed's median |Δ| outside the "
            "jump window, averaged over seeds.\n"
        )
        rows = [
            [key, c["before"]["statistic"], c["before"]["p_value"], c["inside"]["statistic"],
             c["inside"]["p_value"], c["after"]["statistic"], c["after"]["p_value"],
             c["inside"]["n_seeds"]]
            for key, c in verdict["combined"].items()
        ]  # fmt: skip
        header = ["quantity", "before", "p (rise)", "inside", "p (drop)", "after", "p (rise)",
                  "seeds"]  # fmt: skip
        lines.append(markdown_table(header, rows, digits=3))
    return "\n".join(lines)


def write_outputs(
    config: GrokkingDynamicsConfig,
    runs: dict[int, list[dict[str, Any]]],
    verdict: dict[str, Any],
    out_dir: Path,
) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r for seed in runs for r in runs[seed]]
    files = {
        "checkpoints_csv": str(
            write_csv(
                out_dir / "checkpoints.csv",
                RECORD_COLUMNS,
                [[r.get(c) for c in RECORD_COLUMNS] for r in records],
            )
        ),
        "plot": str(
            plot_dynamics(
                runs, verdict, out_dir / "grokking_dynamics.png", config.lr, config.momentum
            )
        ),
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
    """Train (or load from the cache) one grokking run per seed, then write the CSV, plot,
    verdict and permutation tests.

    Each seed is cached on its own (key: every setting of ``config`` except ``seeds``, plus the
    seed), so an interrupted study resumes at the first seed it had not finished.

    Args:
        config: settings (default: the full ``p = 97`` study, three seeds).
        out_dir: output directory; ``cache_dir`` (default ``<out_dir>/cache``) holds the runs.
        num_threads: torch threads while the study runs (``None`` leaves them alone).
        progress: called with one line per checkpoint (``None`` for silence).
    """
    config = config or GrokkingDynamicsConfig()
    out = Path(out_dir)
    cache = RunCache(Path(cache_dir) if cache_dir is not None else out / "cache", prefix="grokking")
    runs: dict[int, list[dict[str, Any]]] = {}
    hits: dict[int, bool] = {}
    with torch_threads(num_threads):
        for seed in config.seeds:
            key = run_key(config, seed)
            partial = out / f"checkpoints-seed{seed}.partial.jsonl"

            def compute(seed: int = seed, partial: Path = partial) -> dict[str, Any]:
                out.mkdir(parents=True, exist_ok=True)
                partial.unlink(missing_ok=True)
                records = train_with_checkpoints(config, progress, partial, seed=seed)
                partial.unlink(missing_ok=True)
                return {"records": records}

            result, hits[seed] = cache.get_or_run(key, compute)
            runs[seed] = result["records"]
    verdict = study_verdict(runs, config)
    files = write_outputs(config, runs, verdict, out)
    records = [r for seed in config.seeds for r in runs[seed]]
    return GrokkingDynamicsResults(
        config, records, verdict, all(hits.values()), files, runs=runs, cached_seeds=hits
    )


def run_key(config: GrokkingDynamicsConfig, seed: int) -> dict[str, Any]:
    """The cache key of one seed's run: every setting except ``seeds``, and the seed."""
    settings = dataclasses.asdict(config)
    del settings["seeds"]
    return {"study": "grokking_dynamics", **settings, "seed": seed}
