"""Training overhead of SDOptimizer: wall time of each mode over the bare base optimizer.

Workload: the grokking transformer (``sdopt.tasks.grokking``, (a + b) mod 97, 30 % train,
222,592 parameters), full-batch AdamW (lr 1e-3, weight decay 1, betas 0.9/0.98), float32, CPU.
Every mode trains the same model from the same initialisation for ``--steps`` steps at
SDOptimizer's default settings (``every``, ``k``, penalty schedule) and the curvature batch is
the training batch. Runs are interleaved (base, monitor, lr, penalty, base, ...) and repeated;
the ratio of each mode's median time to the base's median time is printed side by side, with
sdopt's own accounting (estimates, products, overhead fraction).

Usage::

    python benchmarks/overhead.py                 # defaults: --steps 400 --repeats 3
    python benchmarks/overhead.py --steps 200 --repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from sdopt.optim import DEFAULT_EVERY, DEFAULT_K, SDOptimizer
from sdopt.tasks.grokking import GrokkingTransformer, modular_arithmetic

MODES = ("base", "monitor", "lr", "penalty")


def run(mode: str, steps: int, data, init_state, sd_kwargs) -> tuple[float, SDOptimizer | None]:
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
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start, sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
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
    modes = [m for m in args.modes.split(",") if m]
    if "base" not in modes:
        modes.insert(0, "base")

    task = modular_arithmetic(97, "add", 0.3, seed=0)
    data = task.train
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in GrokkingTransformer().state_dict().items()}
    run("base", 5, data, init_state, sd_kwargs)  # warm-up (allocator, kernels)

    times: dict[str, list[float]] = {m: [] for m in modes}
    stats: dict[str, SDOptimizer | None] = {}
    for _ in range(args.repeats):
        for mode in modes:
            seconds, sd = run(mode, args.steps, data, init_state, sd_kwargs)
            times[mode].append(seconds)
            stats[mode] = sd

    base = statistics.median(times["base"])
    print(
        f"grokking transformer (222,592 params), {len(data[1])} train pairs, full batch, AdamW; "
        f"{args.steps} steps x {args.repeats} repeats, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'mode':<9}{'median s':>10}{'ms/step':>10}{'ratio':>8}{'estimates':>11}"
        f"{'HVPs/est':>10}{'s/est':>8}{'SD':>11}{'λmax':>10}"
    )
    for mode in modes:
        med = statistics.median(times[mode])
        row = f"{mode:<9}{med:>10.2f}{1000 * med / args.steps:>10.1f}{med / base:>7.3f}x"
        sd = stats[mode]
        if sd is not None:
            ok = [r for r in sd.history if r.ok]
            prods = statistics.mean(r.num_products for r in ok) if ok else float("nan")
            secs = statistics.mean(r.seconds for r in ok) if ok else float("nan")
            last = ok[-1] if ok else None
            row += f"{len(sd.history):>11}{prods:>10.1f}{secs:>8.2f}"
            if last is not None:
                row += f"{last.sharpness_dimension:>11.1f}{last.lambda_max:>10.3g}"
        print(row)
    print(
        f"settings: every={stats['monitor'].every if stats.get('monitor') else sd_kwargs}, "
        f"k={stats['monitor'].k if stats.get('monitor') else ''}"
    )


if __name__ == "__main__":
    main()
