"""Training overhead of SDOptimizer: wall time of each mode over the bare base optimizer.

Workload: the grokking transformer (``sdopt.tasks.grokking``, (a + b) mod 97, 30 % train =
2,822 pairs, 222,592 parameters), full-batch AdamW (lr 1e-3, weight decay 1, betas 0.9/0.98),
float32, CPU; the curvature batch is the whole training batch. Every mode trains the same model
from the same initialisation at SDOptimizer's default settings (``every``, ``k``, ``tol``,
trace probes, penalty schedule).

Steady state is timed: step 0 (the cold first estimate, Lanczos from a random start) runs
untimed, then ``--steps`` steps are timed (default: ``every`` steps, which contain exactly one
warm-started estimate, and ``every / penalty_every`` penalty recomputations). Runs are
interleaved (base, monitor, lr, penalty, base, ...) and repeated; the ratio of each mode's
median time to the base's median is printed side by side, with sdopt's own accounting. The
cold first estimate is reported separately: it is paid once per run.

Usage::

    python benchmarks/overhead.py                   # defaults: --steps every, --repeats 1
    python benchmarks/overhead.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.nn import functional as F

from sdopt.optim import DEFAULT_EVERY, DEFAULT_K, SDOptimizer
from sdopt.tasks.grokking import GrokkingTransformer, modular_arithmetic

MODES = ("base", "monitor", "lr", "penalty")


def run(mode: str, steps: int, data, init_state, sd_kwargs) -> tuple[float, float, Any]:
    """``(cold seconds of step 0, seconds of the next `steps` steps, SDOptimizer or None)``."""
    model = GrokkingTransformer()
    model.load_state_dict(init_state)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    opt: torch.optim.Optimizer = base
    sd = None
    if mode != "base":
        sd = SDOptimizer(
            base, model=model, loss_fn=F.cross_entropy, data=data, mode=mode, **sd_kwargs
        )
        opt = sd
    x, y = data

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    start = time.perf_counter()
    step()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return cold, time.perf_counter() - start, sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: every)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--every", type=int, default=None, help=f"default {DEFAULT_EVERY}")
    parser.add_argument("--k", type=int, default=None, help=f"default {DEFAULT_K}")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sd_kwargs = {}
    if args.every is not None:
        sd_kwargs["every"] = args.every
    if args.k is not None:
        sd_kwargs["k"] = args.k
    steps = args.steps if args.steps is not None else sd_kwargs.get("every", DEFAULT_EVERY)
    modes = [m for m in args.modes.split(",") if m]
    if "base" not in modes:
        modes.insert(0, "base")

    task = modular_arithmetic(97, "add", 0.3, seed=0)
    data = task.train
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in GrokkingTransformer().state_dict().items()}
    run("base", 3, data, init_state, sd_kwargs)  # warm-up (allocator, kernels)

    times: dict[str, list[float]] = {m: [] for m in modes}
    colds: dict[str, list[float]] = {m: [] for m in modes}
    stats: dict[str, Any] = {}
    for _ in range(args.repeats):
        for mode in modes:
            cold, seconds, sd = run(mode, steps, data, init_state, sd_kwargs)
            times[mode].append(seconds)
            colds[mode].append(cold)
            stats[mode] = sd
            print(f"  {mode}: {seconds:.1f} s for {steps} steps (+{cold:.1f} s step 0)", flush=True)

    base = statistics.median(times["base"])
    print(
        f"grokking transformer (222,592 params), {len(data[1])} train pairs, full batch, AdamW; "
        f"{steps} timed steps x {args.repeats} repeats, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'mode':<9}{'median s':>10}{'ms/step':>9}{'ratio':>8}{'step 0 s':>10}"
        f"{'HVPs cold/warm':>16}{'s warm':>8}{'SD':>8}{'λmax':>9}{'penalty':>9}"
    )
    for mode in modes:
        med = statistics.median(times[mode])
        row = f"{mode:<9}{med:>10.1f}{1000 * med / steps:>9.0f}{med / base:>7.3f}x"
        row += f"{statistics.median(colds[mode]):>10.1f}"
        sd = stats[mode]
        if sd is not None:
            ok = [r for r in sd.history if r.ok]
            if ok:
                last = ok[-1]
                prods = f"{ok[0].num_products}/{last.num_products if len(ok) > 1 else '-'}"
                row += f"{prods:>16}{last.seconds:>8.1f}{last.sharpness_dimension:>8.1f}"
                row += f"{last.lambda_max:>9.3g}{last.penalty:>9.3g}"
        print(row)
    mon = stats.get("monitor")
    if mon is not None:
        print(
            f"settings: every={mon.every}, k={mon.k}, tol={mon.tol}, "
            f"penalty_every={mon.penalty_every}, exponent_map={mon.exponent_map!r}"
        )


if __name__ == "__main__":
    main()
