"""Grokking on modular addition with the shared training loop, monitored by SDOptimizer.

Trains the default task of ``sdopt grok`` ((a + b) mod 59, half of the pairs for training, a
GELU MLP of width 256, full-batch AdamW with weight decay 1) and prints when the training set
is fitted and when validation accuracy jumps (grokking), with the SD estimates along the way.
Then it draws the plot.

    python examples/grokking.py                     # ~3,000 steps: groks
    python examples/grokking.py --p 11 --steps 30   # a smoke test (no grokking expected)
"""

from __future__ import annotations

import argparse

from sdopt.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--p", type=int, default=59)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--mode", default="monitor")
    parser.add_argument("--out", default="runs/example_grokking")
    args = parser.parse_args()

    def report(row: dict) -> None:
        if row["step"] % 250 == 0:
            sd = row["sharpness_dimension"]
            sd_text = "" if sd is None else f"  SD {sd:.3g}  η·λ_max {row['lr_lambda_max']:.3g}"
            print(
                f"step {row['step']:5d}  train {row['train_accuracy']:.3f}  val {row['val_accuracy']:.3f}{sd_text}"
            )

    config = TrainConfig(
        p=args.p,
        train_fraction=0.5,
        model="mlp",
        model_kwargs={"width": 256},
        optimizer=args.optimizer,
        lr=3e-3,
        weight_decay=1.0,
        steps=args.steps,
        eval_every=10,
        sd_mode=args.mode,
        sd_every=50,
        out_dir=args.out,
        progress=False,
    )
    result = train(config, callback=report)
    s = result.summary
    print(
        f"fitted (train ≥ 99 %) at step {s['steps_to_99_train_accuracy']}, "
        f"grokked (val ≥ 95 %) at step {s['steps_to_95_val_accuracy']}; plot: {args.out}/grokking.png"
    )
    if args.steps >= 3000 and args.p == 59:
        assert s["steps_to_95_val_accuracy"] is not None, "expected grokking within 3,000 steps"
        assert s["steps_to_95_val_accuracy"] > 2 * s["steps_to_99_train_accuracy"]
    assert s["steps"] == args.steps and (result.out_dir / "grokking.png").exists()


if __name__ == "__main__":
    main()
