"""Top-k Hessian eigenpairs: sdopt (cold and warm) against PyHessian, hessian-eigenthings and
curvlinops + scipy ``eigsh``, on the workloads of ``benchmarks/workloads.py``.

For k = 1, 5, 20 it prints, per method: products, gradient-equivalents (wall time / one full-batch
gradient, timed just before and after each method in the same process, so that load drifting
on a shared machine cancels), wall seconds and the relative error of the k eigenvalues
against a tight reference (sdopt at residual tolerance 1e-6, i.e. eigenvalue error < 1e-6
relative by Weyl's bound). Every method's product count includes everything it multiplied.

"Warm": the model takes ``--later-steps`` (100) more full-batch AdamW steps (lr 1e-3, weight decay
1, betas 0.9/0.98; for the transformer the same training run continued, optimizer state
included), then sdopt re-estimates cold and warm-started from the cold eigenvectors of the
earlier point; ``warm/cold`` is the ratio of their products.

Anchors are optional (``pip install --no-deps pyhessian hessian-eigenthings
curvlinops-for-pytorch`` plus their small pure-Python deps) and skipped cleanly when missing.
scipy runs under ``threadpoolctl.threadpool_limits(1)`` (its BLAS threads otherwise fight torch's).

    python benchmarks/topk.py --workloads transformer
    python benchmarks/topk.py --workloads mlp transformer --ks 1 5 20 --json topk.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS, Workload, build_workload

from sdopt import HessianOperator
from sdopt.spectrum import top_eigenpairs

ANCHORS = ("pyhessian", "eigenthings", "curvlinops+eigsh", "sdopt-op+eigsh")


def gradient_seconds(w: Workload, repeats: int = 7) -> float:
    w.gradient()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        w.gradient()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_error(values: Any, reference: torch.Tensor) -> float:
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = torch.sort(v, descending=True).values
    ref = reference[: v.numel()].to(torch.float64)
    return float(((v - ref).abs() / ref.abs()).max())


def later_model(w: Workload, steps: int) -> torch.nn.Module:
    """The model ``steps`` AdamW steps later.

    Transformer: the same training run continued (200 + ``steps`` steps from the same seed, so the
    optimizer state carries over; cached like the workload). MLP (at initialisation): ``steps``
    AdamW steps from the workload's state.
    """
    if w.name == "transformer":
        from workloads import TRAIN_STEPS

        return build_workload("transformer", steps=TRAIN_STEPS + steps).model
    return adamw_steps(w.model, w, steps)


def adamw_steps(model: torch.nn.Module, w: Workload, steps: int) -> torch.nn.Module:
    later = copy.deepcopy(model)
    opt = torch.optim.AdamW(later.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    x, y = w.data
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        w.loss_fn(later(x), y).backward()
        opt.step()
    later.zero_grad(set_to_none=True)
    return later


def reference(model: torch.nn.Module, w: Workload, k: int) -> torch.Tensor:
    op = HessianOperator(model, w.loss_fn, w.data)
    res = top_eigenpairs(op, k, tol=1e-6, criterion="residual", max_basis=max(3 * k, 60))
    if not res.converged:
        print(f"  (reference not converged: residuals {res.residuals.max():.2e})")
    return res.eigenvalues.to(torch.float64)


# ------------------------------------------------------------------------------ methods
def run_sdopt(model, w, k, tol, init=None):
    start = time.perf_counter()
    op = HessianOperator(model, w.loss_fn, w.data)
    res = top_eigenpairs(op, k, tol=tol, init=init)
    return res.eigenvalues, op.num_products, time.perf_counter() - start, res


def run_pyhessian(model, w, k, tol):
    from pyhessian.hessian import hessian

    ph = sys.modules["pyhessian.hessian"]  # the package re-exports the class under this name

    counter = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args):
        counter["n"] += 1
        return original(*args)

    ph.hessian_vector_product = counted
    m = copy.deepcopy(model)  # PyHessian forces eval() and leaves graphs in .grad
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            start = time.perf_counter()
            h = hessian(m, w.loss_fn, data=w.data, cuda=False)
            values, _ = h.eigenvalues(top_n=k)  # defaults: maxIter 100, tol 1e-3
            seconds = time.perf_counter() - start
    finally:
        ph.hessian_vector_product = original
    return values, counter["n"], seconds


def run_eigenthings(model, w, k, tol):
    import hessian_eigenthings as he

    m = copy.deepcopy(model)
    start = time.perf_counter()
    op = he.HessianOperator(m, [w.data], he.supervised_loss(w.loss_fn))
    counter = {"n": 0}
    matvec = op.matvec

    def counted(v):
        counter["n"] += 1
        return matvec(v)

    op.matvec = counted
    res = he.lanczos(op, k=k, which="LA", seed=0)  # defaults: 2k steps
    return res.eigenvalues, counter["n"], time.perf_counter() - start


def _eigsh(matvec, dim, k, tol, dtype):
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh
    from threadpoolctl import threadpool_limits

    counter = {"n": 0}

    def mv(x):
        x = np.asarray(x)
        counter["n"] += 1 if x.ndim == 1 else x.shape[1]
        return matvec(x)

    lin = LinearOperator((dim, dim), matvec=mv, dtype=np.dtype(dtype))
    v0 = np.random.default_rng(0).standard_normal(dim).astype(dtype)
    with threadpool_limits(1):
        values = eigsh(lin, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return values, counter["n"]


def run_curvlinops(model, w, k, tol):
    from curvlinops import HessianLinearOperator

    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    start = time.perf_counter()
    loss = w.loss_fn
    if loss is torch.nn.functional.cross_entropy:  # curvlinops wants an nn.Module loss
        loss = torch.nn.CrossEntropyLoss()
    H = HessianLinearOperator(m, loss, params, [w.data], check_deterministic=False)
    lin = H.to_scipy(dtype="float32")
    values, n = _eigsh(lambda x: lin @ x, lin.shape[0], k, tol, "float32")
    return values, n, time.perf_counter() - start


def run_sdopt_eigsh(model, w, k, tol):
    start = time.perf_counter()
    op = HessianOperator(model, w.loss_fn, w.data)

    def matvec(x):
        v = torch.from_numpy(x.reshape(-1).astype("float32"))
        return op.matvec(v).numpy()

    values, n = _eigsh(matvec, op.dim, k, tol, "float32")
    return values, n, time.perf_counter() - start


RUNNERS = {
    "pyhessian": run_pyhessian,
    "eigenthings": run_eigenthings,
    "curvlinops+eigsh": run_curvlinops,
    "sdopt-op+eigsh": run_sdopt_eigsh,
}


def run_topk(
    workload: Workload,
    ks: tuple[int, ...] = (1, 5, 20),
    *,
    tol: float = 1e-3,
    later_steps: int = 100,
    anchors: tuple[str, ...] = ANCHORS,
    verbose: bool = True,
) -> list[dict]:
    """One row per (method, k): products, grad-eq, seconds, relative error vs the reference."""
    w = workload
    say = print if verbose else (lambda *a, **kw: None)
    grad_s = gradient_seconds(w)
    kmax = max(ks)
    say(f"[topk] {w.name}: {w.num_params:,} parameters, one gradient {1e3 * grad_s:.1f} ms")
    ref = reference(w.model, w, kmax)
    rows: list[dict] = []

    def timed(fn, *args, **kwargs):
        """Run ``fn`` between two gradient timings: load on a shared machine drifts over a
        run of many minutes, so each method is divided by the gradient time next to it."""
        before = gradient_seconds(w, repeats=3)
        out = fn(*args, **kwargs)
        after = gradient_seconds(w, repeats=3)
        timed.grad_s = 0.5 * (before + after)
        return out

    timed.grad_s = grad_s

    def row(method, k, values, products, seconds, truth=ref, **extra):
        r = {
            "method": method,
            "k": k,
            "products": int(products),
            "grad_eq": seconds / timed.grad_s,
            "gradient_ms": 1e3 * timed.grad_s,
            "seconds": seconds,
            "rel_error": rel_error(values, truth) if values is not None else math.nan,
            **extra,
        }
        rows.append(r)
        say(
            f"  {method:18s} k={k:2d} products={r['products']:4d} grad-eq={r['grad_eq']:7.1f} "
            f"err={r['rel_error']:.1e} {extra.get('note', '')}"
        )
        return r

    later = later_model(w, later_steps) if later_steps > 0 else None
    ref_later = reference(later, w, kmax) if later is not None else None
    for k in ks:
        values, n, sec, cold = timed(run_sdopt, w.model, w, k, tol)
        row("sdopt cold", k, values, n, sec, converged=cold.converged)
        if later is not None:
            v2, n2, s2, cold2 = timed(run_sdopt, later, w, k, tol)
            row("sdopt cold (later)", k, v2, n2, s2, truth=ref_later, converged=cold2.converged)
            v3, n3, s3, warm = timed(run_sdopt, later, w, k, tol, init=cold.eigenvectors)
            row(
                "sdopt warm (later)",
                k,
                v3,
                n3,
                s3,
                truth=ref_later,
                converged=warm.converged,
                warm_over_cold=n3 / n2,
            )
            say(f"    warm/cold products = {n3}/{n2} = {n3 / n2:.2f}")
        for name in anchors:
            try:
                values, n, sec = timed(RUNNERS[name], w.model, w, k, tol)
            except ImportError as error:
                rows.append({"method": name, "k": k, "note": f"unavailable: {error}"})
                say(f"  {name:18s} k={k:2d} unavailable: {error}")
                continue
            row(name, k, values, n, sec)
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| method | k | products | grad-eq | rel. error |", "|---|---|---|---|---|"]
    for r in rows:
        if "products" not in r:
            lines.append(f"| {r['method']} | {r['k']} | — | — | {r.get('note', '')} |")
            continue
        lines.append(
            f"| {r['method']} | {r['k']} | {r['products']} | {r['grad_eq']:.0f} | "
            f"{r['rel_error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--later-steps", type=int, default=100)
    parser.add_argument("--anchors", nargs="*", default=list(ANCHORS), choices=ANCHORS)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.workloads:
        rows = run_topk(
            build_workload(name),
            tuple(args.ks),
            tol=args.tol,
            later_steps=args.later_steps,
            anchors=tuple(args.anchors),
        )
        results[name] = rows
        print(f"\n## top-k eigenpairs, {name}\n")
        print(_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
