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
5. memory: peak RSS per rank when training from a memory-mapped .npy much larger than a shard.
Targets are printed PASS/MISS; nothing asserts them. Every time is the best of many calls (other
programs only ever add time), --repeat N keeps each figure's best of N whole runs, and the run
warns when other programs kept the machine busy meanwhile.

The parent process only plans, launches and reports. Every measurement runs in a worker process
(`python -m distnn.bench --worker KIND --spec JSON`, under `mpiexec -n P` for the MPI ones), so the
BLAS is loaded fresh with the environment the benchmark chose: OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, which pin an older kernel on some machines, are removed from the workers'
environment unless --keep-blas-env (the run says which). Launched under an MPI job of N > 1 ranks
(srun, mpiexec: launch/bench-cluster.sbatch), `distnn bench` measures scaling and communication at
that N with the threads it was given, instead of spawning its own jobs.
"""

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

from . import data, optim
from .network import Network
from .threads import blas_env, usable_cpus

BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # removed for the workers (see module docstring)
LARGE, SMALL = [784, 1024, 1024, 10], [64, 128, 128, 10]
OPTIMIZERS = {"sgd-momentum": lambda: optim.SGD(lr=0.01, momentum=0.9),
              "adam": lambda: optim.Adam(lr=1e-3)}
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
        "trainer": [{"net": n, "sizes": s, "dtype": "float32", "batch": 128 if quick else 512,
                     "steps": st, "chunk_size": c}
                    for n, s, st in ([("small", SMALL, 4)] if quick else
                                     [("large", LARGE, 6), ("small", SMALL, 60)])
                    for c in ((32,) if quick else (32, 128))],
        "comm_bytes": [4**k * 1024 for k in range(3, 6 if quick else 9)],  # 64 KiB .. 1 MiB | 64 MiB
        "memory_mb": [8] if quick else [100, 400],
        "memory_batch": 512 if quick else 4096,
    }


def step_flops(sizes, batch):
    """FLOPs of one step: forward 2·weights, backward 4·weights less the input layer's dX, per sample."""
    weights = sum(o * i for i, o in zip(sizes[:-1], sizes[1:]))
    return batch * (6 * weights - 2 * sizes[0] * sizes[1])


# ============================================================================ timing

def timeit(fn, min_s, min_reps=5):
    """Seconds of the fastest call of fn, after two warm-up calls, over >= min_reps calls and min_s.

    The best of many: other programs on the machine only ever add time to a call."""
    fn()
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def blas_threads(n):
    """Context manager limiting the BLAS (and OpenMP) pools of this process to n threads."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=n)


def synthetic_batch(net, n, seed):
    """(X, Y): n standard-normal rows in the net's dtype and encoded random class labels."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, net.sizes[0])).astype(net.dtype)
    labels = rng.integers(0, net.sizes[-1], n)
    return X, net.check_targets(labels), labels


# ============================================================================ worker: single process

def gemm_ops(net, n, seed=0):
    """The matrix products of one step for batch n, on arrays laid out as Network lays out its own.

    Per layer l: forward Z_l = I_l W_lᵀ (n, out) with I_l = Z_{l-1}; backward Wgrad = P_lᵀ I_l
    (out, in) into layer l's view of a flat gradient vector; dX = P_l W_l (n, in) into P_{l-1} for
    l > 0. Returns [(kind, l, a, b, out, flops)], every array filled by one pass already."""
    rng = np.random.default_rng(seed)
    grad, g_w, at = net.grad_buffer(), [], 0
    for w in net.weights:  # layout [W_0, b_0, W_1, b_1, ...]
        g_w.append(grad[at:at + w.size].reshape(w.shape))
        at += w.size + w.shape[0]
    outs = [np.empty((n, k), net.dtype) for k in net.sizes[1:]]
    ins = [rng.standard_normal((n, net.sizes[0])).astype(net.dtype)] + outs[:-1]
    deltas = [rng.standard_normal((n, k)).astype(net.dtype) for k in net.sizes[1:]]
    ops = [("forward", l, ins[l], w.T, outs[l], 2 * n * w.size) for l, w in enumerate(net.weights)]
    for l in range(len(net.weights) - 1, -1, -1):
        w = net.weights[l]
        ops.append(("wgrad", l, deltas[l].T, ins[l], g_w[l], 2 * n * w.size))
        if l > 0:
            ops.append(("dx", l, deltas[l], w, deltas[l - 1], 2 * n * w.size))
    run_ops(ops)
    return ops


