"""The benchmark's report: figures derived from the workers' results, targets, tables, JSON and plot.

`distnn bench` (distnn/bench.py) gathers the workers' raw timings; this module turns them into the
rows of bench.json (speed-ups, efficiencies, fractions of the roofline), judges the targets,
prints the tables and writes bench.json and bench.png.
"""

import json
import math
import os

import numpy as np

from .bench_workers import LARGE, SMALL
from .network import n_params


# ============================================================================ derived figures

def config_of(row):
    """A config's short description, e.g. 'large b512 float32 1t'."""
    extra = f" {row['ranks']}r" if "ranks" in row else ""
    return f"{row['net']} b{row['batch']} {row['dtype']}{extra} {row['threads']}t"


def roofline_rows(configs):
    """Section 1: GEMM rate on the net's shapes and the fraction of it the gradient and step reach."""
    rows = []
    for c in configs:
        step = c["step_s"]["sgd-momentum"]
        rows.append({k: c[k] for k in ("net", "sizes", "batch", "dtype", "threads")} | {
            "gflop_per_step": c["flops"] / 1e9, "gemm_s": c["gemm_s"],
            "gemm_gflops": c["flops"] / c["gemm_s"] / 1e9, "grad_s": c["grad_s"],
            "grad_fraction": c["gemm_s"] / c["grad_s"], "step_s": step,
            "step_fraction": c["gemm_s"] / step, "layers": c["layers"]})
    return rows


def step_rows(configs):
    """Section 2: samples/s per optimizer, overhead outside BLAS, and PyTorch's step where measured."""
    rows = []
    for c in configs:
        for opt, s in c["step_s"].items():
            row = {k: c[k] for k in ("net", "batch", "dtype", "threads")} | {
                "optimizer": opt, "step_s": s, "samples_per_s": c["batch"] / s,
                "gemm_s": c["gemm_s"], "overhead": (s - c["gemm_s"]) / s}
            if opt == "sgd-momentum" and "torch_step_s" in c:
                row |= {"torch_step_s": c["torch_step_s"],
                        "torch_samples_per_s": c["batch"] / c["torch_step_s"],
                        "vs_torch": c["torch_step_s"] / s}
            rows.append(row)
    return rows


