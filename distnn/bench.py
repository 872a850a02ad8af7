"""The benchmark suite behind `distnn bench`: roofline, step throughput, scaling, communication, memory.

    distnn bench [--quick] [--scaling] [--repeat N] [--out DIR]     (also: python -m distnn.bench)

One run measures, prints a table and writes DIR/bench.json and DIR/bench.png (the scaling plot):
1. roofline: GEMM GFLOP/s on exactly the net's matrix shapes, and the fraction of it that
   `Network.grad_sum` and the full step (gradient + optimizer update) reach;
2. single-process steps in samples/s (nets x batches x dtypes x BLAS threads x SGD-momentum/Adam),
   the per-step overhead outside BLAS, and the same step in PyTorch when `import torch` works;
3. scaling: the same global batch on P = 1, 2, 4 ranks (BLAS threads = cores // P), weak scaling at
   a fixed per-rank batch, each step split into compute / allreduce / update per rank, and the
   deterministic mode's step-time overhead;
4. communication: allreduce time and bus bandwidth 2(P-1)/P * bytes / time against buffer size;
5. memory: peak RSS per rank when training from a memory-mapped .npy much larger than a shard;
   and a DP-SGD step's time over a plain step's and its extra memory (bench_dp.py);
6. start-up: import + first training step of a fresh process, on an empty and a warm kernel cache;
   and, when `import torch` works, PyTorch DDP (gloo) at 2 processes x 1 thread, whole epochs,
   against Trainer.fit at 2 ranks x 1 thread;
7. the recurrent step (distnn/bench_recurrent.py): a Recurrent's BPTT step in samples·steps/s
   against PyTorch's same unrolled computation and against the GEMM roofline of its products.
Targets are printed PASS/MISS; nothing asserts them. Every time is the best of many calls (other
programs only ever add time), --repeat N keeps each figure's best of N whole runs, and the run
warns when other programs kept the machine busy meanwhile.

This module is the parent side: options, the plan, launching the workers and merging their results;
distnn/bench_report.py derives the figures and prints and writes the report. Every measurement runs
in a worker process (distnn/bench_workers.py, started as `python -m distnn.bench --worker KIND --spec
JSON`, under `mpiexec -n P` for the MPI ones), so the BLAS is loaded fresh with the environment the
benchmark chose: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which pin an older kernel on some machines,
are removed from the workers' environment unless --keep-blas-env (the run says which). Launched under an MPI job of N > 1 ranks
(srun, mpiexec: launch/bench-cluster.sbatch), `distnn bench` measures scaling and communication at
that N with the threads it was given, instead of spawning its own jobs.
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

from . import bench_dp
from . import bench_recurrent
from .bench_report import ddp_rows, report, roofline_rows, scaling_results, step_rows
from .bench_workers import LARGE, SMALL, WORKERS, mpi_worker, worker_main
from .errors import ArgumentParser
from .launcher import NOT_FOUND, find_mpiexec
from .threads import blas_env, threads_in_force, usable_cpus

BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # removed for the workers (see module docstring)
MEMORY_FEATURES = 256  # columns of the memory test's file: float32 rows of 1 KiB


class BenchError(RuntimeError):
    """A worker failed or printed no result; the message holds its command and the end of its stderr."""


# ============================================================================ plans (what to measure)

def plan(quick, cores, ranks):
    """Every measurement of one run, as JSON-able specs for the workers."""
    nets = {"large": LARGE, "small": SMALL}
    single = [{"net": name, "sizes": sizes, "batch": b, "dtype": dt, "threads": t}
              for name, sizes in nets.items()
              for b in ((64,) if quick else (64, 512))
              for dt in (("float32",) if quick else ("float32", "float64"))
              for t in ((1,) if quick else sorted({1, min(2, cores)}))]
    scaling = ([("small", SMALL, "float32")] if quick else
               [("large", LARGE, "float32"), ("large", LARGE, "float64"), ("small", SMALL, "float32")])
    return {
        "seconds": 0.05 if quick else 1.0,  # minimum timed seconds per figure: the best call of them
        "single": single,
        "ranks": ranks,
        "strong": [{"net": n, "sizes": s, "dtype": dt, "batch": 128 if quick else 512}
                   for n, s, dt in scaling],
        "weak": [{"net": n, "sizes": s, "dtype": dt, "per_rank": 64 if quick else 256}
                 for n, s, dt in scaling if dt == "float32"],
        # deterministic mode: chunk 256 is one chunk per rank of G = 512 at P = 2, 64 is four
        "trainer": [{"net": n, "sizes": s, "dtype": dt, "batch": 128 if quick else 512,
                     "steps": st, "chunk_size": c}
                    for n, s, dt, st in ([("small", SMALL, "float32", 4)] if quick else
                                         [("large", LARGE, "float32", 6), ("large", LARGE, "float64", 6),
                                          ("small", SMALL, "float32", 60)])
                    for c in ((32,) if quick else (64, 256))],
        "comm_bytes": [4**k * 1024 for k in range(3, 6 if quick else 9)],  # 64 KiB .. 1 MiB | 64 MiB
        "memory_mb": [8] if quick else [100, 400],
        "memory_batch": 512 if quick else 4096,
        "startup": {"net": "small", "sizes": SMALL, "dtype": "float32", "batch": 64,
                    "warm_runs": 2 if quick else 3},
        "recurrent": recurrent_plan(quick),
        # PyTorch DDP: the nets and batches of Trainer.fit's runs ("trainer"), 2 processes
        "ddp": [{"net": n, "sizes": s, "dtype": dt, "batch": 128 if quick else 512, "steps": st,
                 "epochs": 3}
                for n, s, dt, st in ([("small", SMALL, "float32", 4)] if quick else
                                     [("large", LARGE, "float32", 6), ("large", LARGE, "float64", 6),
                                      ("small", SMALL, "float32", 60)])],
    }


def recurrent_plan(quick):
    """The recurrent step's configurations: n_in inputs, hidden layers, state, n_out classes, T
    steps, N sequences; float32 (PyTorch's usual dtype) on 1 BLAS thread, and float64."""
    if quick:
        return [{"n_in": 8, "hidden": [32], "state": 16, "n_out": 4, "steps": 6, "batch": 16,
                 "dtype": "float32", "threads": 1}]
    return [{"n_in": 32, "hidden": [256], "state": 128, "n_out": 10, "steps": 32, "batch": b,
             "dtype": dt, "threads": 1} for b in (64, 256) for dt in ("float32", "float64")]


# ============================================================================ launching workers

def need_mpiexec():
    """launcher.find_mpiexec's command line, else a BenchError."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise BenchError(f"needs mpiexec: {NOT_FOUND}")
    return mpiexec


def mpi_version(mpiexec):
    """The MPI launcher's name and version from `mpiexec --version` (MPICH's Hydra or Open MPI)."""
    try:
        text = subprocess.run([*mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    version = re.search(r"Version:\s*(\S+)", text)
    if "HYDRA" in text and version:
        return f"MPICH (Hydra) {version.group(1)}"
    return next((line.strip() for line in text.splitlines() if line.strip()), "unknown")


def worker_env(keep_blas_env, threads):
    """The workers' environment: BLAS_ENV removed (unless kept), thread pools sized, distnn importable."""
    env = dict(os.environ)
    if not keep_blas_env:
        for key in BLAS_ENV:
            env.pop(key, None)
    env.update(blas_env(threads))  # the pools start at the size the worker uses
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def launch(kind, spec, env, timeout, ranks=None, mpiexec=None, oversubscribe=False):
    """Run one worker (under `mpiexec -n ranks` when ranks is given); its JSON result."""
    cmd = [sys.executable, "-m", "distnn.bench", "--worker", kind, "--spec", json.dumps(spec)]
    if ranks is not None:
        extra = ["--oversubscribe"] if oversubscribe and "Open MPI" in mpi_version(mpiexec) else []
        cmd = [*mpiexec, "-n", str(ranks), *extra, *cmd]
    where = f"{kind} worker" + (f" on {ranks} ranks" if ranks else "")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{where} did not finish within {timeout} s: {' '.join(cmd[:8])} ...") from None
    lines = proc.stdout.strip().splitlines()
    try:
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
    except json.JSONDecodeError:
        pass
    raise BenchError(f"{where} failed (exit {proc.returncode}): {' '.join(cmd[:8])} ...\n"
                     f"{(proc.stderr or proc.stdout)[-3000:]}")


