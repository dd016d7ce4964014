"""Hessian-vector product cost of every sdopt.curvature mode, as a ratio to one gradient.

On both workloads of ``benchmarks/workloads.py`` (float32, CPU, full batch) this prints, side
by side in one run:

- the time of one product ``H v`` in each mode divided by the time of one plain eager
  gradient measured in the same process (``grad-eq``), the one-off cost of the first product
  (graph build, trace) in grad-eq, and which mode ``mode="auto"`` picked;
- the per-vector cost of blocks ``H V`` with ``m = 5`` and ``m = 20`` columns: one after
  another on the reused graph, and vectorised (``vectorize=True``: ``is_grads_batched`` on the
  reused graph, ``vmap`` for the functional modes);
- the extra peak memory of each mode over a gradient step (peak RSS of a fresh subprocess
  after three products minus its peak after one gradient; ``--no-memory`` skips it);
- the top-k table of ``benchmarks/topk.py`` (``run_topk``) when that module is importable.

Timings are interleaved (gradient, then each mode, round after round) and the fastest of the
rounds is kept for each, so bursts of load from other processes on a shared machine drop out
of the ratios.

Usage::

    python benchmarks/curvature.py                    # everything (~5-10 min on 2 cores)
    python benchmarks/curvature.py --workloads mlp --rounds 3 --no-memory --no-topk
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS, build_workload

from sdopt.curvature import HessianOperator

MODES = ("reuse", "fwd-rev", "rev-rev", "double-backward", "linearize", "finite-difference")
BLOCKS = (("reuse", False), ("reuse", True), ("fwd-rev", True), ("rev-rev", True))
BLOCK_SIZES = (5, 20)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_products(w, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ops, first = {}, {}
    vectors = [torch.randn(w.num_params, generator=generator) for _ in range(rounds + 1)]
    grad_times = [_timed(w.gradient) for _ in range(2)]  # warm-up
    auto = HessianOperator(w.model, w.loss_fn, w.data)
    first["auto"] = _timed(lambda: auto.matvec(vectors[0]))
    for mode in MODES:
        ops[mode] = HessianOperator(w.model, w.loss_fn, w.data, mode=mode, fallback=False)
        first[mode] = _timed(lambda op=ops[mode]: op.matvec(vectors[0]))
    ops["auto"] = auto
    times: dict[str, list[float]] = {name: [] for name in ops}
    grad_times = []
    for r in range(rounds):
        grad_times.append(_timed(w.gradient))
        for name, op in ops.items():
            times[name].append(_timed(lambda op=op, v=vectors[r + 1]: op.matvec(v)))
    grad = min(grad_times)
    rows = []
    for name in ("auto", *MODES):
        per = min(times[name])
        rows.append(
            {
                "mode": name if name != "auto" else f"auto (= {auto.mode})",
                "grad_eq": per / grad,
                "one_off_grad_eq": max(first[name] - per, 0.0) / grad,
                "seconds": per,
            }
        )
    del ops
    return {"gradient_seconds": grad, "products": rows, "auto_mode": auto.mode}


def bench_blocks(w, grad: float, rounds: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for m in BLOCK_SIZES:
        V = torch.randn(w.num_params, m, generator=generator)
        for mode, vectorize in BLOCKS:
            op = HessianOperator(w.model, w.loss_fn, w.data, mode=mode, vectorize=vectorize)
            op.matvec(V[:, 0])  # build graphs / warm up
            reps = max(1, rounds // 2) if m > 5 else rounds
            per = min(_timed(lambda op=op, V=V: op.matmat(V)) for _ in range(reps)) / m
            how = ("is_grads_batched" if mode == "reuse" else "vmap") if vectorize else "loop"
            rows.append({"m": m, "mode": mode, "how": how, "grad_eq_per_vector": per / grad})
            del op
    return rows


def _peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (``VmHWM``; unlike ``ru_maxrss`` it
    is not inherited from the parent that spawned the probe)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB, non-Linux


def memory_probe(workload: str, mode: str) -> None:
    """Subprocess entry: extra peak RSS (MB) of three products over one gradient step."""
    w = build_workload(workload)
    w.gradient()
    w.gradient()
    base = _peak_rss_mb()
    op = HessianOperator(w.model, w.loss_fn, w.data, mode=mode, fallback=False)
    for _ in range(3):
        op.matvec(torch.randn(op.dim))
    print(json.dumps({"extra_mb": _peak_rss_mb() - base}))


def bench_memory(workload: str) -> dict[str, float]:
    out = {}
    for mode in MODES:
        result = subprocess.run(
            [sys.executable, __file__, "--memory-probe", workload, mode],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        out[mode] = json.loads(lines[-1])["extra_mb"] if lines else float("nan")
    return out


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key, "")
            cells.append(
                format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value)
            )
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-topk", action="store_true", help="skip benchmarks/topk.py")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--memory-probe", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return {}
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    results: dict = {}
    for name in args.workloads:
        w = build_workload(name)
        print(f"\n## {name}: {w.description}, {w.num_params:,} parameters")
        products = bench_products(w, args.rounds)
        grad = products["gradient_seconds"]
        print(f"one gradient: {grad * 1e3:.1f} ms (fastest of {args.rounds} rounds)")
        if not args.no_memory:
            memory = bench_memory(name)
            for row in products["products"]:
                mode = products["auto_mode"] if row["mode"].startswith("auto") else row["mode"]
                row["extra_mb"] = memory.get(mode, float("nan"))
        print(
            _table(
                products["products"],
                [
                    ("mode", "mode", ""),
                    ("grad_eq", "HVP / gradient", ".2f"),
                    ("one_off_grad_eq", "one-off (grad-eq)", ".1f"),
                    ("extra_mb", "extra peak MB", ".0f"),
                ],
            )
        )
        blocks = bench_blocks(w, grad, args.rounds)
        print("\nblocks H V, per-vector cost (grad-eq):")
        print(
            _table(
                blocks,
                [
                    ("m", "m", "d"),
                    ("mode", "mode", ""),
                    ("how", "columns", ""),
                    ("grad_eq_per_vector", "per vector", ".2f"),
                ],
            )
        )
        results[name] = {**products, "blocks": blocks, "num_params": w.num_params}
        default = products["products"][0]["grad_eq"]
        print(
            f"\ndefault mode ({products['auto_mode']}): {default:.2f} grad-eq per HVP (target <= 1.8)"
        )
    if not args.no_topk:
        try:
            from topk import run_topk  # provided by benchmarks/topk.py
        except ImportError as error:
            print(f"\n(top-k table skipped: {error})")
        else:
            try:
                from topk import _markdown as topk_table
            except ImportError:
                topk_table = None
            for name in args.workloads:
                rows = run_topk(build_workload(name))
                print(f"\n## top-k eigenpairs, {name}\n")
                if topk_table is not None:
                    print(topk_table(rows))
                elif rows:
                    keys = sorted({key for row in rows for key in row})
                    print(_table(rows, [(k, k, ".4g") for k in keys]))
                results.setdefault(name, {})["topk"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
