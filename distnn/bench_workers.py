"""What runs inside the benchmark's worker processes: the nets measured, the timing loops, and the workers.

    python -m distnn.bench --worker single|mpi|memory --spec JSON     (started by `distnn bench`)

`single` times GEMMs on the net's own shapes, the gradient, the step and PyTorch's step in one
process; `mpi` runs on every rank of an `mpiexec -n P` job (data-parallel steps split into phases,
Trainer.fit in default and deterministic mode, the allreduce sweep); `memory` trains one epoch from
a memory-mapped .npy and reports each rank's RSS; `startup` times fresh processes from their start
to the end of their first training step, on an empty kernel cache and on a warm one; `ddp` is one
rank of PyTorch DistributedDataParallel (gloo) training whole epochs, for the comparison. Each prints its result as one JSON line on stdout
(the MPI ones from rank 0 only); distnn/bench.py plans their specs and reads that line back.
"""

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import data, optim
from . import network
from .network import Network

# the nets measured: MNIST-shaped (its step is GEMM-bound) and small (the overhead outside BLAS shows)
LARGE, SMALL = [784, 1024, 1024, 10], [64, 128, 128, 10]
OPTIMIZERS = {"sgd-momentum": lambda: optim.SGD(lr=0.01, momentum=0.9),
              "adam": lambda: optim.Adam(lr=1e-3)}


def step_flops(sizes, batch):
    """FLOPs of one step: forward 2·weights, backward 4·weights less the input layer's dX, per sample."""
    weights = sum(o * i for o, i in network.layer_shapes(sizes))
    return batch * (6 * weights - 2 * sizes[0] * sizes[1])


# ============================================================================ timing

def timeit(fn, min_s, min_reps=5):
    """Seconds of the fastest call of fn, after two warm-up calls, over >= min_reps calls and min_s."""
    # the best of many: other programs on the machine only ever add time to a call
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
    """The step's matrix products for batch n as [(kind, l, a, b, out, flops)], laid out as Network's own."""
    # Per layer l: forward Z_l = I_l W_lᵀ (n, out) with I_l = Z_{l-1}; backward Wgrad = P_lᵀ I_l
    # (out, in) into layer l's view of a flat gradient vector; dX = P_l W_l (n, in) into P_{l-1} for
    # l > 0. Every array is filled by one pass before returning.
    rng = np.random.default_rng(seed)
    grad, g_w, at = net.grad_buffer(), [], 0
    for w in net.weights:  # layout [W_0, b_0, W_1, b_1, ...]
        g_w.append(grad[at:at + w.size].reshape(w.shape))
        at += w.size + w.shape[0]
    hidden, k = net.sizes[1:-1], net.sizes[-1]
    outs = [np.empty((n, h), net.dtype) for h in hidden] + [np.empty((k, n), net.dtype).T]
    ins = [rng.standard_normal((n, net.sizes[0])).astype(net.dtype)] + outs[:-1]
    deltas = [rng.standard_normal((n, h)).astype(net.dtype) for h in hidden]
    deltas.append(rng.standard_normal((k, n)).astype(net.dtype).T)  # the output layer's layout
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
    net.grad_sum(X, Y, grad, divisor=len(X))
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
                  grad_s=timeit(lambda: net.grad_sum(X, Y, grad, divisor=len(X)), min_s), step_s={})
    for name, make in OPTIMIZERS.items():
        net.init_params(0)
        opt = make()
        opt.init(net.params)
        opt.threads = c["threads"]  # as Trainer.fit sets it
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


def timed(obj, name, clock, key):
    """Wrap the method obj.name so that its calls add their seconds to clock[key]."""
    method = getattr(obj, name)

    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - t0

    setattr(obj, name, call)  # an instance attribute: shadows the method for this object only


