"""Training overhead of SDOptimizer: wall time of each mode over the bare base optimizer.

Workload: the grokking transformer (``sdopt.tasks.grokking``, (a + b) mod 97, 30 % train =
2,823 pairs, 222,592 parameters), full-batch AdamW (lr 1e-3, weight decay 1, betas 0.9/0.98),
float32, CPU; the curvature batch is the whole training batch (the most expensive choice).

All modes run side by side in one process, from the same initialisation, at SDOptimizer's
default settings (``k``, ``tol``, trace probes, ``penalty_every``) except that estimates are
made every ``--window`` steps instead of every ``every`` (default 200) steps, so that a warm
estimate falls inside a short timed window. Each step is timed on its own:

- step 0 (the cold first estimate: Lanczos from a random vector) is reported apart;
- steps 1..window are timed; the last one carries a warm-started estimate.

Two ratios to the bare AdamW step are printed for each mode:

- ``window``: measured wall time of the window over ``window`` base steps;
- ``every=E``: the same per-step costs amortised over the default schedule (one warm estimate
  per ``E`` steps, a penalty recomputation per ``penalty_every`` steps), relative to the
  mode's own plain steps (those without estimate or recomputation, which do the base step's
  work), so that load drifting between the runs of a shared machine cancels:
  ``1 + ((E/P)·(t_recompute − t_plain) + t_estimate) / (E·t_plain)``.

The warm start here is from eigenvectors ``window`` steps old, which flatters it compared with
``every`` steps; the product counts of the warm estimate are printed so this can be judged.

Usage::

    python benchmarks/overhead.py                   # --window 24 --repeats 1
    python benchmarks/overhead.py --window 24 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.nn import functional as F

from sdopt.optim import DEFAULT_EVERY, SDOptimizer
from sdopt.tasks.grokking import GrokkingTransformer, modular_arithmetic

MODES = ("base", "monitor", "lr", "penalty")


def run(mode: str, window: int, data, init_state) -> tuple[float, list[float], Any]:
    """``(seconds of step 0, seconds of each of steps 1..window, SDOptimizer or None)``."""
    model = GrokkingTransformer()
    model.load_state_dict(init_state)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    opt: torch.optim.Optimizer = base
    sd = None
    if mode != "base":
        sd = SDOptimizer(
            base, model=model, loss_fn=F.cross_entropy, data=data, mode=mode, every=window
        )
        opt = sd
    x, y = data
    times = []
    for _ in range(window + 1):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[0], times[1:], sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument(
        "--every", type=int, default=DEFAULT_EVERY, help="schedule to amortise over"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = modular_arithmetic(97, "add", 0.3, seed=0)
    data = task.train
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in GrokkingTransformer().state_dict().items()}
    run("base", 2, data, init_state)  # warm-up (allocator, kernels)

    steps: dict[str, list[list[float]]] = {m: [] for m in MODES}
    colds: dict[str, list[float]] = {m: [] for m in MODES}
    stats: dict[str, Any] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            cold, times, sd = run(mode, args.window, data, init_state)
            steps[mode].append(times)
            colds[mode].append(cold)
            stats[mode] = sd
            print(
                f"  {mode}: {sum(times):.1f} s for {args.window} steps (+{cold:.1f} s step 0)",
                flush=True,
            )

    W, E = args.window, args.every
    t_base = statistics.median(t for rep in steps["base"] for t in rep)
    window_base = statistics.median(sum(rep) for rep in steps["base"])
    print(
        f"\ngrokking transformer (222,592 params), {len(data[1])} train pairs, full batch, AdamW; "
        f"window {W} steps x {args.repeats} repeats; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; base step {1000 * t_base:.0f} ms"
    )
    print(
        f"{'mode':<9}{'window':>9}{f'every={E}':>11}{'plain ms':>10}{'step 0 s':>10}{'est. s':>8}"
        f"{'HVPs cold/warm':>16}{'recompute s':>13}{'SD':>7}{'λmax':>8}"
    )
    for mode in MODES:
        reps = steps[mode]
        window_ratio = statistics.median(sum(rep) for rep in reps) / window_base
        row = f"{mode:<9}{window_ratio:>8.3f}x"
        sd = stats[mode]
        if sd is None:
            print(
                row + f"{1.0:>10.3f}x{1000 * t_base:>10.0f}{statistics.median(colds[mode]):>10.1f}"
            )
            continue
        P = sd.penalty_every
        last = [rep[-1] for rep in reps]  # step W: warm estimate
        recompute = [rep[i - 1] for rep in reps for i in range(1, W) if i % P == 0]
        plain = [rep[i - 1] for rep in reps for i in range(1, W) if mode != "penalty" or i % P]
        t_plain = statistics.median(plain)
        t_est = statistics.median(last) - t_plain
        extra = 0.0
        if mode == "penalty" and recompute:
            extra = (E / P) * (statistics.median(recompute) - t_plain)
        amortised = 1.0 + (extra + t_est) / (E * t_plain)
        ok = [r for r in sd.history if r.ok]
        prods = f"{ok[0].num_products}/{ok[-1].num_products}" if len(ok) > 1 else "-"
        rec_s = f"{statistics.median(recompute):.2f}" if mode == "penalty" and recompute else "-"
        row += f"{amortised:>10.3f}x{1000 * t_plain:>10.0f}"
        row += f"{statistics.median(colds[mode]):>10.1f}{t_est:>8.1f}"
        row += f"{prods:>16}{rec_s:>13}"
        if ok:
            row += f"{ok[-1].sharpness_dimension:>7.1f}{ok[-1].lambda_max:>8.3f}"
        print(row)
    mon = stats["monitor"]
    print(
        f"defaults: every={E}, k={mon.k}, tol={mon.tol}, penalty_every={mon.penalty_every}, "
        f"exponent_map={mon.exponent_map!r}, estimator={mon.estimator!r}"
    )


if __name__ == "__main__":
    main()