def run_ops(ops):
    """All the step's matrix products, nothing else."""
    for _, _, a, b, out, _ in ops:
        np.matmul(a, b, out=out)


def local_step(net, opt, X, Y, grad):
    """One single-process step as the trainer takes it: gradient sum, mean, optimizer update."""
    net.grad_sum(X, Y, grad)
    grad /= len(X)
    opt.step(net.params, grad)


def measure_config(c, min_s, torch):
    """Roofline, gradient and step timings (and PyTorch's step) for one net/batch/dtype/threads."""
    net = Network(c["sizes"], dtype=c["dtype"], seed=0)
    X, Y, labels = synthetic_batch(net, c["batch"], seed=1)
    ops = gemm_ops(net, c["batch"])
    layers = [{"kind": kind, "layer": l, "shape": [a.shape[0], a.shape[1], b.shape[1]],
               "gflops": flops / timeit(lambda a=a, b=b, o=o: np.matmul(a, b, out=o), min_s / 4) / 1e9}
              for kind, l, a, b, o, flops in ops]
    grad = net.grad_buffer()
    result = dict(c, flops=step_flops(c["sizes"], c["batch"]), layers=layers,
                  gemm_s=timeit(lambda: run_ops(ops), min_s),
                  grad_s=timeit(lambda: net.grad_sum(X, Y, grad), min_s), step_s={})
    for name, make in OPTIMIZERS.items():
        net.init_params(0)
        opt = make()
        opt.init(net.params)
        result["step_s"][name] = timeit(lambda: local_step(net, opt, X, Y, grad), min_s)
    if torch is not None:
        result["torch_step_s"] = torch_step_s(torch, c, X, labels, min_s)
    return result


