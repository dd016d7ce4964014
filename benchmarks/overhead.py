"""Training overhead of SDOptimizer: wall time of each mode over the bare base optimizer.

Two workloads, measured side by side in one process:

- ``transformer``: the grokking transformer (``sdopt.tasks.grokking``, (a + b) mod 97, 30 %
  train = 2,823 pairs, 222,592 parameters), full-batch AdamW (lr 1e-3, weight decay 1, betas
  0.9/0.98), float32, CPU; the curvature batch is the whole training batch (the most expensive
  choice); ``SDOptimizer`` at its own defaults (``every=DEFAULT_EVERY``, the estimator's ``k``).
- ``grok``: the default ``sdopt grok`` task exactly as the CLI builds it (its parsed default
  flags through ``sdopt.cli.config_from_args``, then ``sdopt.train``'s dataset, model and
  optimizer builders; since 2026-12-01 the paper's MLP on (a + b) mod 97 with full-batch SGD
  at its heavy-ball edge, before that AdamW on (a + b) mod 59), and ``SDOptimizer`` with the
  CLI's ``--k``, ``--every`` and exponent map on the whole training set, as
  :func:`sdopt.train.train` passes them. Only the optimizer steps are timed (``sdopt grok``
  also evaluates every 10 steps, which this leaves out, so the ratios here are upper bounds
  for the CLI's wall time).

All modes of a workload run from the same initialisation at the defaults above, except that
estimates are made every ``--window`` steps instead of every ``every`` steps, so that a warm
estimate falls inside a short timed window. Each step is timed on its own:

- step 0 (the cold first estimate: Lanczos from random vectors) is reported apart;
- steps 1..window are timed; the last one carries a warm-started estimate.

Printed for each mode:

- ``window``: measured wall time of the window over ``window`` base steps;
- ``every=E``: the per-step costs amortised over the default schedule (one warm estimate per
  ``E`` steps, a penalty recomputation per ``penalty_every`` steps), relative to the mode's
  own plain steps (those without estimate or recomputation, which do the base step's work), so
  that load drifting between the runs of a shared machine cancels:
  ``1 + ((E/P)·(t_recompute − t_plain) + t_estimate) / (E·t_plain)``;
- ``run``: (``grok`` only) the same over the CLI's default run of ``--steps`` steps, which
  pays the cold estimate once and a warm one at every later multiple of ``E``; ``1 est/run``:
  the same with only the cold estimate at step 0 (any ``every >= steps``), the least
  overhead a change of ``every`` alone can give that run;
- products cold / warm, seconds of the warm estimate, and ``steps/est``: the number of plain
  training steps one warm estimate costs (``t_estimate / t_plain``);
- ``E for target``: the smallest ``every`` whose amortised ratio meets the mode's target
  (monitor ≤ 1.10, lr ≤ 1.15, penalty ≤ 2), from the warm and (in brackets) the cold cost.

A second table splits each estimate into its parts (top-``k`` Lanczos, bottom-``k_bottom``
Lanczos, SLQ of the deflated bulk): products and seconds of each, timed by wrapping the
solvers of :mod:`sdopt.spectrum` in this process.

The warm start here is from eigenvectors ``window`` steps old, which flatters it compared with
``every`` steps (hundreds to thousands): the cold cost bounds what a warm start can cost.

Usage::

    python benchmarks/overhead.py                   # --window 24 --repeats 1, both workloads
    python benchmarks/overhead.py --window 24 --repeats 2 --threads 1
    python benchmarks/overhead.py --workloads grok --every 2000
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

import sdopt.spectrum
from sdopt.cli import build_parser, config_from_args
from sdopt.optim import DEFAULT_EVERY, SDOptimizer
from sdopt.train import DTYPES, TrainConfig, build_model, build_optimizer, make_dataset

MODES = ("base", "monitor", "lr", "penalty")
TARGETS = {"monitor": 1.10, "lr": 1.15, "penalty": 2.0}


@dataclass
class Workload:
    name: str
    title: str
    config: TrainConfig
    sd_kwargs: dict[str, Any]  # SDOptimizer keywords other than mode / every
    every: int  # the default schedule
    steps: int | None  # length of the default run (None: open-ended)
    data: Any = None
    init_state: dict[str, torch.Tensor] = field(default_factory=dict)


def transformer_workload() -> Workload:
    # TrainConfig's defaults are this workload: (a + b) mod 97, 30 % train, the transformer,
    # full-batch AdamW lr 1e-3, weight decay 1, betas 0.9/0.98
    config = TrainConfig()
    return Workload("transformer", "grokking transformer", config, {}, DEFAULT_EVERY, None)


def grok_workload() -> Workload:
    config = config_from_args(build_parser().parse_args(["grok"]))
    # what sdopt.train.train passes to SDOptimizer
    sd_kwargs = {"k": config.sd_k, "seed": config.seed, **config.sd_options}
    return Workload(
        "grok", "`sdopt grok` default task", config, sd_kwargs, config.sd_every, config.steps
    )


WORKLOADS = {"transformer": transformer_workload, "grok": grok_workload}


def build(w: Workload) -> torch.nn.Module:
    """The model as :func:`sdopt.train.train` builds it (same seed, same initialisation)."""
    c = w.config
    torch.manual_seed(c.seed)
    return build_model(c.model, c.p, **c.model_kwargs).to(DTYPES[c.dtype])


class Parts:
    """Wraps the solvers the estimator calls; records (step, part, products, seconds)."""

    def __init__(self) -> None:
        self.step = -1
        self.rows: dict[int, dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(lambda: [0.0, 0.0])
        )
        self._orig = {}
        for name in ("top_eigenpairs", "stochastic_lanczos_quadrature"):
            fn = getattr(sdopt.spectrum, name)
            self._orig[name] = fn
            setattr(sdopt.spectrum, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if name == "stochastic_lanczos_quadrature":
                part = "slq"
            else:
                part = "bottom" if kwargs.get("which", "LA") == "SA" else "top"
            row = self.rows[self.step][part]
            row[0] += float(getattr(out, "num_products", 0))
            row[1] += time.perf_counter() - start
            return out

        return wrapper

    def reset(self) -> None:
        self.rows.clear()


PARTS: Parts | None = None


def run(mode: str, w: Workload, window: int) -> tuple[float, list[float], Any, dict]:
    """``(seconds of step 0, seconds of each of steps 1..window, SDOptimizer or None, parts)``."""
    model = build(w)
    model.load_state_dict(w.init_state)
    base, grokfast = build_optimizer(w.config, model)
    assert grokfast is None
    opt: torch.optim.Optimizer = base
    sd = None
    if mode != "base":
        sd = SDOptimizer(
            base,
            model=model,
            loss_fn=F.cross_entropy,
            data=w.data,
            mode=mode,
            every=window,
            **w.sd_kwargs,
        )
        opt = sd
    x, y = w.data
    times = []
    PARTS.reset()
    for t in range(window + 1):
        PARTS.step = t
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    parts = {t: {k: tuple(v) for k, v in row.items()} for t, row in PARTS.rows.items()}
    return times[0], times[1:], sd, parts


def every_for(target: float, steps_per_est: float, per_step: float) -> float:
    """Smallest E with ``1 + per_step + steps_per_est / E <= target`` (inf if none)."""
    room = target - 1.0 - per_step
    if room <= 0:
        return math.inf
    return max(1, math.ceil(steps_per_est / room))


def fmt_e(e: float) -> str:
    return "never" if math.isinf(e) else f"{int(e):,}"


def report(w: Workload, res: dict[str, Any], args: argparse.Namespace) -> None:
    W = args.window
    E = args.every if args.every else w.every
    steps, colds, stats, parts = res["steps"], res["colds"], res["stats"], res["parts"]
    t_base = statistics.median(t for rep in steps["base"] for t in rep)
    window_base = statistics.median(sum(rep) for rep in steps["base"])
    n_params = sum(p.numel() for p in build(w).parameters())
    c = w.config
    print(
        f"\n== {w.name}: {w.title} ({c.model}, {n_params:,} params), (a {c.operation} b) mod "
        f"{c.p}, {len(w.data[1]):,} train pairs, full batch, {c.optimizer} lr {c.lr:g}; "
        f"window {W} steps x {args.repeats} repeats; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; base step {1000 * t_base:.1f} ms"
    )
    run_col = f"run {w.steps}" if w.steps else ""
    head = f"{'mode':<9}{'window':>9}{f'every={E}':>12}"
    head += f"{run_col:>11}{'1 est/run':>11}" if w.steps else ""
    head += f"{'plain ms':>10}{'cold s':>8}{'warm s':>8}{'prods cold/warm':>17}{'steps/est':>11}"
    head += f"{'recomp s':>10}{'E for target (cold)':>22}{'SD':>9}{'λmax':>9}"
    print(head)
    for mode in MODES:
        reps = steps[mode]
        window_ratio = statistics.median(sum(rep) for rep in reps) / window_base
        row = f"{mode:<9}{window_ratio:>8.3f}x"
        sd = stats[mode]
        if sd is None:
            print(row + f"{1.0:>11.3f}x" + (f"{1.0:>10.3f}x{1.0:>10.3f}x" if w.steps else ""))
            continue
        P = sd.penalty_every
        last = [rep[-1] for rep in reps]  # step W: warm estimate
        recompute = [rep[i - 1] for rep in reps for i in range(1, W) if i % P == 0]
        plain = [rep[i - 1] for rep in reps for i in range(1, W) if mode != "penalty" or i % P]
        t_plain = statistics.median(plain)
        t_est = statistics.median(last) - t_plain
        t_cold = statistics.median(colds[mode]) - t_plain
        per_step = 0.0  # penalty: extra per step from the recomputations
        if mode == "penalty" and recompute:
            per_step = (statistics.median(recompute) - t_plain) / (P * t_plain)
        amortised = 1.0 + per_step + t_est / (E * t_plain)
        row += f"{amortised:>11.3f}x"
        if w.steps:
            n_est = math.ceil(w.steps / E)
            over = per_step * w.steps * t_plain + t_cold + (n_est - 1) * t_est
            row += f"{1.0 + over / (w.steps * t_plain):>10.3f}x"
            floor = 1.0 + per_step + t_cold / (w.steps * t_plain)  # any every >= steps
            row += f"{floor:>10.3f}x"
        ok = [r for r in sd.history if r.ok]
        prods = f"{ok[0].num_products}/{ok[-1].num_products}" if len(ok) > 1 else "-"
        rec_s = f"{statistics.median(recompute):.2f}" if mode == "penalty" and recompute else "-"
        e_warm = every_for(TARGETS[mode], t_est / t_plain, per_step)
        e_cold = every_for(TARGETS[mode], t_cold / t_plain, per_step)
        row += f"{1000 * t_plain:>10.1f}{t_cold:>8.2f}{t_est:>8.2f}{prods:>17}"
        row += f"{t_est / t_plain:>11.0f}{rec_s:>10}"
        row += f"{f'{fmt_e(e_warm)} ({fmt_e(e_cold)})':>22}"
        if ok:
            row += f"{ok[-1].sharpness_dimension:>9.1f}{ok[-1].lambda_max:>9.3f}"
        print(row)
    # where an estimate's cost goes (last repeat; step 0 = cold, step W = warm)
    print(f"{'parts':<9}{'step':>6}{'top prods/s':>16}{'bottom prods/s':>17}{'SLQ prods/s':>16}")
    for mode in MODES[1:]:
        for t, label in ((0, "cold"), (W, "warm")):
            row = parts[mode].get(t, {})
            cells = ""
            for part in ("top", "bottom", "slq"):
                n, s = row.get(part, (0.0, 0.0))
                cells += (
                    f"{f'{n:.0f} / {s:.2f}':>16}"
                    if part != "bottom"
                    else f"{f'{n:.0f} / {s:.2f}':>17}"
                )
            print(f"{mode:<9}{label:>6}{cells}")
    mon = stats["monitor"]
    from sdopt.dimension.estimators import DEFAULTS

    print(
        f"settings: every={E}, k={mon.k}, k_bottom={DEFAULTS['k_bottom']}, "
        f"probes x steps={DEFAULTS['num_probes']}x{DEFAULTS['num_steps']}, tol={mon.tol}, "
        f"penalty_every={mon.penalty_every}, exponent_map={mon.exponent_map!r}, "
        f"estimator={mon.estimator!r}; targets "
        + ", ".join(f"{m} <= {t:g}" for m, t in TARGETS.items())
    )


def main() -> None:
    global PARTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument(
        "--every",
        type=int,
        default=None,
        help="schedule to amortise over (default: each workload's default schedule)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    PARTS = Parts()
    start = time.perf_counter()

    workloads = []
    for name in args.workloads:
        w = WORKLOADS[name]()
        c = w.config
        w.data = make_dataset(c.p, c.operation, c.train_fraction, seed=c.seed).train
        w.init_state = {k: v.clone() for k, v in build(w).state_dict().items()}
        run("base", w, 2)  # warm-up (allocator, kernels)
        workloads.append(w)

    results = {
        w.name: {
            "steps": {m: [] for m in MODES},
            "colds": {m: [] for m in MODES},
            "stats": {},
            "parts": {},
        }
        for w in workloads
    }
    for _ in range(args.repeats):
        for w in workloads:  # interleaved, so that drifting load hits both workloads alike
            res = results[w.name]
            for mode in MODES:
                cold, times, sd, parts = run(mode, w, args.window)
                res["steps"][mode].append(times)
                res["colds"][mode].append(cold)
                res["stats"][mode] = sd
                res["parts"][mode] = parts
                print(
                    f"  {w.name} {mode}: {sum(times):.1f} s for {args.window} steps "
                    f"(+{cold:.1f} s step 0)",
                    flush=True,
                )
    for w in workloads:
        report(w, results[w.name], args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