def trainer_step(comm, run, threads):
    """step() -> (compute, allreduce, update) seconds of one Trainer step on the global batch."""
    # Trainer.train_batch, as fit calls it: every rank holds the whole global batch and takes its
    # shard. Compute is gathering the rows and their gradient; the sum is what the step takes
    # besides compute and the update (on one node each rank updates only its share of the
    # parameters, inside the shared-memory sum).
    from .trainer import Trainer
    net = Network(run["sizes"], dtype=run["dtype"], seed=0)
    X, Y, _ = synthetic_batch(net, run["batch"], seed=1)
    trainer = Trainer(net, OPTIMIZERS["sgd-momentum"](), batch_size=run["batch"], epochs=1,
                      comm=comm, threads=threads, check_every=0)
    trainer.optimizer.threads = threads  # as fit sets it: the update uses the BLAS threads' cores
    clock = {"compute": 0.0, "update": 0.0}
    timed(net, "grad_sum", clock, "compute")
    timed(trainer.optimizer, "step", clock, "update")
    X = _TimedRows(X, clock, "compute")  # gathering a shard's rows is compute too
    rows = np.arange(run["batch"])

    def step():
        clock.update(compute=0.0, update=0.0)
        t0 = time.perf_counter()
        trainer.train_batch(X, Y, rows)
        total = time.perf_counter() - t0
        return clock["compute"], total - clock["compute"] - clock["update"], clock["update"]

    return trainer, step


class _TimedRows:
    """X whose row gathers X[idx] add their seconds to clock[key]."""

    def __init__(self, X, clock, key):
        self.X, self.clock, self.key = X, clock, key

    def __getitem__(self, idx):
        t0 = time.perf_counter()
        rows = self.X[idx]
        self.clock[self.key] += time.perf_counter() - t0
        return rows


def scaling_run(comm, run, min_s, threads):
    """Time the step loop on this communicator for one net and global batch; per-rank phase split."""
    # The step reported is the fastest (as in timeit) by its slowest rank's wall time; every rank
    # gives its (wall, compute, allreduce, update) seconds of that same step.
    trainer, step = trainer_step(comm, run, threads)
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
    trainer.close()
    table = per_rank(comm, times[best])
    return dict(run, ranks=comm.size, steps=reps, step_s=float(walls[best]),
                per_rank=[dict(zip(("step_s", "compute_s", "allreduce_s", "update_s"), map(float, r)))
                          for r in table])


def trainer_run(comm, run, threads):
    """Trainer.fit step time in default and deterministic mode (SGD momentum; fastest epoch after the
    first), both on `threads` BLAS threads per rank (deterministic mode would otherwise pin 1)."""
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
                          chunk_size=run["chunk_size"], threads=threads)
        history = trainer.fit(X, y)[1:]  # epoch 1 allocates the buffers
        out[f"{mode}_step_s"] = min(h["seconds"] for h in history) / run["steps"]
    return out


