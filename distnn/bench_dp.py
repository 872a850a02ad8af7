"""`distnn bench`'s DP-SGD section: a private step's time over a plain step's, and its extra memory.

A plain step is `grad_sum` + the SGD update (bench_workers.local_step); a private step is what
Trainer.fit does with privacy on, in one process: the Poisson draw of the batch's rows over N
training rows, the clipped `grad_sum` (one backward), the noise on every parameter, the SGD update.
Both take the same X (the realized batch is B rows in both, so only DP's own work differs), with
one BLAS thread; each figure is the best of many calls (bench_workers.timeit). The parts (draw,
clipped gradient, noise) are timed alone too. Extra memory is the peak that tracemalloc (numpy's
allocations) sees during a private step minus during a plain one (after a warm-up step), and the
memory held from step to step: the (B,) norms and clip factors: O(batch), never O(batch x
parameters). The noise kernel's scratch (8 KiB of Philox words and 2,048 values per thread) lives
for one call: the per-step column counts it.
"""
import tracemalloc

import numpy as np

from . import optim, privacy
from .bench_workers import LARGE, SMALL, blas_threads, synthetic_batch, timeit
from .network import Network

TARGET = 1.3  # the issue's: a private step at most 1.3x a plain one
ROWS = 60_000  # training rows the Poisson draw runs over (MNIST's)


def plan(quick):
    """The configs the DP worker measures."""
    return {"seconds": 0.05 if quick else 0.5,
            "configs": [{"net": n, "sizes": s, "batch": b, "dtype": "float32", "threads": 1}
                        for n, s in (("large", LARGE), ("small", SMALL))
                        for b in ((256,) if quick else (64, 256))]}


def dp_worker(spec):
    """Worker: every config of the plan."""
    rows = []
    for c in spec["configs"]:
        with blas_threads(c["threads"]):
            rows.append(measure(c, spec["seconds"]))
    return {"configs": rows}


def measure(c, min_s):
    net = Network(c["sizes"], dtype=c["dtype"], seed=0)
    X, Y, _ = synthetic_batch(net, c["batch"], seed=1)
    B, grad = c["batch"], net.grad_buffer()
    opt = optim.SGD(lr=1e-3, momentum=0.9)
    opt.init(net.params)
    opt.threads = c["threads"]
    plan = privacy.Plan(privacy.DP(noise_multiplier=1.0, max_grad_norm=1.0), ROWS, B, seed=0)
    t = [0]

    def plain():
        net.grad_sum(X, Y, grad, divisor=B)
        opt.step(net.params, grad)

    def private():
        t[0] += 1
        plan.rows(t[0])  # drawn, not used: X stays the same B rows
        net.grad_sum(X, Y, grad, divisor=B, clip=1.0)
        plan.noise(t[0])(grad)
        opt.step(net.params, grad)

    out = dict(c, rows=ROWS, params=net.n_params,
               plain_s=timeit(plain, min_s), dp_s=timeit(private, min_s),
               draw_s=timeit(lambda: plan.rows(7), min_s / 4),
               clipped_grad_s=timeit(lambda: net.grad_sum(X, Y, grad, divisor=B, clip=1.0), min_s / 2),
               grad_s=timeit(lambda: net.grad_sum(X, Y, grad, divisor=B), min_s / 2),
               noise_s=timeit(lambda: plan.noise(7)(grad), min_s / 2))
    out["extra_bytes"] = _peak(private) - _peak(plain)  # allocated per step
    out["held_bytes"] = B * (8 + net.dtype.itemsize)  # held: the (B,) norms and clip factors
    out["ratio"] = out["dp_s"] / out["plain_s"]
    return out


def _peak(fn):
    fn()  # buffers of this batch size exist already, as in training
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def print_dp(res):
    """The section's table and its PASS/MISS line per config."""
    rows = res.get("dp", {}).get("configs", [])
    if not rows:
        return
    print(f"\n== DP-SGD step (1 thread, Poisson draw over {ROWS:,} rows; target <= {TARGET}x plain)")
    print(f"{'net':<6} {'batch':>5} {'plain ms':>9} {'dp ms':>8} {'ratio':>6}  {'draw':>7} "
          f"{'grad':>7} {'clipped':>8} {'noise':>7}  {'per step KiB':>12} {'held KiB':>8}")
    for r in rows:
        ms = {k: 1e3 * r[k] for k in ("plain_s", "dp_s", "draw_s", "grad_s", "clipped_grad_s",
                                      "noise_s")}
        verdict = "PASS" if r["ratio"] <= TARGET else "MISS"
        print(f"{r['net']:<6} {r['batch']:>5} {ms['plain_s']:>9.3f} {ms['dp_s']:>8.3f} "
              f"{r['ratio']:>5.2f}x  {ms['draw_s']:>7.3f} {ms['grad_s']:>7.3f} "
              f"{ms['clipped_grad_s']:>8.3f} {ms['noise_s']:>7.3f}  {r['extra_bytes'] / 1024:>12.1f}"
              f" {r['held_bytes'] / 1024:>8.1f}  {verdict}")
