"""The accuracy battery: every sharpness-dimension estimator against dense float64 ground truth.

GitHub issue 10, item 4. Builds the training states of :mod:`sdopt.studies.accuracy` (at
initialisation, while memorising, at the edge of stability, after grokking; tanh, GELU, ReLU
and square-activation MLPs, a CNN with BatchNorm in train mode, a self-attention model, a
convex softmax regression; full-batch and minibatch protocols; the gd, momentum and adam maps),
computes each one's exact SD from dense float64 Hessians, then runs every estimator on the
float32 model as a user would and prints, side by side, one Markdown table per estimator:
error, error relative to ``min(SD, d − SD)``, whether ``± 2σ`` covers the exact value, and
the Hessian-vector products used; then a summary line per estimator against the issue's
targets (:func:`sdopt.studies.accuracy.target_checks`).

Run:  python benchmarks/sd_accuracy.py [--quick] [--methods default,exact,slq,kde,ps,topk]
``default`` calls the estimator without ``method=``, i.e. whatever its default is. A method that
refuses a state (``ValueError``, e.g. a map it does not support) is reported as n/a.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from typing import Any

import torch

from sdopt.studies.accuracy import BatteryState, battery_states, evaluate, summarize

METHODS = ("default", "exact", "slq", "kde", "ps", "topk")


def _fmt(x: float, digits: int = 2) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def states_table(states: list[BatteryState]) -> str:
    """Markdown table of the states and their exact facts."""
    lines = [
        "| state | protocol | map | lr | d | exact SD | d − SD | n_neg | n_edge | η·λ_max/edge "
        "| λ_min | build s | exact s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in states:
        lines.append(
            f"| {s.name} | {s.protocol} | {s.exponent_map}"
            f"{f' β={s.momentum:g}' if s.momentum else ''} | {s.lr:g} | {s.dim} "
            f"| {s.exact_sd:.2f} | {s.codim:.2f} | {s.n_neg} | {s.n_edge} | {s.edge_ratio:.3f} "
            f"| {s.lambda_min:.3g} | {s.build_seconds:.1f} | {s.exact_seconds:.1f} |"
        )
    return "\n".join(lines)


def method_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of one estimator's rows (``{"state", "dim", "error"}`` rows are n/a)."""
    lines = [
        "| state | d | exact SD | estimate ± σ | [low, high] | abs error "
        "| error/min(SD, d−SD) | covered (±2σ) | in [low, high] | meets target | products | s |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|:---:|:---:|---:|---:|",
    ]
    for r in rows:
        if "na" in r:
            lines.append(
                f"| {r['state']} | {r['dim']} | {r['exact']:.2f} | n/a ({r['na']}) "
                "| | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['state']} | {r['dim']} | {r['exact']:.2f} "
            f"| {r['estimate']:.2f} ± {_fmt(r['uncertainty'])} "
            f"| [{_fmt(r['low'])}, {_fmt(r['high'])}] | {r['abs_error']:.2f} "
            f"| {r['rel_error']:.3f} | {'yes' if r['covered'] else 'no'} "
            f"| {_yes_no(r['in_interval'])} "
            f"| {'yes' if r['meets_target'] else 'no'} | {r['products']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def summary_line(method: str, rows: list[dict[str, Any]]) -> str:
    """One line: worst relative error, coverage, states meeting the target."""
    done = [r for r in rows if "na" not in r]
    skipped = len(rows) - len(done)
    if not done:
        return f"**{method}**: n/a on every state"
    s = summarize(done)
    return (
        f"**{method}**: worst error/min(SD, d−SD) {s['worst_rel_error']:.3f}; ±2σ coverage "
        f"{s['coverage']:.0%} ({round(s['coverage'] * s['states'])}/{s['states']}); meets the "
        f"per-state target on {s['meets_target']}/{s['states']}; vacuous σ on {s['vacuous']}; "
        f"≈0-vs-d misses {s['gross_misses']}; issue targets "
        f"{'MET' if s['passes'] else 'not met'}"
        + (f"; [low, high] covers {s['in_interval']}/{s['states']}" if s["in_interval"] else "")
        + (f"; n/a on {skipped}" if skipped else "")
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick subset of states")
    ap.add_argument(
        "--methods", default=",".join(METHODS),
        help="comma-separated estimators (default: all of " + ",".join(METHODS) + ")",
    )  # fmt: skip
    ap.add_argument("--states", default=None, help="comma-separated state names (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the estimators' generators")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for everything (default 1: on a small shared machine more threads "
        "can be many times slower; 0 keeps torch's setting)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad} (choose from {', '.join(METHODS)})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *(sys.argv if argv is None else ["sd_accuracy.py", *argv])])
    print(f"`{command}`  (torch threads: {torch.get_num_threads()})\n")

    start = time.perf_counter()
    names = args.states.split(",") if args.states else None
    states = battery_states(args.quick, names=names, threads=None)
    print(
        f"## States ({len(states)}, built with exact SD in {time.perf_counter() - start:.1f} s)\n"
    )
    print(states_table(states))
    for s in states:
        print(f"\n- **{s.name}**: {s.description}")

    summaries = []
    for method in methods:
        rows: list[dict[str, Any]] = []
        for s in states:
            try:
                rows.append(evaluate(s, None if method == "default" else method, seed=args.seed))
            except ValueError as exc:
                reason = str(exc).split(" (")[0]
                rows.append({"state": s.name, "dim": s.dim, "exact": s.exact_sd, "na": reason})
        print(f"\n## {method}\n")
        print(method_table(rows))
        summaries.append(summary_line(method, rows))
    print("\n## Summary\n")
    for line in summaries:
        print(f"- {line}")
    print(f"\nTotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