def find(rows, **match):
    """The first row whose items include `match`, else None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def scaling_rows(runs, cores):
    """Section 3: strong and weak scaling rows with speed-up, efficiency and the mean phase split."""
    strong, weak = [], []
    for r in runs:
        ranks = r["per_rank"]
        row = {k: r[k] for k in ("net", "dtype", "batch", "ranks", "threads", "steps", "step_s")} | {
            "samples_per_s": r["batch"] / r["step_s"],
            "cores_used": min(r["ranks"] * r["threads"], cores),
            "oversubscribed": r["ranks"] * r["threads"] > cores,
            "allreduce_share": min(p["allreduce_s"] for p in ranks) / r["step_s"],
            "per_rank": ranks} | {
            k: float(np.mean([p[k] for p in ranks])) for k in ("compute_s", "allreduce_s", "update_s")}
        (strong if r["kind"] == "strong" else weak).append(row)
    for row in strong:  # against one rank with one thread: one core's work
        base = find(strong, net=row["net"], dtype=row["dtype"], ranks=1, threads=1)
        row["speedup"] = base["step_s"] / row["step_s"] if base else None
        row["efficiency"] = row["speedup"] / row["cores_used"] if base else None
    weak = [w for w in weak if w["threads"] == 1]
    for row in weak:  # the same per-rank batch should take the same time on more ranks
        base = find(weak, net=row["net"], dtype=row["dtype"], ranks=1)
        row["efficiency"] = base["step_s"] / row["step_s"] if base else None
    return strong, weak


def ranks_vs_threads(strong):
    """For each net: step time of 1 rank x 2 threads over 2 ranks x 1 thread (> 1: ranks win)."""
    out = []
    for r in strong:
        if r["ranks"] == 2 and r["threads"] == 1:
            two_threads = find(strong, net=r["net"], dtype=r["dtype"], ranks=1, threads=2)
            if two_threads:
                out.append({"net": r["net"], "dtype": r["dtype"], "batch": r["batch"],
                            "one_rank_two_threads_s": two_threads["step_s"],
                            "two_ranks_one_thread_s": r["step_s"],
                            "ratio": two_threads["step_s"] / r["step_s"]})
    return out


def calls_per_step(bucket_bytes):
    """Allreduce calls per step: the gradient buffer (+3 statistics) in buckets of bucket_bytes."""
    rows = []
    for name, sizes in (("large", LARGE), ("small", SMALL)):
        n = n_params(sizes) + 3
        for dtype, itemsize in (("float32", 4), ("float64", 8)):
            rows.append({"net": name, "dtype": dtype, "bytes": n * itemsize,
                         "calls": math.ceil(n * itemsize / bucket_bytes)})
    return rows


def scaling_results(mpi, cores, bucket_bytes):
    """Sections 3-4 of the JSON from the merged MPI worker results."""
    strong, weak = scaling_rows(mpi["scaling"], cores)
    det = [dict(r, overhead=r["deterministic_step_s"] / r["default_step_s"] - 1) for r in mpi["trainer"]]
    ranks = mpi["comm"][0]["ranks"] if mpi["comm"] else None
    return ({"strong": strong, "weak": weak, "ranks_vs_threads": ranks_vs_threads(strong),
             "deterministic": det},
            {"ranks": ranks, "bucket_bytes": bucket_bytes, "sweep": mpi["comm"],
             "calls_per_step": calls_per_step(bucket_bytes)})


def ddp_rows(runs, trainer_rows):
    """PyTorch DDP's step (whole epochs, 2 processes x 1 thread) against Trainer.fit's default-mode
    step at 2 ranks on the same net, dtype and global batch (> 1: distnn is faster)."""
    rows = []
    for r in runs:
        ours = [t["default_step_s"] for t in trainer_rows if t["ranks"] == r["ranks"]
                and all(t[k] == r[k] for k in ("net", "dtype", "batch"))]
        if ours:
            rows.append(dict(r, threads=1, distnn_step_s=min(ours),
                             vs_ddp=r["ddp_step_s"] / min(ours)))
    return rows


# ============================================================================ targets

def worst(rows, key, low_is_bad):
    """The row with the worst value of `key` (None values skipped), else None."""
    rows = [r for r in rows if r.get(key) is not None]
    return (min if low_is_bad else max)(rows, key=lambda r: r[key], default=None)


def verdict(name, row, key, goal, at_least):
    """One target's line: row[key] against goal (at least or at most it), or None when not measured."""
    if row is None:
        return None
    value = row[key]
    return {"target": name, "value": value, "goal": goal, "where": config_of(row),
            "pass": bool(value >= goal if at_least else value <= goal)}


def single_targets(res):
    """Sections 1-2's targets: step / roofline, overhead outside BLAS, throughput vs PyTorch."""
    roof, steps = res.get("roofline", []), res.get("steps", [])
    found = []
    for dt in ("float32", "float64"):
        rows = [r for r in roof if r["net"] == "large" and r["threads"] == 1 and r["dtype"] == dt]
        found += [verdict(f"large net, 1 thread, {dt}: step / GEMM roofline",
                          max(rows, key=lambda r: r["batch"], default=None), "step_fraction", 0.92, True),
                  verdict(f"small net, batch 64, {dt}: overhead outside BLAS",
                          find(steps, net="small", batch=64, threads=1, dtype=dt, optimizer="sgd-momentum"),
                          "overhead", 0.15, False)]
    for net, batch, goal in (("large", 512, 1.1), ("small", 64, 3.0), ("small", 512, 2.0)):
        found.append(verdict(f"{net} net, batch {batch}: throughput vs PyTorch",
                             worst([r for r in steps if r["net"] == net and r["batch"] == batch],
                                   "vs_torch", True), "vs_torch", goal, True))
    start = res.get("startup")
    if start:
        start = dict(start, threads=1)
        found += [verdict("start-up, import + first step, empty kernel cache (s)", start, "cold_s", 3.0,
                          False),
                  verdict("start-up, import + first step, warm kernel cache (s)", start, "warm_s", 0.5,
                          False)]
    return found


