"""Quickstart: wrap any optimizer in SDOptimizer and watch the sharpness dimension.

A 64-32-10 tanh MLP on scikit-learn's bundled digits (nothing is downloaded), trained with
plain SGD. The only change to an ordinary PyTorch loop is the ``SDOptimizer(...)`` line; in
``mode="monitor"`` training is bit-for-bit unchanged and every ``every`` steps an estimate of
the sharpness dimension (SD), λ_max and η·λ_max is recorded in ``opt.history``.

    python examples/quickstart.py            # 300 steps, a few seconds
    python examples/quickstart.py --steps 40 # what the tests run
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sdopt


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise SystemExit('this example needs scikit-learn: pip install "sdopt[science]"') from exc
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = load_digits()
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.functional.cross_entropy

    base = torch.optim.SGD(model.parameters(), lr=args.lr)
    opt = sdopt.SDOptimizer(  # the one new line: drop-in around any torch.optim optimizer
        base,
        model=model,
        loss_fn=loss_fn,
        data=(x_train[:512], y_train[:512]),
        mode="monitor",
        every=20,
        k=5,
    )

    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (128,), generator=generator)
        opt.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        rec = opt.last_estimate
        if rec is not None and rec.step == step and rec.ok:
            print(
                f"step {step:4d}  loss {loss.item():.3f}  SD {rec.sharpness_dimension:8.2f}  "
                f"λ_max {rec.lambda_max:7.3f}  η·λ_max {rec.lr * rec.lambda_max:5.2f}"
            )

    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    estimates = [r for r in opt.history if r.ok]
    print(f"test accuracy {accuracy:.3f}; {len(estimates)} SD estimates")
    assert len(estimates) == (args.steps + 19) // 20
    assert all(r.sharpness_dimension >= 0 and r.lambda_max > 0 for r in estimates)
    assert accuracy > (0.85 if args.steps >= 300 else 0.3), accuracy


if __name__ == "__main__":
    main()