def best_of(results, key=""):
    """Merge repeated results of one worker: every time (key *_s) its minimum, every rate its maximum."""
    # Other programs on the machine only ever slow a run down, so on a shared machine the best of a
    # few runs is the closest to the code's own speed. A dict under a *_s key holds times too.
    first = results[0]
    if isinstance(first, dict):
        return {k: best_of([r[k] for r in results], key if key.endswith("_s") else k) for k in first}
    if isinstance(first, list):
        return [best_of(list(items), key) for items in zip(*results)]
    if isinstance(first, float) and key.endswith("_s"):
        return min(results)
    if isinstance(first, float) and key.endswith(("gflops", "GBps")):
        return max(results)
    return first


def launched_size():
    """World size when this process is one rank of an MPI job (mpiexec, srun), else 1."""
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


# ============================================================================ the machine

def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_usage():
    """(CPU seconds used by every process on the machine, by this process and its children), or None."""
    # their growth over a run tells how much of the machine other programs took meanwhile
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own


def other_load(start, wall):
    """Average cores' worth of CPU that other programs used since `start` (a cpu_usage()), or None."""
    end = cpu_usage()
    if start is None or end is None or wall <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall)


def machine(mpiexec, keep_blas_env):
    """What the figures were measured on (the workers add their BLAS)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        mpi4py_version = version("mpi4py")
    except PackageNotFoundError:
        mpi4py_version = None
    parent_env = {k: os.environ[k] for k in BLAS_ENV if k in os.environ}
    return {"cpu": cpu_model(), "cores": usable_cpus(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "mpi": mpi_version(mpiexec) if mpiexec else None, "mpi4py": mpi4py_version,
            "blas_env_in_parent": parent_env,
            "blas_env_removed_for_workers": [] if keep_blas_env else sorted(parent_env)}


# ============================================================================ running the sections

def run_single(p, args):
    """Sections 1-2 in one worker process."""
    spec = {"configs": p["single"], "seconds": p["seconds"], "torch": not args.no_torch}
    threads = max(c["threads"] for c in p["single"])
    env = worker_env(args.keep_blas_env, threads)
    return best_of([launch("single", spec, env, args.timeout) for _ in range(args.repeat)])


def rank_threads(ranks, cores):
    """BLAS threads per rank for the scaling runs: cores // P, plus a 1-thread baseline at P = 1."""
    return sorted({1, cores}) if ranks == 1 else [max(1, cores // ranks)]


def scaling_spec(p, ranks, bucket_bytes, threads):
    """What the MPI worker measures at `ranks` ranks: the trainer at P <= 2, the allreduce sweep at 2."""
    runs = ([dict(r, kind="strong") for r in p["strong"]] +
            [dict(r, kind="weak", batch=r["per_rank"] * ranks) for r in p["weak"]])
    return {"threads": threads, "runs": runs, "seconds": p["seconds"], "bucket_bytes": bucket_bytes,
            "trainer": p["trainer"] if ranks <= 2 else [],
            "comm_bytes": p["comm_bytes"] if ranks == 2 else []}


def run_scaling(p, args, cores, mpiexec):
    """Sections 3-4: one `mpiexec -n P` job per rank count; their results merged."""
    merged = {"scaling": [], "trainer": [], "comm": []}
    for ranks in p["ranks"]:
        threads = rank_threads(ranks, cores)
        spec = scaling_spec(p, ranks, args.bucket_bytes, threads)
        env = worker_env(args.keep_blas_env, max(threads))
        out = best_of([launch("mpi", spec, env, args.timeout, ranks=ranks, mpiexec=mpiexec,
                              oversubscribe=ranks > cores) for _ in range(args.repeat)])
        for key in merged:
            merged[key] += out[key]
        merged.setdefault("blas", out["blas"])
    return merged


def write_dataset(folder, megabytes, seed=0):
    """X.npy (float32, MEMORY_FEATURES columns) of about `megabytes` MiB and labels X_y.npy, written in blocks."""
    n = max(1024, megabytes * 2**20 // (4 * MEMORY_FEATURES))
    xpath, ypath = os.path.join(folder, "X.npy"), os.path.join(folder, "X_y.npy")
    X = np.lib.format.open_memmap(xpath, "w+", np.float32, (n, MEMORY_FEATURES))
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 1 << 16):
        hi = min(lo + (1 << 16), n)
        X[lo:hi] = rng.standard_normal((hi - lo, MEMORY_FEATURES), np.float32)
    X.flush()
    del X
    np.save(ypath, rng.integers(0, 10, n))
    return xpath, ypath, os.path.getsize(xpath)


def run_memory(p, args, mpiexec):
    """Section 5: per-rank RSS of a 2-rank training run from memory-mapped files of each size."""
    ranks = min(2, max(p["ranks"]))
    rows = []
    for mb in p["memory_mb"]:
        with tempfile.TemporaryDirectory(prefix="distnn-bench-") as folder:
            xpath, ypath, size = write_dataset(folder, mb)
            spec = {"x": xpath, "y": ypath, "file_bytes": size, "batch": p["memory_batch"]}
            rows.append(launch("memory", spec, worker_env(args.keep_blas_env, 1), args.timeout,
                               ranks=ranks, mpiexec=mpiexec))
    return rows


def run_recurrent(p, args):
    """Section 7: the recurrent step in its own worker (1 BLAS thread)."""
    spec = {"configs": p["recurrent"], "seconds": p["seconds"], "torch": not args.no_torch}
    env = worker_env(args.keep_blas_env, max(c["threads"] for c in p["recurrent"]))
    out = best_of([launch("recurrent", spec, env, args.timeout) for _ in range(args.repeat)])
    return bench_recurrent.rows(out["configs"])


def run_startup(p, args):
    """Section 6: start-up cost, in a worker that starts its own fresh processes."""
    return launch("startup", p["startup"], worker_env(args.keep_blas_env, 1), args.timeout)


def run_ddp(p, args, ranks=2):
    """PyTorch DDP (gloo) on `ranks` processes x 1 thread, or None without torch."""
    if args.no_torch or import_torch_version() is None:
        return None
    env = worker_env(args.keep_blas_env, 1) | {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(ranks),
                                               "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    cmd = [sys.executable, "-m", "distnn.bench", "--worker", "ddp", "--spec", json.dumps({"runs": p["ddp"]})]
    procs = [subprocess.Popen(cmd, env=env | {"RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    outs = [proc.communicate(timeout=args.timeout) for proc in procs]
    if any(proc.returncode for proc in procs):
        err = next(e for proc, (_, e) in zip(procs, outs) if proc.returncode)
        raise BenchError(f"ddp worker failed: {' '.join(cmd[:6])} ...\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def import_torch_version():
    """torch's version if a subprocess can import it, else None (the parent never imports torch)."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


# ============================================================================ main

def run_all(args, argv):
    """Plan, launch every worker, and gather the results (the parent side of a local run)."""
    cores = usable_cpus()
    ranks = args.ranks or ([1, 2] if args.quick else [1, 2, 4])
    p = plan(args.quick, cores, ranks)
    mpiexec = need_mpiexec()
    res = new_result(args, argv, machine(mpiexec, args.keep_blas_env))
    usage, started = cpu_usage(), time.perf_counter()
    if not args.scaling:
        single = run_single(p, args)
        res["machine"] |= {k: single[k] for k in ("blas", "memcpy_GBps", "torch")}
        res["roofline"], res["steps"] = roofline_rows(single["configs"]), step_rows(single["configs"])
    mpi = run_scaling(p, args, cores, mpiexec)
    res["machine"].setdefault("blas", mpi["blas"])
    res["scaling"], res["comm"] = scaling_results(mpi, cores, args.bucket_bytes)
    if not args.scaling:
        res["memory"] = run_memory(p, args, mpiexec)
        res["startup"] = run_startup(p, args)
        res["dp"] = launch("dp", bench_dp.plan(args.quick), worker_env(args.keep_blas_env, 1),
                           args.timeout)
        res["recurrent"] = run_recurrent(p, args)
    ddp = run_ddp(p, args) if 2 in p["ranks"] and usable_cpus() >= 2 else None
    if ddp is not None:
        res["scaling"]["ddp"] = ddp_rows(ddp["runs"], res["scaling"]["deterministic"])
    res["seconds"] = time.perf_counter() - started
    res["machine"]["other_load"] = other_load(usage, res["seconds"])
    return res


def in_job(args, argv):
    """Inside an MPI job of N ranks: scaling and communication at N with the given threads."""
    size, cores = launched_size(), usable_cpus()
    p = plan(args.quick, cores, [size])
    spec = scaling_spec(p, size, args.bucket_bytes, [threads_in_force()])
    out = mpi_worker(spec | {"trainer": p["trainer"], "comm_bytes": p["comm_bytes"]})
    if out is None:
        return None  # not rank 0
    mpiexec = find_mpiexec()  # for its version only: the job was started by the site's launcher
    res = new_result(args, argv, machine(mpiexec, keep_blas_env=True) | {"blas": out["blas"]})
    res["scaling"], res["comm"] = scaling_results(out, cores, args.bucket_bytes)
    return res


def new_result(args, argv, machine_info):
    """The JSON document's head."""
    mode = "quick" if args.quick else "full"
    return {"schema": 1, "mode": mode + (" scaling" if args.scaling else ""),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv), "machine": machine_info}


def rank_list(text):
    """'1,2,4' -> [1, 2, 4], for --ranks."""
    try:
        ranks = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rank counts like 1,2,4, got {text!r}") from None
    if ranks[0] < 1:
        raise argparse.ArgumentTypeError(f"rank counts must be >= 1, got {text!r}")
    return ranks


def parse_args(argv):
    """`distnn bench`'s options (--worker and --spec, hidden, start a worker process)."""
    p = ArgumentParser(prog="distnn bench", description="distnn's benchmark suite: roofline, "
                       "step throughput, scaling, communication and memory; table + JSON + PNG.")
    p.add_argument("--quick", action="store_true",
                   help="tiny configurations and P = 1, 2 only: under a minute on 2 cores (CI's smoke test)")
    p.add_argument("--scaling", action="store_true", help="only the scaling and communication sections")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png (default bench-out)")
    p.add_argument("--ranks", type=rank_list, help="rank counts to scale over (default 1,2,4; --quick 1,2)")
    p.add_argument("--bucket-bytes", type=int, default=4 << 20,
                   help="allreduce bucket size, as Trainer's bucket_bytes (default 4 MiB)")
    p.add_argument("--keep-blas-env", action="store_true",
                   help=f"keep {' and '.join(BLAS_ENV)} in the workers' environment")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every measurement N times and keep each figure's best (on a shared machine)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per worker process")
    p.add_argument("--worker", choices=sorted(WORKERS | bench_recurrent.WORKERS),
                   help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    """`distnn bench`: run the suite, print the report, write the files; 0 on success, 1 on failure."""
    args = parse_args(argv)
    if args.worker in bench_recurrent.WORKERS:
        return bench_recurrent.worker_main(args.worker, args.spec)
    if args.worker:
        return worker_main(args.worker, args.spec)
    try:
        res = in_job(args, argv) if launched_size() > 1 else run_all(args, argv)
    except BenchError as e:
        print(f"distnn bench: {e}", file=sys.stderr)
        return 1
    if res is not None:
        report(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
