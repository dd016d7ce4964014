"""Log SDOptimizer's estimates and your own metrics to Weights & Biases (offline here).

``sdopt.WandbLogger`` writes every estimate under ``sdopt/`` on its own step axis, so your own
``wandb.log`` calls keep theirs. Offline mode writes the run under ``./wandb/`` without a
network; ``wandb sync`` uploads it later. The same from the command line:
``sdopt grok --wandb offline``.

    python examples/wandb_logging.py --steps 100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

import sdopt
from sdopt.tasks.grokking import GrokkingMLP, modular_arithmetic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dir", default="runs/wandb_example")
    args = parser.parse_args()
    try:
        import wandb
    except ImportError as exc:
        raise SystemExit('this example needs wandb: pip install "sdopt[wandb]"') from exc

    os.environ.setdefault("WANDB_SILENT", "true")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project="sdopt-examples", mode="offline", dir=args.dir, config={"steps": args.steps}
    )

    torch.manual_seed(0)
    data = modular_arithmetic(23, "add", 0.5, seed=0)
    model = GrokkingMLP(23, width=64)
    loss_fn = nn.functional.cross_entropy
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1.0)
    opt = sdopt.SDOptimizer(
        base,
        model=model,
        loss_fn=loss_fn,
        data=data.train,
        mode="monitor",
        every=10,
        k=3,
        loggers=[sdopt.WandbLogger()],  # uses the active run
    )
    x, y = data.train
    for step in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        run.log({"train/loss": loss.item(), "train/step": step})
    run_dir = Path(run.dir).parent  # this run's folder (earlier runs in --dir have their own)
    run.finish()

    print(f"offline run written to {run_dir}; upload with `wandb sync {run_dir}`")
    assert list(run_dir.glob("*.wandb"))
    assert len(opt.history) == (args.steps + 9) // 10


if __name__ == "__main__":
    main()