def comm_sweep(comm, sizes, min_s):
    """Allreduce seconds of a float32 buffer per size: in Comm's buckets, as one MPI call, and
    through node shared memory where Comm uses it."""
    from .comm import Comm
    rows = []
    for nbytes in sizes:
        row = {"bytes": nbytes, "ranks": comm.size}
        for key, bucket in (("bucketed", comm.bucket_bytes), ("one_call", nbytes), ("shared", None)):
            c = Comm(comm.comm, bucket_bytes=bucket or nbytes, shared_memory=bucket is None)
            buf = c.buffer(nbytes // 4, np.float32)  # zeros: repeated sums stay finite
            if bucket is None and not c.shares(buf):
                c.close()
                continue  # ranks on several nodes, or past SHARED_MAX_BYTES: MPI's allreduce
            call = lambda: c.allreduce(buf, "bench: sweep")  # noqa: E731
            reps = agreed_reps(comm, call, min_s)
            seconds = np.empty(reps)
            comm.barrier()
            for i in range(reps):
                t0 = time.perf_counter()
                call()
                seconds[i] = time.perf_counter() - t0
            comm.allreduce_max(seconds, "bench: sweep times")  # a call lasts until its last rank is done
            c.close()  # frees the shared window
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
            out["scaling"] += [dict(scaling_run(comm, run, spec["seconds"], t), threads=t)
                               for run in spec["runs"]]
    with blas_threads(spec["threads"][-1]):  # the standard layout only: cores // P threads
        out["trainer"] = [dict(trainer_run(comm, run, spec["threads"][-1]), threads=spec["threads"][-1])
                          for run in spec["trainer"]]
    if spec["comm_bytes"]:
        with blas_threads(1):
            out["comm"] = comm_sweep(comm, spec["comm_bytes"], spec["seconds"])
    return out if comm.is_root else None


# ============================================================================ worker: memory

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


# ============================================================================ worker: start-up

STARTUP = """
import time
t0 = time.perf_counter()
import json, sys
import numpy as np
from distnn import cli, run  # what `distnn train` imports
from distnn.network import Network
from distnn.optim import SGD
from distnn.trainer import Trainer
t1 = time.perf_counter()
spec = json.loads(sys.argv[1])
net = Network(spec["sizes"], dtype=spec["dtype"], seed=0)
rng = np.random.default_rng(0)
X = rng.standard_normal((spec["batch"], spec["sizes"][0])).astype(net.dtype)
Y = net.check_targets(rng.integers(0, spec["sizes"][-1], spec["batch"]))
trainer = Trainer(net, SGD(lr=0.01, momentum=0.9), batch_size=spec["batch"], epochs=1, seed=0,
                  threads=1, check_every=0)
trainer.train_batch(X, Y, np.arange(spec["batch"]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_step_s": t2 - t1}))
"""


def startup_run(spec, cache_dir):
    """One fresh process: import, a Trainer, one step; its own figures and the wall time of all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_CACHE_DIR"] = cache_dir
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STARTUP, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"start-up run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_s": wall}


def startup_worker(spec):
    """Start-up cost of training: import + first step in fresh processes, cold (an empty numba
    cache: every kernel the step needs compiles) and warm (the cache of the cold run)."""
    with tempfile.TemporaryDirectory(prefix="distnn-numba-cache-") as cache:
        cold = startup_run(spec, cache)
        warm = [startup_run(spec, cache) for _ in range(spec["warm_runs"])]
    best = min(warm, key=lambda r: r["process_s"])
    return dict(spec, cold=cold, warm=best,
                cold_s=cold["import_s"] + cold["first_step_s"],
                warm_s=best["import_s"] + best["first_step_s"])


# ============================================================================ worker: PyTorch DDP

def ddp_worker(spec):
    """One rank of torch DistributedDataParallel (gloo, 1 thread) training whole epochs of the same
    synthetic data, global batch and SGD momentum as Trainer.fit in `mpi`; rank 0 returns the
    fastest epoch's time per step."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=size)
    out = []
    for run in spec["runs"]:
        nn, sizes, dtype = torch.nn, run["sizes"], getattr(torch, run["dtype"])
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = torch.nn.parallel.DistributedDataParallel(nn.Sequential(*layers[:-1]).to(dtype))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        rng = np.random.default_rng(0)
        n, batch = run["batch"] * run["steps"], run["batch"]
        X = torch.from_numpy(rng.standard_normal((n, sizes[0])).astype(run["dtype"]))
        y = torch.from_numpy(rng.integers(0, sizes[-1], n))
        share = batch // size  # this rank's rows of each global batch
        epochs = []
        for _ in range(run["epochs"]):
            dist.barrier()
            t0 = time.perf_counter()
            for s in range(run["steps"]):
                lo = s * batch + rank * share
                opt.zero_grad()
                loss_fn(model(X[lo:lo + share]), y[lo:lo + share]).backward()
                opt.step()
            dist.barrier()
            epochs.append(time.perf_counter() - t0)
        out.append(dict(run, ranks=size, ddp_step_s=min(epochs[1:]) / run["steps"]))
    dist.destroy_process_group()
    return {"torch": torch.__version__, "runs": out} if rank == 0 else None


# ============================================================================ the worker entry

def dp_worker(spec):
    """The DP-SGD section's worker (bench_dp.py)."""
    from .bench_dp import dp_worker as worker

    return worker(spec)


WORKERS = {"single": single_worker, "mpi": mpi_worker, "memory": memory_worker,
           "startup": startup_worker, "ddp": ddp_worker, "dp": dp_worker}


def worker_main(kind, spec):
    """Entry of a worker process: run one kind of measurement and print its JSON on stdout."""
    result = WORKERS[kind](json.loads(spec))
    if result is not None:
        print(json.dumps(result, default=float), flush=True)
    return 0