def scaling_targets(res):
    """Section 3's targets: ranks vs threads, weak scaling, allreduce share, deterministic overhead,
    PyTorch DDP."""
    sc = res.get("scaling", {})
    vs = sc.get("ranks_vs_threads", [])
    det = [r for r in sc.get("deterministic", []) if r["net"] == "large" and r["chunk_size"] == 256]
    found = [
        verdict("2 ranks x 1 thread vs 1 rank x 2 threads (time ratio)",
                worst([dict(r, ranks=2, threads=1) for r in vs], "ratio", True), "ratio", 1.0, True),
        verdict("weak-scaling efficiency at 2 ranks, small net",
                worst([r for r in sc.get("weak", []) if r["ranks"] == 2 and r["net"] == "small"],
                      "efficiency", True), "efficiency", 0.93, True),
        verdict("allreduce share of a step, large net, 2 ranks",
                worst([r for r in sc.get("strong", []) if r["net"] == "large" and r["ranks"] == 2],
                      "allreduce_share", False), "allreduce_share", 0.10, False)]
    for ranks, goal in ((2, 0.08), (1, 0.15)):
        for dt in ("float32", "float64"):
            found.append(verdict(f"deterministic mode overhead, large net {dt}, G = 512, chunk 256, "
                                 f"{ranks} rank(s)",
                                 worst([r for r in det if r["ranks"] == ranks and r["dtype"] == dt],
                                       "overhead", False), "overhead", goal, False))
    for net, goal in (("large", 1.2), ("small", 2.0)):
        found.append(verdict(f"{net} net vs PyTorch DDP (gloo), 2 processes x 1 thread, whole epochs",
                             worst([r for r in sc.get("ddp", []) if r["net"] == net], "vs_ddp", True),
                             "vs_ddp", goal, True))
    return found


def recurrent_targets(res):
    """Section 7's target (issue 18): the recurrent step at least PyTorch's throughput, float32."""
    rows = [r for r in res.get("recurrent", []) if r["dtype"] == "float32"]
    return [verdict("recurrent step vs PyTorch, float32, 1 thread (samples·steps/s ratio)",
                    worst([dict(r, net=rnn_net(r)) for r in rows], "vs_torch", True), "vs_torch",
                    1.0, True)]


def rnn_net(r):
    """A recurrent configuration's short name, e.g. 'rnn 32+128-256-10+128 T32'."""
    s = r["state"]
    return (f"rnn {r['n_in']}+{s}-{'-'.join(map(str, r['hidden']))}-{r['n_out']}+{s} "
            f"T{r['steps']}")


def targets(res):
    """Each speed and deterministic-mode target with the measured value (the worst case measured) and PASS/MISS."""
    return [t for t in single_targets(res) + scaling_targets(res) + recurrent_targets(res)
            if t is not None]


# ============================================================================ the printed report

FORMATS = {"ms": lambda v: f"{v * 1e3:.3f}", "%": lambda v: f"{100 * v:.0f}%"}


def cell(row, key, fmt):
    """row[key] (or key(row)) as text: FORMATS[fmt] or format(value, fmt); '-' when missing."""
    v = key(row) if callable(key) else row.get(key)
    if v is None:
        return "-"
    return FORMATS[fmt](v) if fmt in FORMATS else format(v, fmt)


