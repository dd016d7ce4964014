"""What one sharpness-dimension estimate costs on larger models (CPU, float32).

For tanh MLPs of about 1 M, 10 M and 25 M parameters, one batch of ``--batch`` Gaussian
inputs (10 classes), plain SGD:

- **step**: median seconds of one training step (forward, backward, ``SGD.step``).
- **cold / warm**: one :func:`sdopt.estimate_sharpness_dimension` at its defaults (``k = 8``,
  ``k_bottom = 4``, 8 probes × 40 SLQ steps, ``tol = 1e-2``), cold (random start) and warm
  (top end started from the cold estimate's eigenvectors after ``--gap`` more SGD steps, as
  :class:`sdopt.SDOptimizer` does), in training steps of the same model.
- **record**: the same through ``SDOptimizer`` (``mode="monitor"``, ``every=--every``): the
  seconds of its second record (warm), in training steps.
- **overhead at every=DEFAULT_EVERY**: ``(warm record steps + E × per-step cost of the
  wrapper) / E`` with ``E = sdopt.optim.DEFAULT_EVERY``; the wrapper's per-step cost is
  measured over ``--steps`` steps between records.
- **peak memory**, in parameter-sized vectors (``4 d`` bytes): the resident memory the call
  adds at its peak. Method (Linux): glibc's ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` makes every
  tensor of 64 KiB or more its own mmap, so freed memory leaves the resident set at once;
  ``/proc/self/clear_refs`` (``5``) resets the high-water mark ``VmHWM`` just before the call,
  and ``VmHWM - VmRSS(before)`` is the peak of everything the call allocated, transients
  included (``tracemalloc`` does not see torch's allocations). Warm-start vectors held before
  the call are not counted (they are held between records: ``k + k_bottom`` vectors).

Run (about 3 minutes on 2 busy cores)::

    python benchmarks/scale.py --threads 1

Ratios, not seconds, are what transfers between machines.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch
from torch import nn

import sdopt
from sdopt.optim import DEFAULT_EVERY

SIZES = {"1M": (256, 1024, 2), "10M": (1024, 2048, 3), "25M": (2048, 3072, 3)}


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn):
    """``fn()`` and the peak resident memory it added (bytes); see the module docstring."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - base


def mlp(width_in: int, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(width_in, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def step_seconds(model, opt, batch, repeats: int) -> float:
    x, y = batch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(name: str, batch_size: int, gap: int, steps: int, lr: float) -> dict:
    torch.manual_seed(0)
    width_in, width, depth = SIZES[name]
    model = mlp(width_in, width, depth)
    d = sum(p.numel() for p in model.parameters())
    vector = 4 * d
    x = torch.randn(batch_size, width_in)
    batch = (x, torch.randint(0, 10, (batch_size,)))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    step_seconds(model, opt, batch, 3)  # warm-up
    step = step_seconds(model, opt, batch, steps)
    loss_fn = nn.functional.cross_entropy

    def estimate(init=None):
        t0 = time.perf_counter()
        est = sdopt.estimate_sharpness_dimension(model, loss_fn, batch, lr, init=init)
        return est, time.perf_counter() - t0

    (cold, cold_s), cold_peak = peak_bytes(estimate)
    step_seconds(model, opt, batch, gap)
    init, cold_products = cold.eigenvectors, cold.num_products
    del cold
    (warm, warm_s), warm_peak = peak_bytes(lambda: estimate(init))
    # SDOptimizer: a record at step 0 (cold), then steps between records, then a warm record
    sd = sdopt.SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), model=model, loss_fn=loss_fn,
        data=batch, every=steps + 1,
    )  # fmt: skip

    def sd_step():
        sd.zero_grad()
        nn.functional.cross_entropy(model(x), batch[1]).backward()
        sd.step()

    sd_step()  # the cold record
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sd_step()
        times.append(time.perf_counter() - t0)
    wrapped = statistics.median(times)
    _, record_peak = peak_bytes(sd_step)  # the warm record
    record = sd.history[-1]
    per_step = max(wrapped - step, 0.0) / step
    overhead = (record.seconds / step + DEFAULT_EVERY * per_step) / DEFAULT_EVERY
    return {
        "name": name, "d": d, "step": step,
        "cold_steps": cold_s / step, "warm_steps": warm_s / step,
        "cold_products": cold_products, "warm_products": warm.num_products,
        "record_steps": record.seconds / step, "record_products": record.num_products,
        "cold_peak": cold_peak / vector, "warm_peak": warm_peak / vector,
        "record_peak": record_peak / vector, "wrapper_per_step": per_step,
        "overhead": overhead,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gap", type=int, default=5, help="SGD steps between cold and warm")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: see the module docstring
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, float32")
    print(f"k = 8, k_bottom = 4 (estimate defaults); target peak <= k + 12 = 20 vectors; "
          f"overhead at every = {DEFAULT_EVERY} <= 10 %")  # fmt: skip
    head = (f"{'model':>5} {'params':>10} {'step s':>7} | {'cold':>6} {'warm':>6} {'record':>6}"
            f" steps | {'cold':>5} {'warm':>5} {'record':>6} vectors | {'wrap/step':>9}"
            f" {'overhead':>8}")  # fmt: skip
    print(head)
    for name in args.sizes:
        r = run(name, args.batch, args.gap, args.steps, args.lr)
        print(
            f"{r['name']:>5} {r['d']:>10,} {r['step']:>7.4f} | {r['cold_steps']:>6.0f} "
            f"{r['warm_steps']:>6.0f} {r['record_steps']:>6.0f}       | {r['cold_peak']:>5.1f} "
            f"{r['warm_peak']:>5.1f} {r['record_peak']:>6.1f}         | "
            f"{r['wrapper_per_step']:>9.3f} {100 * r['overhead']:>7.2f}%",
            flush=True,
        )
        print(
            f"      products: cold {r['cold_products']}, warm {r['warm_products']}, "
            f"record {r['record_products']}"
        )


if __name__ == "__main__":
    main()
