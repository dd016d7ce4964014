"""Accuracy and cost of the sharpness-dimension estimators against the exact value.

The paper's MLP shape (Tuci et al., arXiv:2604.19740: 3 layers, width 16, ReLU, no bias) on
scikit-learn's bundled digits (64 inputs -> 16 -> 16 -> 10: 1,440 parameters), trained briefly
with SGD; then the sharpness dimension under the paper's minibatch protocol (``--batches``
minibatch Hessians of the training batch size at the final weights) by every method.
The exact method is charged ``d`` Hessian-vector products per minibatch Hessian.

Run:  python benchmarks/sd_estimators.py [--epochs 30 --lr 0.5 --batch-size 32 --batches 8]
Prints one Markdown table: value (mean and spread over ``--repeats`` seeds for the stochastic
methods), mean relative error of SD, mean error of the co-dimension d − SD (what actually varies,
THEORY.md §7), products and their share of the exact cost, seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sdopt.dimension import estimate_sharpness_dimension


def digits_mlp(epochs: int, lr: float, batch_size: int, seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            'this benchmark needs scikit-learn: pip install "sdopt[science]"'
        ) from exc
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    train = perm[:1400]  # fixed split: 1,400 train, 397 test
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 16, bias=False), nn.ReLU(),
        nn.Linear(16, 16, bias=False), nn.ReLU(),
        nn.Linear(16, 10, bias=False),
    ).double()  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    order = train[torch.randperm(len(train), generator=g)]
    return model, loss_fn, x, y, order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="seeds per stochastic method")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, loss_fn, x, y, order = digits_mlp(args.epochs, args.lr, args.batch_size, args.seed)
    bs = args.batch_size
    batches = [
        (x[order[i * bs : (i + 1) * bs]], y[order[i * bs : (i + 1) * bs]])
        for i in range(args.batches)
    ]
    with torch.no_grad():
        train_loss = float(loss_fn(model(x[order]), y[order]))
    d = sum(p.numel() for p in model.parameters())
    runs = [
        ("exact", {}),
        ("slq", {"num_probes": 16, "num_steps": 64}),
        ("kde", {"num_probes": 16, "num_steps": 64}),
        ("ps", {"num_probes": 16, "num_steps": 64}),
        ("deflated", {"k": 20, "k_bottom": 2, "num_probes": 1, "num_steps": 24}),
        ("deflated", {"k": 30, "k_bottom": 2, "num_probes": 1, "num_steps": 30}),
        ("deflated", {"k": 40, "k_bottom": 4, "num_probes": 2, "num_steps": 40}),
    ]
    print(
        f"digits MLP 64-16-16-10 ReLU no bias, d = {d}, SGD lr {args.lr}, batch {bs}, "
        f"{args.epochs} epochs, train loss {train_loss:.4f}; {args.batches} minibatch Hessians"
    )
    rows = []
    exact_value = exact_cost = None
    for method, options in runs:
        ests, seconds = [], []
        for rep in range(1 if method == "exact" else args.repeats):
            t0 = time.perf_counter()
            ests.append(
                estimate_sharpness_dimension(
                    model,
                    loss_fn,
                    batches,
                    args.lr,
                    method,
                    generator=torch.Generator().manual_seed(1000 * rep + args.seed + 1),
                    **options,
                )
            )
            seconds.append(time.perf_counter() - t0)
        if method == "exact":
            exact_value, exact_cost = ests[0].value, ests[0].num_products
        rows.append((method, options, ests, sum(seconds) / len(seconds)))
    print()
    print(f"stochastic methods: mean over {args.repeats} seeds (spread = std across seeds)")
    print()
    print("| method | settings | SD (spread) | jackknife s.e. | rel. error | d − SD | "
          "error of d − SD | products | share of exact | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    exact_codim = d - exact_value
    for method, options, ests, seconds in rows:
        values = torch.tensor([e.value for e in ests], dtype=torch.float64)
        mean = float(values.mean())
        spread = float(values.std()) if len(ests) > 1 else 0.0
        se = sum(e.uncertainty for e in ests) / len(ests)
        rel = float((values - exact_value).abs().mean()) / exact_value
        codim_err = float(((d - values) - exact_codim).abs().mean()) / max(exact_codim, 1e-12)
        products = sum(e.num_products for e in ests) / len(ests)
        settings = ", ".join(f"{k}={v}" for k, v in options.items()) or "dense eigvalsh"
        print(
            f"| {method} | {settings} | {mean:.1f} ({spread:.1f}) | {se:.1f} | {rel:.2%} | "
            f"{d - mean:.1f} | {codim_err:.0%} | {products:,.0f} | "
            f"{products / exact_cost:.1%} | {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