def torch_step_s(torch, c, X, labels, min_s):
    """The same step in PyTorch: Linear+ReLU, CrossEntropyLoss, SGD momentum, same threads and dtype."""
    torch.set_num_threads(c["threads"])
    nn, sizes = torch.nn, c["sizes"]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(getattr(torch, c["dtype"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.from_numpy(X), torch.from_numpy(labels)

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return timeit(step, min_s)


def memcpy_gbps(nbytes=64 << 20):
    """Memory copy rate (read + write bytes per second / 1e9) of a large buffer, for scale."""
    src, dst = np.ones(nbytes // 8), np.empty(nbytes // 8)
    return 2 * nbytes / timeit(lambda: np.copyto(dst, src), 0.1) / 1e9


def import_torch():
    """torch if it imports, else None (it is optional and never a dependency)."""
    try:
        import torch
    except Exception:
        return None
    return torch


def single_worker(spec):
    """Worker for section 1 and 2: every single-process config of the plan."""
    from threadpoolctl import threadpool_info
    torch = import_torch() if spec["torch"] else None
    out = {"blas": threadpool_info(), "memcpy_GBps": memcpy_gbps(),
           "torch": None if torch is None else torch.__version__, "configs": []}
    for c in spec["configs"]:
        with blas_threads(c["threads"]):
            out["configs"].append(measure_config(c, spec["seconds"], torch))
    return out


# ============================================================================ worker: MPI ranks

def agreed_reps(comm, fn, min_s):
    """Warm fn up and pick a repetition count from the slowest rank's call time, the same on all ranks."""
    fn()
    t0 = time.perf_counter()
    fn()
    fn()
    slowest = np.array([(time.perf_counter() - t0) / 2])
    comm.allreduce_max(slowest, "bench: timing")
    return int(min(max(math.ceil(min_s / max(slowest[0], 1e-9)), 5), 5000))


def per_rank(comm, values):
    """Every rank's values as a (size, len(values)) array, the same on every rank."""
    table = np.zeros((comm.size, len(values)))
    table[comm.rank] = values
    comm.allreduce(table.reshape(-1), "bench: gather")
    return table


def dist_step(net, opt, comm, X, Y, buf, global_batch):
    """One data-parallel step as the trainer takes it; (compute, allreduce, update) seconds."""
    n = net.n_params
    t0 = time.perf_counter()
    buf[n] = net.grad_sum(X, Y, buf[:n])
    t1 = time.perf_counter()
    comm.allreduce(buf, "bench: step")
    t2 = time.perf_counter()
    grad = buf[:n]
    grad /= global_batch
    opt.step(net.params, grad)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def scaling_run(comm, run, min_s):
    """Time the step loop on this communicator for one net and global batch; per-rank phase split.

    The step reported is the fastest (as in timeit) by its slowest rank's wall time; every rank
    gives its (wall, compute, allreduce, update) seconds of that same step."""
    net = Network(run["sizes"], dtype=run["dtype"], seed=0)
    a, b = data.shard(0, run["batch"], comm.size, comm.rank)
    X, Y, _ = synthetic_batch(net, b - a, seed=1 + comm.rank)
    opt = OPTIMIZERS["sgd-momentum"]()
    opt.init(net.params)
    buf = np.zeros(net.n_params + 3, net.dtype)  # gradient + the trainer's 3 riding statistics
    step = lambda: dist_step(net, opt, comm, X, Y, buf, run["batch"])  # noqa: E731
    reps = agreed_reps(comm, step, min_s)
    times = np.empty((reps, 4))  # per step: wall, compute, allreduce, update
    comm.barrier()
    for i in range(reps):
        t0 = time.perf_counter()
        times[i, 1:] = step()
        times[i, 0] = time.perf_counter() - t0
    walls = times[:, 0].copy()
    comm.allreduce_max(walls, "bench: step times")
    best = int(np.argmin(walls))  # the same step on every rank
    table = per_rank(comm, times[best])
    return dict(run, ranks=comm.size, steps=reps, step_s=float(walls[best]),
                per_rank=[dict(zip(("step_s", "compute_s", "allreduce_s", "update_s"), map(float, r)))
                          for r in table])


def trainer_run(comm, run):
    """Trainer.fit step time in default and deterministic mode (SGD momentum; fastest epoch after the first)."""
    from .trainer import Trainer
    rng = np.random.default_rng(0)
    n = run["batch"] * run["steps"]
    X = rng.standard_normal((n, run["sizes"][0])).astype(run["dtype"])
    y = rng.integers(0, run["sizes"][-1], n)
    out = dict(run, ranks=comm.size)
    for mode in ("default", "deterministic"):
        net = Network(run["sizes"], dtype=run["dtype"], seed=0)
        trainer = Trainer(net, OPTIMIZERS["sgd-momentum"](), batch_size=run["batch"], epochs=4,
                          seed=0, comm=comm, deterministic=mode == "deterministic",
                          chunk_size=run["chunk_size"])
        history = trainer.fit(X, y)[1:]  # epoch 1 allocates the buffers
        out[f"{mode}_step_s"] = min(h["seconds"] for h in history) / run["steps"]
    return out


def comm_sweep(comm, sizes, min_s):
    """Allreduce seconds of a float32 buffer per size: in Comm's buckets and as one MPI call."""
    from .comm import Comm
    rows = []
    for nbytes in sizes:
        buf = np.zeros(nbytes // 4, np.float32)  # zeros: repeated sums stay finite
        row = {"bytes": nbytes, "ranks": comm.size}
        for key, bucket in (("bucketed", comm.bucket_bytes), ("one_call", nbytes)):
            c = Comm(comm.comm, bucket_bytes=bucket)
            call = lambda: c.allreduce(buf, "bench: sweep")  # noqa: E731
            reps = agreed_reps(comm, call, min_s)
            seconds = np.empty(reps)
            comm.barrier()
            for i in range(reps):
                t0 = time.perf_counter()
                call()
                seconds[i] = time.perf_counter() - t0
            comm.allreduce_max(seconds, "bench: sweep times")  # a call lasts until its last rank is done
            row[f"{key}_s"] = float(seconds.min())
            row[f"{key}_busbw_GBps"] = 2 * (comm.size - 1) / comm.size * nbytes / seconds.min() / 1e9
        rows.append(row)
    return rows


def mpi_worker(spec):
    """Worker for sections 3 and 4 on every rank of this job; rank 0's return value is printed."""
    from .comm import install_excepthook, world
    comm = world(bucket_bytes=spec["bucket_bytes"])
    install_excepthook(comm)  # a failing rank ends the job instead of hanging the others
    from threadpoolctl import threadpool_info
    out = {"ranks": comm.size, "blas": threadpool_info(), "scaling": [], "trainer": [], "comm": []}
    for t in spec["threads"]:
        with blas_threads(t):
            out["scaling"] += [dict(scaling_run(comm, run, spec["seconds"]), threads=t)
                               for run in spec["runs"]]
    with blas_threads(spec["threads"][-1]):  # the standard layout only: cores // P threads
        out["trainer"] = [dict(trainer_run(comm, run), threads=spec["threads"][-1])
                          for run in spec["trainer"]]
    if spec["comm_bytes"]:
        with blas_threads(1):
            out["comm"] = comm_sweep(comm, spec["comm_bytes"], spec["seconds"])
    return out if comm.is_root else None


def proc_status():
    """(RssAnon, RssFile) of this process in bytes from /proc/self/status; zeros where absent."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0.0, 0.0
    return tuple(float(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


def memory_worker(spec):
    """Train one epoch from a memory-mapped .npy on every rank; per-rank peak and current RSS."""
    from .comm import install_excepthook, world
    from .trainer import Trainer
    comm = world()
    install_excepthook(comm)
    before = proc_status()
    ds = data.load(spec["x"], target=spec["y"])
    net = Network([ds.X.shape[1], 64, 10], dtype="float32", seed=0)
    Trainer(net, OPTIMIZERS["sgd-momentum"](), batch_size=spec["batch"], epochs=1, seed=0,
            comm=comm).fit(ds.X, ds.y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    table = per_rank(comm, [peak, *proc_status(), *before])
    keys = ("peak_rss", "anon_rss", "file_rss", "anon_rss_before", "file_rss_before")
    rows = [{k: float(v) / 2**20 for k, v in zip(keys, r)} for r in table]
    if not comm.is_root:
        return None
    return {"ranks": comm.size, "file_mb": spec["file_bytes"] / 2**20,
            "shard_mb": spec["file_bytes"] / 2**20 / comm.size, "per_rank_mb": rows}


WORKERS = {"single": single_worker, "mpi": mpi_worker, "memory": memory_worker}


def worker_main(kind, spec):
    """Entry of a worker process: run one kind of measurement and print its JSON on stdout."""
    result = WORKERS[kind](json.loads(spec))
    if result is not None:
        print(json.dumps(result, default=float), flush=True)
    return 0


# ============================================================================ launching workers

def find_mpiexec():
    """$MPIEXEC, else the mpiexec next to this python (a venv with distnn[mpich]), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = os.environ.get("MPIEXEC") or (beside if os.access(beside, os.X_OK) else shutil.which("mpiexec"))
    if not found:
        raise BenchError("no mpiexec next to this python or on PATH (install distnn[mpich], or set MPIEXEC)")
    return found


def mpi_version(mpiexec):
    """The MPI launcher's name and version from `mpiexec --version` (MPICH's Hydra or Open MPI)."""
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
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
        cmd = [mpiexec, "-n", str(ranks), *extra, *cmd]
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
    """Merge repeated results of one worker: every time (key *_s) its minimum, every rate its maximum.

    Other programs on the machine only ever slow a run down, so on a shared machine the best of a
    few runs is the closest to the code's own speed. A dict under a *_s key holds times too."""
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
    """(CPU seconds used by every process on the machine, by this process and its children), or None.

    Their growth over a run tells how much of the machine other programs took meanwhile."""
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
        n = sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:])) + 3
        for dtype, itemsize in (("float32", 4), ("float64", 8)):
            rows.append({"net": name, "dtype": dtype, "bytes": n * itemsize,
                         "calls": math.ceil(n * itemsize / bucket_bytes)})
    return rows


# ============================================================================ targets

def worst(rows, key, low_is_bad):
    """The row with the worst value of `key` (None values skipped), else None."""
    rows = [r for r in rows if r.get(key) is not None]
    return (min if low_is_bad else max)(rows, key=lambda r: r[key], default=None)


def targets(res):
    """Each issue-6/7 target with the measured value (the worst case measured) and PASS/MISS."""
    found = []

    def add(name, row, key, goal, at_least):
        if row is not None:
            value = row[key]
            found.append({"target": name, "value": value, "goal": goal, "where": config_of(row),
                          "pass": bool(value >= goal if at_least else value <= goal)})

    roof, steps = res.get("roofline", []), res.get("steps", [])
    for dt in ("float32", "float64"):
        rows = [r for r in roof if r["net"] == "large" and r["threads"] == 1 and r["dtype"] == dt]
        add(f"large net, 1 thread, {dt}: step / GEMM roofline",
            max(rows, key=lambda r: r["batch"], default=None), "step_fraction", 0.85, True)
        add(f"small net, batch 64, {dt}: overhead outside BLAS",
            find(steps, net="small", batch=64, threads=1, dtype=dt, optimizer="sgd-momentum"),
            "overhead", 0.25, False)
    for net, goal in (("large", 1.0), ("small", 2.0)):
        add(f"{net} net: throughput vs PyTorch", worst([r for r in steps if r["net"] == net],
                                                         "vs_torch", True), "vs_torch", goal, True)
    sc = res.get("scaling", {})
    vs = sc.get("ranks_vs_threads", [])
    add("2 ranks x 1 thread vs 1 rank x 2 threads (time ratio)",
        worst([dict(r, ranks=2, threads=1) for r in vs], "ratio", True), "ratio", 1.0, True)
    add("weak-scaling efficiency at 2 ranks",
        worst([r for r in sc.get("weak", []) if r["ranks"] == 2], "efficiency", True),
        "efficiency", 0.90, True)
    add("allreduce share of a step, large net, 2 ranks",
        worst([r for r in sc.get("strong", []) if r["net"] == "large" and r["ranks"] == 2],
              "allreduce_share", False), "allreduce_share", 0.10, False)
    add("deterministic mode step-time overhead, large net, chunk 32",
        worst([r for r in sc.get("deterministic", []) if r["net"] == "large" and r["chunk_size"] == 32],
              "overhead", False),
        "overhead", 0.15, False)
    return found


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
    return f"{r['ranks']}x{r['threads']}" + (" oversubscribed" if r.get("oversubscribed") else "")


def print_header(res):
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
    roof, steps = res["roofline"], res["steps"]
    table("1. Roofline: GEMMs of the net's own shapes vs Network.grad_sum and the full step (SGD momentum)",
          CONFIG + [("GFLOP/step", "gflop_per_step", ".3f"), ("GEMM GFLOP/s", "gemm_gflops", ".1f"),
                    ("GEMM ms", "gemm_s", "ms"), ("grad ms", "grad_s", "ms"), ("step ms", "step_s", "ms"),
                    ("grad/roof", "grad_fraction", "%"), ("step/roof", "step_fraction", "%")], roof)
    big = max((r for r in roof if r["net"] == "large" and r["threads"] == 1 and r["dtype"] == "float32"),
              key=lambda r: r["batch"], default=None)
    if big:
        print(f"  issue 2: one batched gradient, {'-'.join(map(str, big['sizes']))} batch {big['batch']} "
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
    table("   Deterministic mode vs default: Trainer.fit step time",
          net + [("ranks x thr", layout, ""), ("chunk", "chunk_size", ""),
                 ("default ms", "default_step_s", "ms"), ("deterministic ms", "deterministic_step_s", "ms"),
                 ("overhead", "overhead", "%")], sc["deterministic"])
    table(f"4. Allreduce of a float32 buffer at {comm['ranks']} ranks, bus bandwidth 2(P-1)/P bytes/time "
          f"(Comm's buckets of {comm['bucket_bytes'] >> 10} KiB, and one MPI call)",
          [("KiB", lambda r: r["bytes"] >> 10, ""), ("bucketed ms", "bucketed_s", "ms"),
           ("GB/s", "bucketed_busbw_GBps", ".2f"), ("one call ms", "one_call_s", "ms"),
           ("GB/s", "one_call_busbw_GBps", ".2f")], comm["sweep"])
    print("  allreduce calls per step: " + ", ".join(
        f"{r['net']} {r['dtype']} {r['bytes'] / 2**20:.1f} MiB -> {r['calls']}" for r in comm["calls_per_step"]))


def print_memory(res):
    rows = [dict(r, rank=i, **p) for r in res.get("memory", []) for i, p in enumerate(r["per_rank_mb"])]
    table("5. Memory: one epoch from a memory-mapped .npy, MiB (RSS at the end: private and file-backed)",
          [("file", "file_mb", ".0f"), ("shard", "shard_mb", ".0f"), ("rank", "rank", ""),
           ("peak RSS", "peak_rss", ".0f"), ("private before", "anon_rss_before", ".0f"),
           ("private after", "anon_rss", ".0f"), ("file-backed after", "file_rss", ".0f")], rows)


def print_targets(res):
    table("Targets (printed, never asserted)",
          [("", lambda r: "PASS" if r["pass"] else "MISS", ""), ("target", "target", ""),
           ("measured", "value", ".3f"), ("goal", "goal", ".2f"), ("worst case at", "where", "")],
          res["targets"])


# ============================================================================ the plot

def plot(res, path):
    """Scaling plot: speed-up per configuration, the step's phase split, allreduce bandwidth."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    strong, sweep = res["scaling"]["strong"], res["comm"]["sweep"]
    labels = sorted({(r["ranks"], r["threads"]) for r in strong}, key=lambda rt: (rt[0] * rt[1], rt))
    names = [f"{r}r x {t}t" + ("*" if r * t > res["machine"]["cores"] else "") for r, t in labels]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.8))
    x = np.arange(len(labels))
    for net, dt in sorted({(r["net"], r["dtype"]) for r in strong}):
        rows = [find(strong, net=net, dtype=dt, ranks=r, threads=t) for r, t in labels]
        y = [np.nan if r is None or r["speedup"] is None else r["speedup"] for r in rows]
        a.plot(x, y, "o-", label=f"{net} {dt}")
    a.plot(x, [min(r * t, res["machine"]["cores"]) for r, t in labels], "k--", label="ideal (cores used)")
    a.set(xticks=x, xticklabels=names, ylabel="speed-up vs 1 rank x 1 thread",
          title="strong scaling (* oversubscribed)")
    a.legend(fontsize=8)
    first = strong[0]
    rows = [find(strong, net=first["net"], dtype=first["dtype"], ranks=r, threads=t) for r, t in labels]
    bottom = np.zeros(len(rows))
    for key in ("compute_s", "allreduce_s", "update_s"):
        v = np.array([1e3 * r[key] if r else 0.0 for r in rows])
        b.bar(x, v, bottom=bottom, label=key[:-2])
        bottom += v
    b.set(xticks=x, xticklabels=names, ylabel="ms per step (mean over ranks)",
          title=f"step split: {first['net']} {first['dtype']} G={first['batch']}")
    b.legend(fontsize=8)
    if sweep:
        size = [r["bytes"] for r in sweep]
        c.semilogx(size, [r["bucketed_busbw_GBps"] for r in sweep], "o-", label="bucketed (Comm)")
        c.semilogx(size, [r["one_call_busbw_GBps"] for r in sweep], "s--", label="one MPI call")
        c.set(xlabel="buffer bytes", ylabel="bus bandwidth GB/s",
              title=f"allreduce at {res['comm']['ranks']} ranks")
        c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ============================================================================ main

def scaling_results(mpi, cores, bucket_bytes):
    """Sections 3-4 of the JSON from the merged MPI worker results."""
    strong, weak = scaling_rows(mpi["scaling"], cores)
    det = [dict(r, overhead=r["deterministic_step_s"] / r["default_step_s"] - 1) for r in mpi["trainer"]]
    ranks = mpi["comm"][0]["ranks"] if mpi["comm"] else None
    return ({"strong": strong, "weak": weak, "ranks_vs_threads": ranks_vs_threads(strong),
             "deterministic": det},
            {"ranks": ranks, "bucket_bytes": bucket_bytes, "sweep": mpi["comm"],
             "calls_per_step": calls_per_step(bucket_bytes)})


def run_all(args, argv):
    """Plan, launch every worker, and gather the results (the parent side of a local run)."""
    cores = usable_cpus()
    ranks = args.ranks or ([1, 2] if args.quick else [1, 2, 4])
    p = plan(args.quick, cores, ranks)
    mpiexec = find_mpiexec()
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
    res["seconds"] = time.perf_counter() - started
    res["machine"]["other_load"] = other_load(usage, res["seconds"])
    return res


def in_job(args, argv):
    """Inside an MPI job of N ranks: scaling and communication at N with the given threads."""
    from threadpoolctl import threadpool_info
    size, cores = launched_size(), usable_cpus()
    p = plan(args.quick, cores, [size])
    threads = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)
    spec = scaling_spec(p, size, args.bucket_bytes, [threads])
    out = mpi_worker(spec | {"trainer": p["trainer"], "comm_bytes": p["comm_bytes"]})
    if out is None:
        return None  # not rank 0
    try:
        mpiexec = find_mpiexec()  # for its version only: the job was started by the site's launcher
    except BenchError:
        mpiexec = None
    res = new_result(args, argv, machine(mpiexec, keep_blas_env=True) | {"blas": out["blas"]})
    res["scaling"], res["comm"] = scaling_results(out, cores, args.bucket_bytes)
    return res


def new_result(args, argv, machine_info):
    """The JSON document's head."""
    mode = "quick" if args.quick else "full"
    return {"schema": 1, "mode": mode + (" scaling" if args.scaling else ""),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv), "machine": machine_info}


def finite_or_none(obj):
    """obj with every non-finite float replaced by None, so the JSON stays standard."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def report(res, out):
    """Print the tables and targets; write bench.json and bench.png into out."""
    res["targets"] = targets(res)
    print_header(res)
    if "roofline" in res:
        print_single(res)
    print_scaling(res)
    print_memory(res)
    print_targets(res)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(finite_or_none(res), f, indent=1, allow_nan=False)
    png = os.path.join(out, "bench.png")
    made = plot(res, png)
    print(f"\nwrote {os.path.join(out, 'bench.json')}" +
          (f" and {png}" if made else " (no bench.png: matplotlib is not installed; pip install distnn[examples])"))


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
    p = argparse.ArgumentParser(prog="distnn bench", description="distnn's benchmark suite: roofline, "
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
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    """`distnn bench`: run the suite, print the report, write the files; 0 on success, 1 on failure."""
    args = parse_args(argv)
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