def table(title, columns, rows):
    """Print rows as right-aligned columns under a title; columns: [(header, key, fmt)]."""
    if not rows:
        return
    cells = [[h for h, _, _ in columns]] + [[cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for c in cells:
        print("  " + "  ".join(s.rjust(w) for s, w in zip(c, widths)))


CONFIG = [("net", "net", ""), ("batch", "batch", ""), ("dtype", "dtype", ""), ("thr", "threads", "")]


def layout(r):
    """A row's ranks x threads, e.g. '2x1', marked when it uses more threads than cores."""
    return f"{r['ranks']}x{r['threads']}" + (" oversubscribed" if r.get("oversubscribed") else "")


def print_header(res):
    """The machine line, a warning when other programs were busy, and the BLAS variables removed."""
    m = res["machine"]
    blas = next((b for b in m.get("blas", []) if b.get("user_api") == "blas"), {})
    print(f"distnn bench ({res['mode']}): {m['cpu']}, {m['cores']} cores; numpy {m['numpy']}, "
          f"{blas.get('internal_api', '?')} {blas.get('version', '?')} ({blas.get('architecture', '?')} "
          f"kernel); {m['mpi']}; torch {m.get('torch') or 'not installed'}")
    busy = m.get("other_load")
    if busy is not None and busy > 0.1:
        print(f"WARNING: other programs kept {busy:.2f} cores busy during this run: the timings are "
              f"not those of a quiet machine")
    removed = m["blas_env_removed_for_workers"]
    if removed:
        pairs = ", ".join(f"{k}={m['blas_env_in_parent'][k]}" for k in removed)
        print(f"note: {pairs} removed from the benchmark's worker processes (--keep-blas-env keeps them)")


def print_single(res):
    """Sections 1-2: the roofline table, the one-gradient line, and the single-process steps."""
    roof, steps = res["roofline"], res["steps"]
    table("1. Roofline: GEMMs of the net's own shapes vs Network.grad_sum and the full step (SGD momentum)",
          CONFIG + [("GFLOP/step", "gflop_per_step", ".3f"), ("GEMM GFLOP/s", "gemm_gflops", ".1f"),
                    ("GEMM ms", "gemm_s", "ms"), ("grad ms", "grad_s", "ms"), ("step ms", "step_s", "ms"),
                    ("grad/roof", "grad_fraction", "%"), ("step/roof", "step_fraction", "%")], roof)
    big = max((r for r in roof if r["net"] == "large" and r["threads"] == 1 and r["dtype"] == "float32"),
              key=lambda r: r["batch"], default=None)
    if big:
        print(f"  one batched gradient, {'-'.join(map(str, big['sizes']))} batch {big['batch']} "
              f"float32 1 thread: {FORMATS['ms'](big['grad_s'])} ms; the same matrix products alone: "
              f"{FORMATS['ms'](big['gemm_s'])} ms (+{FORMATS['%'](big['grad_s'] / big['gemm_s'] - 1)})")

    def adam(r):
        return find(steps, **{k: r[k] for k in ("net", "batch", "dtype", "threads")},
                    optimizer="adam")["samples_per_s"]

    table("2. Single-process step (forward + backward + update), samples/s",
          CONFIG + [("SGD-mom", "samples_per_s", ".0f"), ("Adam", adam, ".0f"),
                    ("outside BLAS", "overhead", "%"), ("torch", "torch_samples_per_s", ".0f"),
                    ("vs torch", "vs_torch", ".2f")],
          [r for r in steps if r["optimizer"] == "sgd-momentum"])


def print_scaling(res):
    """Sections 3-4: strong, weak, ranks vs threads, deterministic mode, and the allreduce sweep."""
    sc, comm = res["scaling"], res["comm"]
    net = [("net", "net", ""), ("dtype", "dtype", ""), ("G", "batch", "")]
    table("3. Strong scaling: same global batch; speed-up vs 1 rank x 1 thread; the fastest step, ms "
          "(phases: mean over ranks)",
          net + [("ranks x thr", layout, ""), ("step ms", "step_s", "ms"),
                 ("samples/s", "samples_per_s", ".0f"), ("speed-up", "speedup", ".2f"),
                 ("eff/core", "efficiency", "%"), ("compute", "compute_s", "ms"),
                 ("allreduce", "allreduce_s", "ms"), ("update", "update_s", "ms"),
                 ("allreduce share", "allreduce_share", "%")], sc["strong"])
    table("   Weak scaling: fixed batch per rank, 1 thread per rank",
          net[:2] + [("per rank", lambda r: r["batch"] // r["ranks"], ""), ("ranks x thr", layout, ""),
                     ("step ms", "step_s", "ms"), ("efficiency", "efficiency", "%")], sc["weak"])
    table("   1 rank x 2 threads vs 2 ranks x 1 thread (same global batch)",
          net + [("1x2 ms", "one_rank_two_threads_s", "ms"), ("2x1 ms", "two_ranks_one_thread_s", "ms"),
                 ("ratio", "ratio", ".2f")], sc["ranks_vs_threads"])
    table("   PyTorch DDP (gloo) vs Trainer.fit, 2 processes x 1 thread, whole epochs: step time",
          net + [("DDP ms", "ddp_step_s", "ms"), ("distnn ms", "distnn_step_s", "ms"),
                 ("vs DDP", "vs_ddp", ".2f")], sc.get("ddp", []))
    table("   Deterministic mode vs default: Trainer.fit step time",
          net + [("ranks x thr", layout, ""), ("chunk", "chunk_size", ""),
                 ("default ms", "default_step_s", "ms"), ("deterministic ms", "deterministic_step_s", "ms"),
                 ("overhead", "overhead", "%")], sc["deterministic"])
    shared = any("shared_s" in r for r in comm["sweep"])
    table(f"4. Allreduce of a float32 buffer at {comm['ranks']} ranks, bus bandwidth 2(P-1)/P bytes/time "
          f"(Comm's buckets of {comm['bucket_bytes'] >> 10} KiB, one MPI call"
          + (", and Comm's node shared-memory sum)" if shared else ")"),
          [("KiB", lambda r: r["bytes"] >> 10, ""), ("bucketed ms", "bucketed_s", "ms"),
           ("GB/s", "bucketed_busbw_GBps", ".2f"), ("one call ms", "one_call_s", "ms"),
           ("GB/s", "one_call_busbw_GBps", ".2f")]
          + ([("shared ms", "shared_s", "ms"), ("GB/s", "shared_busbw_GBps", ".2f")] if shared else []),
          comm["sweep"])
    print("  allreduce calls per step: " + ", ".join(
        f"{r['net']} {r['dtype']} {r['bytes'] / 2**20:.1f} MiB -> {r['calls']}" for r in comm["calls_per_step"]))


def print_startup(res):
    """Section 6: start-up of a fresh training process."""
    r = res.get("startup")
    if not r:
        return
    rows = [dict(r[kind], kind=kind) for kind in ("cold", "warm")]
    table(f"6. Start-up: a fresh process imports distnn (as `distnn train`), builds a Trainer and takes "
          f"one step ({r['net']} net, batch {r['batch']}, {r['dtype']}), s; cold: an empty numba "
          f"cache, warm: best of {r['warm_runs']} runs on it",
          [("cache", "kind", ""), ("import", "import_s", ".3f"), ("first step", "first_step_s", ".3f"),
           ("import + step", lambda x: x["import_s"] + x["first_step_s"], ".3f"),
           ("whole process", "process_s", ".3f")], rows)


def print_memory(res):
    """Section 5: one row per file size and rank."""
    rows = [dict(r, rank=i, **p) for r in res.get("memory", []) for i, p in enumerate(r["per_rank_mb"])]
    table("5. Memory: one epoch from a memory-mapped .npy, MiB (RSS at the end: private and file-backed)",
          [("file", "file_mb", ".0f"), ("shard", "shard_mb", ".0f"), ("rank", "rank", ""),
           ("peak RSS", "peak_rss", ".0f"), ("private before", "anon_rss_before", ".0f"),
           ("private after", "anon_rss", ".0f"), ("file-backed after", "file_rss", ".0f")], rows)


def print_recurrent(res):
    """Section 7: the recurrent step, ours and PyTorch's, and its GEMM roofline."""
    table("7. Recurrent step (BPTT gradient + SGD momentum, targets last), samples·steps/s; "
          "roofline: its matrix products alone",
          [("net", rnn_net, ""), ("N", "batch", ""), ("dtype", "dtype", ""), ("thr", "threads", ""),
           ("step ms", "step_s", "ms"), ("samples·steps/s", "samples_steps_per_s", ".0f"),
           ("torch", "torch_samples_steps_per_s", ".0f"), ("vs torch", "vs_torch", ".2f"),
           ("GEMM GFLOP/s", "gemm_gflops", ".1f"), ("step/roof", "step_fraction", "%")],
          res.get("recurrent", []))


def print_targets(res):
    """The targets with PASS/MISS."""
    table("Targets (printed, never asserted)",
          [("", lambda r: "PASS" if r["pass"] else "MISS", ""), ("target", "target", ""),
           ("measured", "value", ".3f"), ("goal", "goal", ".2f"), ("worst case at", "where", "")],
          res["targets"])


# ============================================================================ the plot

def plot(res, path):
    """Scaling plot: speed-up, the step's phase split, allreduce bandwidth; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    strong, cores = res["scaling"]["strong"], res["machine"]["cores"]
    layouts = sorted({(r["ranks"], r["threads"]) for r in strong}, key=lambda rt: (rt[0] * rt[1], rt))
    names = [f"{r}r x {t}t" + ("*" if r * t > cores else "") for r, t in layouts]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.8))
    plot_speedup(a, strong, layouts, names, cores)
    plot_step_split(b, strong, layouts, names)
    plot_bandwidth(c, res["comm"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# The set-ups on the x axis are categories, not a scale: markers and bars, no lines between them
LAYOUT_AXIS = "set-up: ranks (r) x BLAS threads per rank (t)"


def plot_speedup(ax, strong, layouts, names, cores):
    """Strong-scaling speed-up of each net and dtype per ranks x threads layout, side by side as
    markers, with the ideal as a bar across each layout."""
    x = np.arange(len(layouts))
    series = sorted({(r["net"], r["dtype"]) for r in strong})
    step = 0.6 / max(len(series), 1)  # the markers of one layout spread over 0.6 of its slot
    for i, (net, dt) in enumerate(series):
        rows = [find(strong, net=net, dtype=dt, ranks=r, threads=t) for r, t in layouts]
        y = [np.nan if r is None or r["speedup"] is None else r["speedup"] for r in rows]
        ax.plot(x + (i - (len(series) - 1) / 2) * step, y, "o", label=f"{net} {dt}")
    ax.plot(x, [min(r * t, cores) for r, t in layouts], "k_", markersize=28, markeredgewidth=1.5,
            label="ideal (cores used)")
    ax.set(xticks=x, xticklabels=names, xlabel=LAYOUT_AXIS, ylabel="speed-up vs 1 rank x 1 thread",
           title="strong scaling (* oversubscribed)")
    ax.legend(fontsize=8)


def plot_step_split(ax, strong, layouts, names):
    """Stacked compute / allreduce / update ms per layout, for the first strong-scaling net."""
    x, first = np.arange(len(layouts)), strong[0]
    rows = [find(strong, net=first["net"], dtype=first["dtype"], ranks=r, threads=t) for r, t in layouts]
    bottom = np.zeros(len(rows))
    for key in ("compute_s", "allreduce_s", "update_s"):
        v = np.array([1e3 * r[key] if r else 0.0 for r in rows])
        ax.bar(x, v, bottom=bottom, label=key[:-2])
        bottom += v
    ax.set(xticks=x, xticklabels=names, xlabel=LAYOUT_AXIS, ylabel="ms per step (mean over ranks)",
           title=f"step split: {first['net']} {first['dtype']} G={first['batch']}")
    ax.legend(fontsize=8)


def plot_bandwidth(ax, comm):
    """Allreduce bus bandwidth against buffer size, bucketed and as one MPI call; empty without a sweep."""
    sweep = comm["sweep"]
    if not sweep:
        return
    size = [r["bytes"] for r in sweep]
    ax.semilogx(size, [r["bucketed_busbw_GBps"] for r in sweep], "o-", label="bucketed (Comm)")
    ax.semilogx(size, [r["one_call_busbw_GBps"] for r in sweep], "s--", label="one MPI call")
    shared = [r for r in sweep if "shared_busbw_GBps" in r]  # up to comm.SHARED_MAX_BYTES
    if shared:
        ax.semilogx([r["bytes"] for r in shared], [r["shared_busbw_GBps"] for r in shared], "^-",
                    label="node shared memory (Comm)")
    ax.set(xlabel="buffer bytes", ylabel="bus bandwidth GB/s", title=f"allreduce at {comm['ranks']} ranks")
    ax.legend(fontsize=8)


# ============================================================================ bench.json and the whole report

def finite_or_none(obj):
    """obj with every non-finite float replaced by None, so the JSON stays standard."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_dp(res):
    from .bench_dp import print_dp as dp_section  # its worker's module: imported when printed

    dp_section(res)


def report(res, out):
    """Print the tables and targets; write bench.json and bench.png into out."""
    res["targets"] = targets(res)
    print_header(res)
    if "roofline" in res:
        print_single(res)
    print_scaling(res)
    print_memory(res)
    print_startup(res)
    print_dp(res)
    print_recurrent(res)
    print_targets(res)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(finite_or_none(res), f, indent=1, allow_nan=False)
    png = os.path.join(out, "bench.png")
    made = plot(res, png)
    print(f"\nwrote {os.path.join(out, 'bench.json')}" +
          (f" and {png}" if made else " (no bench.png: matplotlib is not installed; pip install distnn[examples])"))

