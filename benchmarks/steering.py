"""What steering by the sharpness dimension does at the edge of stability.

The paper's grokking setup at CPU scale (the same as ``sdopt study grokking``): (a + b) mod 97,
40 % of the pairs for training, a bias-free 3-layer GELU MLP of width 32 with its initial weights
scaled by 3, full-batch SGD with lr 1, momentum 0.9 and weight decay 5e-4, 2,500 epochs. In this
run λ_max climbs past 2/η while the network memorises (η·λ_max ≈ 2.6), so the paper's GD map
has expanding directions and the sharpness dimension is positive: steering has something to act
on — unlike the AdamW task of ``benchmarks/grokking.py``, which stays far below every edge.

Methods (one ``SDOptimizer`` per run, an estimate every ``--every`` epochs on the whole
training set, k = 3, the paper's GD exponent map):

- ``sgd``: the bare base optimizer (``monitor`` is identical bit for bit, tested elsewhere);
- ``monitor``: the same run, measured (SD, η·λ_max);
- ``lr``: ``mode="lr"``, target SD 0, scale ≤ 1 (it lowers the LR while the predicted SD > 0;
  since issue 10 a target no scale meets falls back to the edge scale);
- ``penalty``: ``mode="penalty"`` at its default strength 1e-3, and ``penalty-1e-2`` at 10×.

Printed per method: median over seeds of the epoch at which test accuracy first reached 95 %
(checked every 10 epochs), final train and test accuracy, the largest η·λ_max and the mean SD
over the estimates, and the smallest LR scale.

    python benchmarks/steering.py                      # 3 seeds, all methods (~15 min, 1 core)
    python benchmarks/steering.py --seeds 0 --methods sgd lr
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch.nn import functional as F

import sdopt
from sdopt.tasks.grokking import GrokkingMLP, modular_arithmetic

METHODS = {
    "sgd": None,
    "monitor": {"mode": "monitor"},
    # the first release's controller settings, kept explicit (the default now rides the edge)
    "lr": {"mode": "lr", "controller": {"target_sd": 0.0, "max_scale": 1.0}},
    "penalty": {"mode": "penalty", "penalty_strength": 1e-3},
    "penalty-1e-2": {"mode": "penalty", "penalty_strength": 1e-2},
}


def run(method: str, seed: int, epochs: int, every: int) -> dict:
    data = modular_arithmetic(97, "add", 0.4, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GrokkingMLP(97, 32, 3, bias=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=5e-4)
    (x, y), (x_val, y_val) = data.train, data.val
    opt: torch.optim.Optimizer = base
    if METHODS[method] is not None:
        opt = sdopt.SDOptimizer(
            base, model=model, loss_fn=F.cross_entropy, data=(x, y), every=every, k=3,
            seed=seed, **METHODS[method],
        )  # fmt: skip
    start = time.perf_counter()
    grokked = None
    for epoch in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if grokked is None and epoch % 10 == 0:
            with torch.no_grad():
                if (model(x_val).argmax(1) == y_val).float().mean() >= 0.95:
                    grokked = epoch
    with torch.no_grad():
        val = (model(x_val).argmax(1) == y_val).float().mean().item()
        train = (model(x).argmax(1) == y).float().mean().item()
    records = [r for r in getattr(opt, "history", []) if r.ok]
    return {
        "method": method,
        "seed": seed,
        "epoch_95": grokked,
        "val_accuracy": val,
        "train_accuracy": train,
        "seconds": time.perf_counter() - start,
        "max_lr_lambda": max((r.lr * r.lambda_max for r in records), default=None),
        "mean_sd": statistics.mean(r.sharpness_dimension for r in records) if records else None,
        "min_scale": min((r.lr_scale for r in records), default=None),
        "estimates": len(records),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2500)
    parser.add_argument("--every", type=int, default=25, help="epochs between SD estimates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write every run here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for seed in args.seeds:
        for method in args.methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                row = run(method, seed, args.epochs, args.every)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=2)

    print()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), seeds {args.seeds}, "
        f"{args.epochs} epochs, SD every {args.every} epochs, k = 3, GD map"
    )
    print()
    print(
        "| method | epoch of 95 % test acc (per seed) | median | final test acc (median) | "
        "max η·λ_max (median) | mean SD (median) | min LR scale (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    inf = float("inf")
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        epochs = [inf if r["epoch_95"] is None else r["epoch_95"] for r in mine]

        def med(key: str, runs: list = mine) -> float | None:
            values = [r[key] for r in runs if r[key] is not None]
            return statistics.median(values) if values else None

        per_seed = ", ".join("—" if e == inf else str(e) for e in epochs)
        median = statistics.median(epochs)
        print(
            f"| `{method}` | {per_seed} | {'—' if median == inf else f'{median:.0f}'} | "
            f"{_fmt(med('val_accuracy'), '.4f')} | {_fmt(med('max_lr_lambda'), '.2f')} | "
            f"{_fmt(med('mean_sd'), '.2f')} | {_fmt(med('min_scale'), '.2f')} |"
        )


if __name__ == "__main__":
    main()
