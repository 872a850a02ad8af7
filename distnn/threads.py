"""Threads per rank: BLAS's (ranks x threads should not exceed the cores, or GEMMs fight for them)
and the rank's own, for element-wise numpy work on large vectors (`run_parallel`).

The share per rank comes from the caller (Comm.blas_share()), so this module needs no MPI.
Deterministic mode pins the thread count too: a different count may change GEMM rounding.
"""
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from threadpoolctl import threadpool_info, threadpool_limits

_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_limiter = None  # the live threadpool_limits controller; kept so the limit's owner is visible


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_env(n: int) -> dict[str, str]:
    """Environment variables that give a launched process n BLAS/OpenMP threads."""
    return {name: str(n) for name in _ENV_VARS}


def limit_blas_threads(n: int) -> int:
    """Limit this process (and its children) to n BLAS threads for the rest of its life."""
    global _limiter
    if n < 1:
        raise ValueError(f"BLAS threads must be at least 1, got {n!r}")
    os.environ.update(blas_env(n))  # for child processes; this process's BLAS is already loaded
    _limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def threads_in_force() -> int:
    """The BLAS thread count in force now (1 if no BLAS is loaded)."""
    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)


_POOLS = {}  # worker count -> a ThreadPoolExecutor, made once
_POOLS_LOCK = threading.Lock()


def run_parallel(fn, items) -> None:
    """fn(item) for every item at once: the first on this thread, the rest on a pool. For numpy
    work on large arrays, whose loops release the GIL. Each item runs in a copy of the caller's
    context (numpy's errstate lives there); all have finished when this returns or raises."""
    later = [_pool(len(items) - 1).submit(contextvars.copy_context().run, fn, item)
             for item in items[1:]]
    try:
        if items:
            fn(items[0])
    finally:
        wait(later)  # never leave a slice writing after an error
    for done in later:
        done.result()  # re-raises a slice's error


def _pool(workers):
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="distnn")
        return _POOLS[workers]


# a forked child has none of the pools' threads, only their bookkeeping: start afresh there
os.register_at_fork(after_in_child=_POOLS.clear)
