"""Steps and wall time to 95 % validation accuracy on the default grokking task, per method.

Methods (all on the task and model of ``sdopt grok``: (a + b) mod 59, half of the pairs for
training, GELU MLP of width 256, full batch, AdamW lr 3e-3, weight decay 1):

- ``adamw``: the plain base optimizer.
- ``grokfast``: AdamW with the Grokfast EMA filter (α = 0.98, λ = 2; Lee et al., 2024).
- ``sd-lr``: ``SDOptimizer(mode="lr")`` with the first release's controller settings (target
  SD 0, scale ≤ 1), kept explicit; today's default rides the edge instead.
- ``sd-lr-up``: ``mode="lr"`` allowed to raise the LR up to 4× while the predicted SD stays 0.
- ``adamw-4x``: AdamW at 4× the LR (the control for ``sd-lr-up``).
- ``sd-penalty``: ``SDOptimizer(mode="penalty")`` with its default strength.
- ``sd-lr-adam-up``: ``mode="lr"`` on Adam's preconditioned map (``exponent_map="adam"``, edge
  ``2(1 + β₁)/((1 − β₁)η)``), allowed to raise the LR up to 16× while its predicted SD stays 0.
- ``adamw-16x``: AdamW at 16× the LR (the control for ``sd-lr-adam-up``).

Every run stops once validation accuracy reaches ``--stop-at`` (0.99 by default: equal final
accuracy) or after ``--steps``. The table gives the median over seeds of steps and seconds to
95 % validation accuracy (a run that never got there counts as infinitely slow), how many seeds
grokked, the median final validation accuracy and the ratio of AdamW's median steps to each
method's.

    python benchmarks/grokking.py                  # 3 seeds, all methods (~20-40 min on 2 cores)
    python benchmarks/grokking.py --seeds 0 --methods adamw sd-lr --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from sdopt.train import TrainConfig, train

BASE = {
    "p": 59,
    "operation": "add",
    "train_fraction": 0.5,
    "model": "mlp",
    "model_kwargs": {"width": 256},
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 1.0,
    "eval_every": 10,
    "progress": False,
    "plot": False,
    "threads": 1,
}

METHODS = {
    "adamw": {},
    "grokfast": {"optimizer": "grokfast-adamw"},
    "sd-lr": {"sd_mode": "lr", "sd_options": {"controller": {"target_sd": 0.0, "max_scale": 1.0}}},
    "sd-lr-up": {
        "sd_mode": "lr",
        "sd_options": {"controller": {"target_sd": 0.0, "max_scale": 4.0}},
    },
    "adamw-4x": {"lr": 1.2e-2},
    "sd-penalty": {"sd_mode": "penalty"},
    "sd-lr-adam-up": {
        "sd_mode": "lr",
        "sd_options": {
            "exponent_map": "adam",
            "controller": {"target_sd": 0.0, "max_scale": 16.0},
        },
    },
    "adamw-16x": {"lr": 4.8e-2},
}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--stop-at", type=float, default=0.99)
    parser.add_argument("--every", type=int, default=50, help="steps between SD estimates")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", default="runs/benchmark_grokking.json")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            overrides = dict(METHODS[method])
            config = TrainConfig(
                **(BASE | overrides),
                steps=args.steps,
                seed=seed,
                sd_every=args.every,
                sd_k=args.k,
                stop_at_val_accuracy=args.stop_at,
            )
            start = time.perf_counter()
            s = train(config).summary
            row = {
                "seed": seed,
                "steps_to_95": s["steps_to_95_val_accuracy"],
                "seconds_to_95": s["seconds_to_95_val_accuracy"],
                "final_val_accuracy": s["final_val_accuracy"],
                "steps": s["steps"],
                "seconds": time.perf_counter() - start,
                "final_lr_scale": s["final_lr_scale"],
            }
            results.setdefault(method, []).append(row)
            print(method, json.dumps(row), flush=True)

    inf = math.inf
    table = {}
    for method, rows in results.items():
        table[method] = {
            "steps": _median([inf if r["steps_to_95"] is None else r["steps_to_95"] for r in rows]),
            "seconds": _median(
                [inf if r["seconds_to_95"] is None else r["seconds_to_95"] for r in rows]
            ),
            "grokked": sum(r["steps_to_95"] is not None for r in rows),
            "final": _median([r["final_val_accuracy"] for r in rows]),
            "scale": _median([r["final_lr_scale"] for r in rows]),
            "n": len(rows),
        }
    ref = table.get("adamw", {}).get("steps", math.nan)
    print()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), seeds {args.seeds}, budget {args.steps} steps, "
        f"stop at val ≥ {args.stop_at}, SD every {args.every} steps, k = {args.k}"
    )
    print()
    print(
        "| method | grokked | median steps to 95 % val | median seconds to 95 % val | AdamW steps / method steps | median final val acc | median final LR scale |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, t in table.items():
        ratio = ref / t["steps"] if math.isfinite(t["steps"]) and t["steps"] > 0 else math.nan
        steps = "—" if not math.isfinite(t["steps"]) else f"{t['steps']:.0f}"
        secs = "—" if not math.isfinite(t["seconds"]) else f"{t['seconds']:.1f}"
        print(
            f"| {method} | {t['grokked']}/{t['n']} | {steps} | {secs} | {ratio:.2f} | {t['final']:.4f} | {t['scale']:.3g} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
