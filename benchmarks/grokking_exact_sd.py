"""The estimator against the exact SD on the grokking-dynamics study's MLP.

Retrains one seed of ``sdopt study grokking`` (its default configuration: ``(a + b) mod 97``,
the 10,336-parameter ``GrokkingMLP``, full-batch SGD with momentum) to each requested epoch and
measures there, in float64 on the full training set:

- the exact SD from the dense Hessian (``method="exact"``, all 10,336 eigenvalues; about 600 s
  and 5 GB per epoch on one CPU thread), under the GD map and the heavy-ball map;
- the default estimator (``method="deflated"``), cold-started, at the library's defaults and at
  the cheap settings of the study's first 3 × 100 run (k = 3, 2 probes × 20 steps).

It prints one JSON line per epoch and setting, then a Markdown table: exact SD, each estimate
with its reported uncertainty and range, and whether the range holds the exact value. The
numbers in docs/results/grokking-dynamics.md ("Exact SD at four checkpoints") came from this
procedure.

Run:  python benchmarks/grokking_exact_sd.py --seed 0 --epochs 732 1263 2273
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import sdopt
from sdopt.studies import grokking_dynamics as gd
from sdopt.tasks.grokking import modular_arithmetic

SETTINGS = {
    "library defaults": {},
    "cheap (first 3 x 100 run)": {"k": 3, "tol": 1e-2, "num_probes": 2, "num_steps": 20},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, nargs="+", default=[732, 1263, 2273])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if any(e < 0 for e in args.epochs):
        parser.error(f"argument --epochs: invalid value {args.epochs!r} (must be >= 0)")
    torch.set_num_threads(args.threads)
    config = gd.GrokkingDynamicsConfig()
    data = modular_arithmetic(config.p, "add", config.train_fraction, seed=args.seed)
    model = gd._build_model(config, args.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    loss = torch.nn.functional.cross_entropy
    targets = sorted(set(args.epochs))
    rows = []
    for epoch in range(targets[-1] + 1):
        if epoch in targets:
            m64 = copy.deepcopy(model).to(torch.float64)
            start = time.perf_counter()
            exact = sdopt.estimate_sharpness_dimension(
                m64, loss, data.train, config.lr, method="exact", protocol="full-batch",
                max_dim=20_000,
            )  # fmt: skip
            heavy, _ = sdopt.sd_from_spectrum(
                exact.eigenvalues, config.lr, exponent_map="momentum", momentum=config.momentum
            )
            record = {
                "epoch": epoch, "setting": "exact", "sd": exact.value, "sd_momentum": heavy,
                "n_negative_any": int((exact.eigenvalues < 0).sum()),
                "lambda_max": exact.lambda_max, "seconds": time.perf_counter() - start,
            }  # fmt: skip
            print(json.dumps(record), flush=True)
            for name, options in SETTINGS.items():
                start = time.perf_counter()
                est = sdopt.estimate_sharpness_dimension(
                    m64, loss, data.train, config.lr, method="deflated", protocol="full-batch",
                    generator=torch.Generator().manual_seed(config.measure_seed), **options,
                )  # fmt: skip
                print(
                    json.dumps(
                        {
                            "epoch": epoch,
                            "setting": name,
                            "sd": est.value,
                            "uncertainty": est.uncertainty,
                            "low": est.low,
                            "high": est.high,
                            "products": est.num_products,
                            "seconds": time.perf_counter() - start,
                        }
                    ),
                    flush=True,
                )
                rows.append((epoch, exact.value, name, est))
            del exact, m64
        if epoch == targets[-1]:
            break
        opt.zero_grad(set_to_none=True)
        loss(model(data.train_inputs), data.train_targets).backward()
        opt.step()
    print("\n| epoch | exact SD | setting | estimate ± uncertainty | range | range holds exact |")
    print("|---|---|---|---|---|---|")
    for epoch, truth, name, est in rows:
        slack = 1e-9 * max(1.0, abs(truth))  # a dense-path estimate equals exact to round-off
        holds = est.low - slack <= truth <= est.high + slack
        print(
            f"| {epoch} | {truth:,.0f} | {name} | {est.value:,.1f} ± {est.uncertainty:.2g} | "
            f"{est.low:,.0f}–{est.high:,.0f} | {'yes' if holds else 'no'} |"
        )


if __name__ == "__main__":
    main()
